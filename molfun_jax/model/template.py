"""Template pair stack and pointwise attention (OpenFold `openfold/model/template.py`)
[Algorithms 16, 17]."""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.dropout import DropoutColumnwise, DropoutRowwise
from molfun_jax.model.pair_transition import PairTransition
from molfun_jax.model.primitives import Attention, LayerNorm
from molfun_jax.model.scan import FromConfigMixin, add, scan_blocks
from molfun_jax.model.triangular_attention import TriangleAttentionEndingNode, TriangleAttentionStartingNode
from molfun_jax.model.triangular_multiplicative_update import (TriangleMultiplicationIncoming,
                                                               TriangleMultiplicationOutgoing)

Array = jax.Array


class TemplatePointwiseAttention(nn.Module):
    """Pointwise attention of each pair entry over the templates [Algorithm 17]: queries from
    z [*, N_res, N_res, C_z], keys/values from t [*, N_templ, N_res, N_res, C_t]; masked
    templates get the additive bias `inf * (template_mask - 1)`."""
    c_t: int
    c_z: int
    c_hidden: int
    no_heads: int
    inf: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array, z: Array, template_mask: Optional[Array] = None,
                 chunk_size: Optional[int] = None) -> Array:
        # t: [*, N_templ, N_res, N_res, C_t], z: [*, N_res, N_res, C_z], template_mask: [*, N_templ]
        if template_mask is None:
            template_mask = jnp.ones(t.shape[:-3], jnp.float32)
        # [*, 1, 1, 1, 1, N_templ]
        bias = self.inf * (template_mask[..., None, None, None, None, :] - 1)
        z = z[..., None, :]  # [*, N_res, N_res, 1, C_z]
        t = jnp.moveaxis(t, -4, -2)  # [*, N_res, N_res, N_templ, C_t]
        if chunk_size is not None:
            # chunking runs over [*, N_res, N_res]: give the bias those batch axes
            bias = jnp.broadcast_to(bias, z.shape[:-2] + bias.shape[-3:])
        z = Attention(self.c_hidden, self.no_heads, gating=False, dtype=self.dtype, name="mha")(
            z, t, [bias], chunk_size=chunk_size)
        return z[..., 0, :]  # [*, N_res, N_res, C_z]


class TemplatePairStackBlock(nn.Module):
    """One block of the template pair stack [Algorithm 16, lines 2-6]: triangle attention
    (starting node, row-wise dropout; ending node, column-wise dropout), triangle
    multiplications (outgoing, incoming; row-wise dropout), pair transition (unmasked, as
    OpenFold v1's `_mask_trans=False`). Templates are processed independently (OpenFold loops
    over them; here they are a leading axis)."""
    c_t: int
    c_hidden_tri_att: int
    c_hidden_tri_mul: int
    no_heads: int
    pair_transition_n: int
    dropout_rate: float
    inf: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, mask: Array, chunk_size: Optional[int] = None,
                 deterministic: bool = True) -> Array:
        # z: [*, N_templ, N_res, N_res, C_t], mask: [*, N_templ, N_res, N_res]
        dt = self.dtype
        drop_row = DropoutRowwise(self.dropout_rate, name="dropout_row")
        drop_col = DropoutColumnwise(self.dropout_rate, name="dropout_col")
        att = (self.c_t, self.c_hidden_tri_att, self.no_heads)
        z = add(z, drop_row(TriangleAttentionStartingNode(*att, inf=self.inf, dtype=dt, name="tri_att_start")(
            z, mask=mask, chunk_size=chunk_size), deterministic))
        z = add(z, drop_col(TriangleAttentionEndingNode(*att, inf=self.inf, dtype=dt, name="tri_att_end")(
            z, mask=mask, chunk_size=chunk_size), deterministic))
        z = add(z, drop_row(TriangleMultiplicationOutgoing(self.c_t, self.c_hidden_tri_mul, dtype=dt,
                                                           name="tri_mul_out")(z, mask=mask), deterministic))
        z = add(z, drop_row(TriangleMultiplicationIncoming(self.c_t, self.c_hidden_tri_mul, dtype=dt,
                                                          name="tri_mul_in")(z, mask=mask), deterministic))
        return add(z, PairTransition(self.c_t, self.pair_transition_n, dtype=dt, name="pair_transition")(
            z, chunk_size=chunk_size))


class TemplatePairStack(nn.Module, FromConfigMixin):
    """The template pair stack [Algorithm 16]: `no_blocks` TemplatePairStackBlocks (scanned),
    then a final LayerNorm. A mask with one template row ([*, 1, N_res, N_res]) is broadcast to
    every template, as OpenFold. `remat` / `remat_policy` as EvoformerStack."""
    c_t: int
    c_hidden_tri_att: int
    c_hidden_tri_mul: int
    no_blocks: int
    no_heads: int
    pair_transition_n: int
    dropout_rate: float
    inf: float = 1e9
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: Optional[Callable] = jax.checkpoint_policies.nothing_saveable

    @nn.compact
    def __call__(self, t: Array, mask: Array, chunk_size: Optional[int] = None,
                 deterministic: bool = True) -> Array:
        # t: [*, N_templ, N_res, N_res, C_t], mask: [*, N_templ or 1, N_res, N_res]
        mask = jnp.broadcast_to(mask, t.shape[:-1])
        blocks = scan_blocks(TemplatePairStackBlock, self.no_blocks, 3, self.remat, self.remat_policy)(
            self.c_t, self.c_hidden_tri_att, self.c_hidden_tri_mul, self.no_heads, self.pair_transition_n,
            self.dropout_rate, self.inf, dtype=self.dtype, name="blocks")
        (t,), _ = blocks((t,), mask, chunk_size, deterministic)
        return LayerNorm(name="layer_norm")(t)  # [*, N_templ, N_res, N_res, C_t]
