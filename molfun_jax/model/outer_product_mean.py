"""Outer product mean (OpenFold `openfold/model/outer_product_mean.py`) [Algorithm 10]."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear, LinearWeights, chunk_layer, runtime_chunk_size

Array = jax.Array


class OuterProductMean(nn.Module):
    """MSA -> pair update: the outer product of two projections, averaged over the (masked)
    sequences [Algorithm 10]. As OpenFold, the mean divides by (number of sequence pairs
    unmasked at both residues) + eps, with eps = 1e-3 (not the config eps)."""
    c_m: int
    c_z: int
    c_hidden: int
    eps: float = 1e-3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # m: [*, N_seq, N_res, C_m], mask: [*, N_seq, N_res] -> [*, N_res, N_res, C_z]
        if mask is None:
            mask = jnp.ones(m.shape[:-1], jnp.float32)
        mask = mask[..., None]  # [*, N_seq, N_res, 1]
        ln = LayerNorm(name="layer_norm")(m)
        a = Linear(self.c_hidden, dtype=self.dtype, name="linear_1")(ln) * mask.astype(self.dtype)  # [*, N_seq, N_res, C]
        b = Linear(self.c_hidden, dtype=self.dtype, name="linear_2")(ln) * mask.astype(self.dtype)  # [*, N_seq, N_res, C]
        a = jnp.swapaxes(a, -2, -3)  # [*, N_res, N_seq, C]
        b = jnp.swapaxes(b, -2, -3)  # [*, N_res, N_seq, C]
        kernel, bias = LinearWeights(self.c_z, init="final", name="linear_out")(self.c_hidden ** 2)
        kernel = kernel.reshape(self.c_hidden, self.c_hidden, self.c_z).astype(self.dtype)  # [C, C, C_z]

        def opm(a_: Array, b_: Array) -> Array:
            # a_: [*, N_seq, C] (residue i), b_: [*, N_res, N_seq, C] -> [*, N_res, C_z]
            # the outer product and its projection as one contraction, in the order with the fewest
            # FLOPs: a deep MSA forms the C x C outer product first (as OpenFold), a shallow one
            # projects a first and never forms it
            return jnp.einsum("...sc,...jse,cez->...jz", a_, b_, kernel, optimize="optimal",
                              preferred_element_type=jnp.float32)

        # chunks over the first residue axis as OpenFold
        outer = chunk_layer(opm, [a, b[..., None, :, :, :]],
                            runtime_chunk_size(self, chunk_size), a.ndim - 2) + bias  # [*, N_res, N_res, C_z]
        # [*, N_res, N_res, 1]
        norm = jnp.einsum("...abc,...adc->...bdc", mask, mask) + self.eps
        return (outer / norm).astype(self.dtype)
