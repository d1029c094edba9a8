"""Scanned block stacks shared by the Evoformer, extra-MSA and template pair stacks: one block
`nn.scan`-ned over a leading block axis of its params (`blocks/...`, stacked [no_blocks, ...]),
optionally `nn.remat`-ed, so the block is traced and compiled once whatever the depth
(docs/architecture.md)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from molfun_jax.config import remat_policy
from molfun_jax.model.primitives import compute_dtype

Array = jax.Array


def add(x: Array, update: Array) -> Array:
    """Residual update that keeps x's dtype (scan carries must keep their type)."""
    return x + update.astype(x.dtype)


@functools.cache
def _carry_form(block: type[nn.Module]) -> type[nn.Module]:
    """`block` whose call `(*state, *args) -> state` becomes `(state_tuple, *args) ->
    (state_tuple, None)`, the signature `nn.scan` needs; same params, same names."""
    class Scanned(block):  # type: ignore[valid-type, misc]
        def __call__(self, carry: tuple, *args: Any) -> tuple[tuple, None]:
            out = block.__call__(self, *carry, *args)
            return (out if isinstance(out, tuple) else (out,)), None

    Scanned.__name__ = block.__name__
    return Scanned


def scan_blocks(block: type[nn.Module], no_blocks: int, no_args: int, remat: bool,
                remat_policy: Optional[Callable]) -> type[nn.Module]:
    """A module class applying `block` `no_blocks` times with params stacked on axis 0
    (`params` and `lora` collections), fresh param/dropout RNGs per block. Its call is
    `(state_tuple, *args) -> (state_tuple, None)` where the `no_args` args are the same for every
    block and the last two (chunk_size, deterministic) are static."""
    cls = _carry_form(block)
    if remat:
        # argnums count the module as 0 and the state tuple as 1
        cls = nn.remat(cls, policy=remat_policy, prevent_cse=False, static_argnums=(no_args, no_args + 1))
    return nn.scan(cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * no_args, length=no_blocks)


class FromConfigMixin:
    """`Stack.from_config(cfg.model.<stack>, cfg.globals, **overrides)`: the config keys are the
    attributes; dtype, remat and the remat policy come from the globals."""

    @classmethod
    def from_config(cls, cfg: Any, globals_: Any, **overrides: Any) -> Any:
        kw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        kw.update(dtype=compute_dtype(globals_.dtype), remat=bool(globals_.remat),
                  remat_policy=remat_policy(globals_))
        return cls(**{**kw, **overrides})
