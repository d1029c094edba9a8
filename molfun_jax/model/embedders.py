"""Embedders (OpenFold `openfold/model/embedders.py`): input features, recycled outputs,
template angles / pairs and the extra MSA, each a thin layer over `primitives.Linear`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear

Array = jax.Array


class InputEmbedder(nn.Module):
    """Embeds target, residue-index and MSA features [Algorithms 3 (InputEmbedder), 4 (relpos)]."""
    tf_dim: int
    msa_dim: int
    c_z: int
    c_m: int
    relpos_k: int
    dtype: jnp.dtype = jnp.float32

    def relpos(self, ri: Array) -> Array:
        """Relative position encoding [Algorithm 4]; `ri` is [*, N_res] float32 (OpenFold casts it
        to the embedding dtype, which under bfloat16 would round indices above 256: we do not).
        Offsets are clipped to [-relpos_k, relpos_k] by the nearest-boundary argmin."""
        d = ri[..., None] - ri[..., None, :]  # [*, N_res, N_res]
        boundaries = jnp.arange(-self.relpos_k, self.relpos_k + 1, dtype=d.dtype)  # [no_bins]
        idx = jnp.argmin(jnp.abs(d[..., None] - boundaries), axis=-1)  # [*, N_res, N_res]
        oh = jax.nn.one_hot(idx, 2 * self.relpos_k + 1, dtype=self.dtype)
        return Linear(self.c_z, dtype=self.dtype, name="linear_relpos")(oh)  # [*, N_res, N_res, C_z]

    @nn.compact
    def __call__(self, tf: Array, ri: Array, msa: Array) -> tuple[Array, Array]:
        # tf: [*, N_res, tf_dim], ri: [*, N_res], msa: [*, N_clust, N_res, msa_dim]
        # [*, N_res, C_z]
        tf_emb_i = Linear(self.c_z, dtype=self.dtype, name="linear_tf_z_i")(tf)
        tf_emb_j = Linear(self.c_z, dtype=self.dtype, name="linear_tf_z_j")(tf)
        # [*, N_res, N_res, C_z]
        pair_emb = self.relpos(ri.astype(jnp.float32))
        pair_emb = pair_emb + tf_emb_i[..., None, :]
        pair_emb = pair_emb + tf_emb_j[..., None, :, :]
        # [*, N_clust, N_res, C_m]
        tf_m = Linear(self.c_m, dtype=self.dtype, name="linear_tf_m")(tf)[..., None, :, :]
        msa_emb = Linear(self.c_m, dtype=self.dtype, name="linear_msa_m")(msa) + tf_m
        return msa_emb, pair_emb


class RecyclingEmbedder(nn.Module):
    """Embeds the previous iteration's first MSA row, pair and pseudo-beta positions
    [Algorithm 32]. Distances are binned on squared values, the last bin capped by `inf`."""
    c_m: int
    c_z: int
    min_bin: float
    max_bin: float
    no_bins: int
    inf: float = 1e8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, z: Array, x: Array) -> tuple[Array, Array]:
        # m: [*, N_res, C_m], z: [*, N_res, N_res, C_z], x: [*, N_res, 3] pseudo-beta positions
        m_update = LayerNorm(name="layer_norm_m")(m)  # [*, N_res, C_m]
        z_update = LayerNorm(name="layer_norm_z")(z)  # [*, N_res, N_res, C_z]
        x = x.astype(jnp.float32)
        squared_bins = jnp.linspace(self.min_bin, self.max_bin, self.no_bins, dtype=jnp.float32) ** 2
        upper = jnp.concatenate([squared_bins[1:], jnp.array([self.inf], jnp.float32)], axis=-1)
        # [*, N_res, N_res, 1]
        d = jnp.sum((x[..., None, :] - x[..., None, :, :]) ** 2, axis=-1, keepdims=True)
        # [*, N_res, N_res, no_bins]
        d = ((d > squared_bins) & (d < upper)).astype(jnp.float32)
        d = Linear(self.c_z, dtype=self.dtype, name="linear")(d)  # [*, N_res, N_res, C_z]
        return m_update, z_update + d


class TemplateAngleEmbedder(nn.Module):
    """Embeds `template_angle_feat` [Algorithm 2, line 7]: Linear, ReLU, Linear."""
    c_in: int
    c_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [*, N_templ, N_res, c_in] -> [*, N_templ, N_res, c_out]
        x = Linear(self.c_out, init="relu", dtype=self.dtype, name="linear_1")(x)
        x = jax.nn.relu(x)
        return Linear(self.c_out, init="relu", dtype=self.dtype, name="linear_2")(x)


class TemplatePairEmbedder(nn.Module):
    """Embeds `template_pair_feat` [Algorithm 2, line 9] (relu init, as the AF2 source)."""
    c_in: int
    c_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [*, c_in] -> [*, c_out]
        return Linear(self.c_out, init="relu", dtype=self.dtype, name="linear")(x)


class ExtraMSAEmbedder(nn.Module):
    """Embeds the unclustered (extra) MSA features [Algorithm 2, line 15]."""
    c_in: int
    c_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [*, N_extra_seq, N_res, c_in] -> [*, N_extra_seq, N_res, c_out]
        return Linear(self.c_out, dtype=self.dtype, name="linear")(x)
