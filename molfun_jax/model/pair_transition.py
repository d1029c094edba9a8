"""Pair transition (OpenFold `openfold/model/pair_transition.py`) [Algorithm 15]."""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear, chunk_layer, relu_keeping_mask, runtime_chunk_size

Array = jax.Array


def transition(module: nn.Module, x: Array, mask: Optional[Array], chunk_size: Optional[int],
               c: int, n: int, dtype: jnp.dtype, relu: Callable[[Array], Array] = jax.nn.relu) -> Array:
    """LayerNorm -> Linear(n*c, relu) -> ReLU -> Linear(c, final) [* mask], chunked over the
    leading axes; shared by PairTransition and MSATransition (called inside `module`'s compact
    method, so the submodules are `module`'s `layer_norm`, `linear_1`, `linear_2`)."""
    layer_norm = LayerNorm(name="layer_norm")
    linear_1 = Linear(n * c, init="relu", dtype=dtype, name="linear_1")
    linear_2 = Linear(c, init="final", dtype=dtype, name="linear_2")

    def fn(x_: Array, *mask_: Array) -> Array:
        y = linear_2(relu(linear_1(layer_norm(x_))))
        return y * mask_[0][..., None].astype(y.dtype) if mask_ else y

    args = [x] if mask is None else [x, jnp.broadcast_to(mask, x.shape[:-1])]
    return chunk_layer(fn, args, runtime_chunk_size(module, chunk_size), x.ndim - 2)


class PairTransition(nn.Module):
    """Pair transition: a 2-layer MLP applied to each pair entry [Algorithm 15]. The mask is
    optional (OpenFold v1's model runs it unmasked, `_mask_trans=False`). Its ReLU keeps a bit mask
    for the backward (`relu_keeping_mask`): the transition ends the Evoformer block, so a
    rematerialised block needs nothing else of it. The MSA transition's output feeds the outer
    product mean, whose recompute needs it whole, so it keeps no mask."""
    c_z: int
    n: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # z: [*, N_res, N_res, C_z], mask: [*, N_res, N_res] -> [*, N_res, N_res, C_z]
        return transition(self, z, mask, chunk_size, self.c_z, self.n, self.dtype, relu_keeping_mask)
