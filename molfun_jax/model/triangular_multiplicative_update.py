"""Triangle multiplicative updates (OpenFold `openfold/model/triangular_multiplicative_update.py`)
[Algorithms 11, 12]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear, LinearWeights, dense

Array = jax.Array
# the edge projections (state-dict names, inits), in the order of their fused matmul's output
_EDGE_PROJECTIONS = (("linear_a_g", "gating"), ("linear_a_p", "default"), ("linear_b_g", "gating"),
                     ("linear_b_p", "default"))


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
        # the four edge projections as one channel-first matmul: the edge product is then a matmul
        # batched over channels, and z is transposed once and multiplied once for all four
        weights = [LinearWeights(self.c_hidden, init=init, name=name)(z.shape[-1]) for name, init in _EDGE_PROJECTIONS]
        kernel = jnp.concatenate([w for w, _ in weights], axis=1).astype(self.dtype)  # [C_z, 4 * C_hidden]
        bias = jnp.concatenate([b for _, b in weights]).astype(self.dtype)  # [4 * C_hidden]
        # [*, 4 * C_hidden, N_res, N_res]
        proj = dense(z.astype(self.dtype), kernel, out_axis=-3) + bias[:, None, None]
        a_g, a_p, b_g, b_p = jnp.split(proj, 4, axis=-3)  # each [*, C_hidden, N_res, N_res]
        a = mask * jax.nn.sigmoid(a_g) * a_p  # [*, C_hidden, N_res, N_res]
        b = mask * jax.nn.sigmoid(b_g) * b_p  # [*, C_hidden, N_res, N_res]
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
