"""Triangle multiplicative updates (OpenFold `openfold/model/triangular_multiplicative_update.py`)
[Algorithms 11, 12]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear

Array = jax.Array


class TriangleMultiplicativeUpdate(nn.Module):
    """Triangle update using outgoing edges [Algorithm 11] (`outgoing=True`:
    x_ij = sum_k a_ik b_jk) or incoming edges [Algorithm 12] (x_ij = sum_k a_ki b_kj).
    The edge product is accumulated in float32 (OpenFold runs it in fp32 under fp16)."""
    c_z: int
    c_hidden: int
    outgoing: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, mask: Optional[Array] = None) -> Array:
        # z: [*, N_res, N_res, C_z], mask: [*, N_res, N_res] -> [*, N_res, N_res, C_z]
        if mask is None:
            mask = jnp.ones(z.shape[:-1], jnp.float32)
        mask = mask[..., None, :, :].astype(self.dtype)  # [*, 1, N_res, N_res]
        z = LayerNorm(name="layer_norm_in")(z)  # [*, N_res, N_res, C_z]
        # channel-first edge projections: the edge product is then a matmul batched over channels,
        # with one transpose of z for all four projections instead of one per operand
        proj = lambda name, init="default": Linear(self.c_hidden, init=init, dtype=self.dtype, out_axis=-3,
                                                   name=name)(z)  # [*, C_hidden, N_res, N_res]
        a = mask * jax.nn.sigmoid(proj("linear_a_g", "gating")) * proj("linear_a_p")  # [*, C_hidden, N_res, N_res]
        b = mask * jax.nn.sigmoid(proj("linear_b_g", "gating")) * proj("linear_b_p")  # [*, C_hidden, N_res, N_res]
        eq = "...cik,...cjk->...cij" if self.outgoing else "...cki,...ckj->...cij"
        x = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)  # [*, C_hidden, N_res, N_res]
        x = jnp.moveaxis(x, -3, -1)  # [*, N_res, N_res, C_hidden]
        x = LayerNorm(name="layer_norm_out")(x)  # [*, N_res, N_res, C_hidden]
        x = Linear(self.c_z, init="final", dtype=self.dtype, name="linear_z")(x)  # [*, N_res, N_res, C_z]
        # [*, N_res, N_res, C_z]
        g = jax.nn.sigmoid(Linear(self.c_z, init="gating", dtype=self.dtype, name="linear_g")(z))
        return x * g


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Triangle multiplicative update using "outgoing" edges [Algorithm 11]."""
    outgoing: bool = True


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Triangle multiplicative update using "incoming" edges [Algorithm 12]."""
    outgoing: bool = False
