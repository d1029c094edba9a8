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
        mask = mask[..., None].astype(self.dtype)
        lin = lambda c, name, init="default": Linear(c, init=init, dtype=self.dtype, name=name)
        z = LayerNorm(name="layer_norm_in")(z)
        # [*, N_res, N_res, C_hidden]
        a = mask * jax.nn.sigmoid(lin(self.c_hidden, "linear_a_g", "gating")(z)) * lin(self.c_hidden, "linear_a_p")(z)
        b = mask * jax.nn.sigmoid(lin(self.c_hidden, "linear_b_g", "gating")(z)) * lin(self.c_hidden, "linear_b_p")(z)
        eq = "...ikc,...jkc->...ijc" if self.outgoing else "...kic,...kjc->...ijc"
        x = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
        x = lin(self.c_z, "linear_z", "final")(LayerNorm(name="layer_norm_out")(x))
        g = jax.nn.sigmoid(lin(self.c_z, "linear_g", "gating")(z))
        return x * g


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Triangle multiplicative update using "outgoing" edges [Algorithm 11]."""
    outgoing: bool = True


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Triangle multiplicative update using "incoming" edges [Algorithm 12]."""
    outgoing: bool = False
