"""Non-finite guards: bad input is refused before training, and a train step whose loss or
gradient norm is not finite changes nothing (params, optimizer state, EMA keep their bits).

`keep_if_finite` runs inside the jitted step (a `jnp.where` per leaf, so no host sync); the fit
loop counts the skipped steps and stops a run after `max_skipped_steps` in a row
(`SkippedStepsError`), since by then the data or the learning rate, not a fluke, is at fault.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# how many non-finite steps in a row stop a run
MAX_SKIPPED_STEPS = 5


class NonFiniteInputError(ValueError):
    """An example with a NaN / inf target or feature."""


class SkippedStepsError(RuntimeError):
    """Too many consecutive train steps with a non-finite loss or gradient norm."""


def check_finite_examples(examples: Sequence[Mapping[str, Any]], split: str = "examples") -> None:
    """Refuse the first example holding a non-finite number, naming it (its `pdb_id`, else its
    index in `split`) and the key."""
    for i, ex in enumerate(examples):
        for k, v in ex.items():
            a = np.asarray(v)
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                name = f"{ex['pdb_id']!s} ({split}[{i}])" if "pdb_id" in ex else f"{split}[{i}]"
                what = "NaN" if np.any(np.isnan(a)) else "inf"
                raise NonFiniteInputError(f"{name}: {k!r} holds {what} values; fix or drop this example")


def keep_if_finite(new: Any, old: Any, loss: jax.Array, grad_norm: jax.Array) -> tuple[Any, jax.Array]:
    """(`new` where loss and grad_norm are finite, else `old` leaf by leaf; 1 if skipped else 0)."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    return kept, (~ok).astype(jnp.int32)


class SkipCounter:
    """Counts skipped steps of a run (total and in a row) and stops it after `limit` in a row."""

    def __init__(self, limit: int = MAX_SKIPPED_STEPS) -> None:
        if limit < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {limit}")
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, skipped: bool, epoch: int, step: int) -> None:
        """Record one step (1-based `step` of the run); raise SkippedStepsError at the limit."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        if self.in_a_row >= self.limit:
            raise SkippedStepsError(
                f"epoch {epoch}, step {step}: {self.in_a_row} train steps in a row had a non-finite loss or "
                f"gradient norm and were skipped; stopping (lower the learning rate, check the targets, "
                f"or resume from the last checkpoint)")
