"""Triangle self-attention (OpenFold `openfold/model/triangular_attention.py`) [Algorithms 13, 14]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import Attention, LayerNorm, Linear

Array = jax.Array


class TriangleAttention(nn.Module):
    """Triangle attention around the starting node [Algorithm 13] (`starting=True`: each row i
    attends over j with bias b_jk) or the ending node [Algorithm 14] (`starting=False`: the same
    on the transposed pair representation)."""
    c_in: int
    c_hidden: int
    no_heads: int
    starting: bool = True
    inf: float = 1e9
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # x: [*, I, J, C_in], mask: [*, I, J]
        if mask is None:
            mask = jnp.ones(x.shape[:-1], jnp.float32)
        if not self.starting:
            x = jnp.swapaxes(x, -2, -3)
            mask = jnp.swapaxes(mask, -1, -2)
        x = LayerNorm(name="layer_norm")(x)
        # [*, I, 1, 1, J]
        mask_bias = (self.inf * (mask - 1))[..., :, None, None, :]
        # [*, I, J, H] -> [*, 1, H, I, J]
        tri_bias = Linear(self.no_heads, use_bias=False, init="normal", dtype=self.dtype, name="linear")(x)
        tri_bias = jnp.moveaxis(tri_bias, -1, -3)[..., None, :, :, :]
        x = Attention(self.c_hidden, self.no_heads, dtype=self.dtype, name="mha")(
            x, x, [mask_bias, tri_bias], chunk_size=chunk_size)
        if not self.starting:
            x = jnp.swapaxes(x, -2, -3)
        return x


TriangleAttentionStartingNode = TriangleAttention  # [Algorithm 13], as OpenFold


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangle attention around the ending node [Algorithm 14]."""
    starting: bool = False
