"""Learning-rate schedules: linear warmup from 0 to the peak, then cosine / linear decay to
`min_lr_ratio * peak` at the last optimizer step, or constant.

`step` counts the optimizer updates already applied (optax's convention: 0 for the first
update). With W = warmup_steps, T = total_steps, floor = min_lr_ratio * peak:

    step < W:   lr = peak * step / W                              (the first update has lr 0)
    step >= W:  t = min((step - W) / max(T - W, 1), 1)
                cosine:   floor + (peak - floor) * (1 + cos(pi t)) / 2
                linear:   peak - (peak - floor) * t
                constant: peak

`min_lr_ratio` defaults to 0 (decay to zero, as the seed's cosine / linear schedulers).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

SCHEDULERS = ("cosine", "linear", "constant")


def make_schedule(peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """lr(step) as documented in the module docstring (a jittable function of the step)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {SCHEDULERS}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    floor = min_lr_ratio * peak
    span = max(total_steps - warmup_steps, 1)

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        t = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif kind == "linear":
            decayed = peak - (peak - floor) * t
        else:
            decayed = jnp.full_like(t, peak)
        return jnp.where(step < warmup_steps, warm, decayed)

    return schedule


def steps_per_epoch(micro_batches_per_bucket: list[int], accumulation_steps: int) -> int:
    """Optimizer steps of one epoch: accumulation groups never mix length buckets, and the last
    partial group of each bucket counts as one step (ceil)."""
    return sum(math.ceil(n / accumulation_steps) for n in micro_batches_per_bucket)


def layer_decay_factors(no_blocks: int, decay: float) -> np.ndarray:
    """[no_blocks] LR multipliers decay**(no_blocks - 1 - i): 1 for the last block."""
    return decay ** np.arange(no_blocks - 1, -1, -1, dtype=np.float64)
