"""MSA attention modules (OpenFold `openfold/model/msa.py`) [Algorithms 7, 8, 19]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import Attention, GlobalAttention, LayerNorm, Linear, chunk_layer, runtime_chunk_size

Array = jax.Array


class MSAAttention(nn.Module):
    """Gated self-attention along the residue axis of each MSA row, with an optional bias from
    the pair representation (OpenFold's shared base of Algorithms 7 and 8)."""
    c_in: int
    c_hidden: int
    no_heads: int
    pair_bias: bool = False
    c_z: Optional[int] = None
    inf: float = 1e9
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, z: Optional[Array] = None, mask: Optional[Array] = None,
                 chunk_size: Optional[int] = None) -> Array:
        # m: [*, N_seq, N_res, C_m], z: [*, N_res, N_res, C_z], mask: [*, N_seq, N_res]
        if mask is None:
            mask = jnp.ones(m.shape[:-1], jnp.float32)
        # [*, N_seq, 1, 1, N_res]
        biases = [(self.inf * (mask - 1))[..., :, None, None, :]]
        if self.pair_bias:
            z = LayerNorm(name="layer_norm_z")(z)
            # [*, N_res, N_res, H]
            z = Linear(self.no_heads, use_bias=False, init="normal", dtype=self.dtype, name="linear_z")(z)
            # [*, 1, H, N_res, N_res]
            biases.append(jnp.moveaxis(z, -1, -3)[..., None, :, :, :])
        m = LayerNorm(name="layer_norm_m")(m)
        return Attention(self.c_hidden, self.no_heads, dtype=self.dtype, name="mha")(
            m, m, biases, chunk_size=chunk_size)


class MSARowAttentionWithPairBias(MSAAttention):
    """Row-wise gated self-attention with pair bias [Algorithm 7]. Fields as MSAAttention
    (`c_in` is C_m; `c_z` required), as OpenFold subclasses MSAAttention with pair_bias=True."""
    pair_bias: bool = True


class MSAColumnAttention(nn.Module):
    """Column-wise gated self-attention [Algorithm 8]: MSAAttention (`_msa_att`, no pair bias)
    over the sequence axis of each column."""
    c_m: int
    c_hidden: int
    no_heads: int
    inf: float = 1e9
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # m: [*, N_seq, N_res, C_m] -> [*, N_res, N_seq, C_m]
        m = jnp.swapaxes(m, -2, -3)
        if mask is not None:
            mask = jnp.swapaxes(mask, -1, -2)
        m = MSAAttention(self.c_m, self.c_hidden, self.no_heads, inf=self.inf, dtype=self.dtype,
                         name="_msa_att")(m, mask=mask, chunk_size=chunk_size)
        return jnp.swapaxes(m, -2, -3)  # [*, N_seq, N_res, C_m]


class MSAColumnGlobalAttention(nn.Module):
    """Column-wise global attention of the extra-MSA stack [Algorithm 19]."""
    c_in: int
    c_hidden: int
    no_heads: int
    inf: float = 1e9
    eps: float = 1e-10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # m: [*, N_seq, N_res, C_in], mask: [*, N_seq, N_res]
        if mask is None:
            mask = jnp.ones(m.shape[:-1], jnp.float32)
        m = jnp.swapaxes(m, -2, -3)  # [*, N_res, N_seq, C_in]
        mask = jnp.swapaxes(mask, -1, -2)
        layer_norm_m = LayerNorm(name="layer_norm_m")
        global_attention = GlobalAttention(self.c_hidden, self.no_heads, inf=self.inf, eps=self.eps,
                                           dtype=self.dtype, name="global_attention")
        # chunks over the residue axis
        m = chunk_layer(lambda m_, mask_: global_attention(layer_norm_m(m_), mask_), [m, mask],
                        runtime_chunk_size(self, chunk_size), m.ndim - 2)
        return jnp.swapaxes(m, -2, -3)  # [*, N_seq, N_res, C_in]
