"""Evoformer and extra-MSA blocks and stacks (OpenFold `openfold/model/evoformer.py`)
[Algorithms 6, 9, 18].

The stacks scan one block over a leading block axis of the params (`model.scan`). OpenFold's
runtime knobs (`blocks_per_ckpt`, `clear_cache_between_blocks`, `tune_chunk_size`, `use_lma`,
`inplace_safe`, offloading) have no counterpart. As in OpenFold v1's model (`_mask_trans=False`), the MSA and pair transitions run
unmasked.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.dropout import DropoutColumnwise, DropoutRowwise
from molfun_jax.model.msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from molfun_jax.model.outer_product_mean import OuterProductMean
from molfun_jax.model.pair_transition import PairTransition, transition
from molfun_jax.model.primitives import Linear
from molfun_jax.model.scan import FromConfigMixin, add, scan_blocks
from molfun_jax.model.triangular_attention import TriangleAttention
from molfun_jax.model.triangular_multiplicative_update import (TriangleMultiplicationIncoming,
                                                               TriangleMultiplicationOutgoing)

Array = jax.Array


class MSATransition(nn.Module):
    """MSA transition: a 2-layer MLP applied to each MSA entry [Algorithm 9]. The mask is
    optional (OpenFold v1's model runs it unmasked)."""
    c_m: int
    n: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, mask: Optional[Array] = None, chunk_size: Optional[int] = None) -> Array:
        # m: [*, N_seq, N_res, C_m], mask: [*, N_seq, N_res] -> [*, N_seq, N_res, C_m]
        return transition(self, m, mask, chunk_size, self.c_m, self.n, self.dtype)


class EvoformerBlockCore(nn.Module):
    """The part of an Evoformer block shared with the extra-MSA block [Algorithm 6, lines 9-18]:
    MSA transition, outer product mean, triangle updates and attention, pair transition.
    Dropout as Algorithm 6 / OpenFold: row-wise on tri_mul_out, tri_mul_in and tri_att_start,
    column-wise on tri_att_end (OpenFold applies row-wise dropout to the transposed z)."""
    c_m: int
    c_z: int
    c_hidden_opm: int
    c_hidden_mul: int
    c_hidden_pair_att: int
    no_heads_pair: int
    transition_n: int
    pair_dropout: float
    inf: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array,
                 chunk_size: Optional[int] = None, deterministic: bool = True) -> tuple[Array, Array]:
        # m: [*, N_seq, N_res, C_m], z: [*, N_res, N_res, C_z]
        dt = self.dtype
        drop_row = DropoutRowwise(self.pair_dropout, name="ps_dropout_row_layer")
        drop_col = DropoutColumnwise(self.pair_dropout, name="ps_dropout_col_layer")
        m = add(m, MSATransition(self.c_m, self.transition_n, dtype=dt, name="msa_transition")(
            m, chunk_size=chunk_size))
        z = add(z, OuterProductMean(self.c_m, self.c_z, self.c_hidden_opm, dtype=dt, name="outer_product_mean")(
            m, mask=msa_mask, chunk_size=chunk_size))
        z = add(z, drop_row(TriangleMultiplicationOutgoing(self.c_z, self.c_hidden_mul, dtype=dt, name="tri_mul_out")(
            z, mask=pair_mask), deterministic))
        z = add(z, drop_row(TriangleMultiplicationIncoming(self.c_z, self.c_hidden_mul, dtype=dt, name="tri_mul_in")(
            z, mask=pair_mask), deterministic))
        tri_att = lambda name, starting: TriangleAttention(
            self.c_z, self.c_hidden_pair_att, self.no_heads_pair, starting=starting, inf=self.inf, dtype=dt, name=name)
        z = add(z, drop_row(tri_att("tri_att_start", True)(z, mask=pair_mask, chunk_size=chunk_size), deterministic))
        z = add(z, drop_col(tri_att("tri_att_end", False)(z, mask=pair_mask, chunk_size=chunk_size), deterministic))
        z = add(z, PairTransition(self.c_z, self.transition_n, dtype=dt, name="pair_transition")(
            z, chunk_size=chunk_size))
        return m, z


class EvoformerBlockFields(nn.Module):
    """The hyper-parameters of an Evoformer / extra-MSA block (OpenFold's config keys), shared
    by the blocks and their stacks."""
    c_m: int
    c_z: int
    c_hidden_msa_att: int
    c_hidden_opm: int
    c_hidden_mul: int
    c_hidden_pair_att: int
    no_heads_msa: int
    no_heads_pair: int
    transition_n: int
    msa_dropout: float
    pair_dropout: float
    inf: float
    eps: float
    dtype: jnp.dtype = jnp.float32

    def block_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EvoformerBlockFields)
                if f.name not in ("parent", "name")}


class EvoformerBlock(EvoformerBlockFields):
    """One Evoformer block [Algorithm 6, lines 2-18]: MSA row attention with pair bias
    (row-wise dropout), MSA column attention, then EvoformerBlockCore. `eps` is unused, as in
    OpenFold (kept so the config maps onto the attributes)."""

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array,
                 chunk_size: Optional[int] = None, deterministic: bool = True) -> tuple[Array, Array]:
        # m: [*, N_seq, N_res, C_m], z: [*, N_res, N_res, C_z]
        # msa_mask: [*, N_seq, N_res], pair_mask: [*, N_res, N_res]
        row = MSARowAttentionWithPairBias(self.c_m, self.c_hidden_msa_att, self.no_heads_msa, c_z=self.c_z,
                                          inf=self.inf, dtype=self.dtype, name="msa_att_row")
        m = add(m, DropoutRowwise(self.msa_dropout, name="msa_dropout_layer")(
            row(m, z=z, mask=msa_mask, chunk_size=chunk_size), deterministic))
        m = add(m, self.column_attention()(m, mask=msa_mask, chunk_size=chunk_size))
        return _core(self, name="core")(m, z, msa_mask, pair_mask, chunk_size, deterministic)

    def column_attention(self) -> nn.Module:
        return MSAColumnAttention(self.c_m, self.c_hidden_msa_att, self.no_heads_msa, inf=self.inf,
                                  dtype=self.dtype, name="msa_att_col")


class ExtraMSABlock(EvoformerBlock):
    """One extra-MSA block [Algorithm 18, lines 2-17]: as EvoformerBlock (same order: row
    attention with pair bias + row-wise dropout, column attention, core) but with global column
    attention [Algorithm 19], which uses `eps`. m: [*, N_extra, N_res, C_e]."""

    def column_attention(self) -> nn.Module:
        return MSAColumnGlobalAttention(self.c_m, self.c_hidden_msa_att, self.no_heads_msa, inf=self.inf,
                                        eps=self.eps, dtype=self.dtype, name="msa_att_col")


def _core(b: EvoformerBlock, name: str) -> EvoformerBlockCore:
    return EvoformerBlockCore(b.c_m, b.c_z, b.c_hidden_opm, b.c_hidden_mul, b.c_hidden_pair_att, b.no_heads_pair,
                              b.transition_n, b.pair_dropout, b.inf, dtype=b.dtype, name=name)


class _BlockStack(EvoformerBlockFields, FromConfigMixin):
    """`no_blocks` scanned `block`s; `remat` rematerialises each in the backward pass with
    `remat_policy` (default: save nothing)."""
    no_blocks: int = dataclasses.field(kw_only=True)
    remat: bool = dataclasses.field(default=False, kw_only=True)
    remat_policy: Optional[Callable] = dataclasses.field(default=jax.checkpoint_policies.nothing_saveable,
                                                         kw_only=True)
    block: ClassVar[type[nn.Module]] = EvoformerBlock

    def run_blocks(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array, chunk_size: Optional[int],
                   deterministic: bool, frozen_blocks: int = 0) -> tuple[Array, Array]:
        """(m, z) after the blocks. With `frozen_blocks=k` the first k blocks run forward-only
        (their params and outputs behind `stop_gradient`, so no backward goes through them) and
        the others as usual: the same values, and the same gradients for the params of blocks
        k.. (blocks below k get none). Dropout masks then come from one RNG per part."""
        def stack(n: int, remat: bool, **kw: object) -> nn.Module:
            return scan_blocks(self.block, n, 4, remat, self.remat_policy)(**self.block_fields(), **kw)

        if not frozen_blocks or self.is_initializing():
            (m, z), _ = stack(self.no_blocks, self.remat, name="blocks")(
                (m, z), msa_mask, pair_mask, chunk_size, deterministic)
            return m, z
        if not 0 < frozen_blocks <= self.no_blocks:
            raise ValueError(f"frozen_blocks={frozen_blocks} but the stack has {self.no_blocks} blocks")
        stacked = {c: v["blocks"] for c, v in self.variables.items() if "blocks" in v}

        def run(lo: int, hi: int, remat: bool, m: Array, z: Array, frozen: bool) -> tuple[Array, Array]:
            part = jax.tree_util.tree_map(lambda x: x[lo:hi], stacked)
            part = jax.lax.stop_gradient(part) if frozen else part
            rngs = None if deterministic else {"dropout": self.make_rng("dropout")}
            (m, z), _ = stack(hi - lo, remat, parent=None).apply(
                part, (m, z), msa_mask, pair_mask, chunk_size, deterministic, rngs=rngs)
            return m, z

        # no backward through the frozen part: remat there would only cost compile time
        m, z = jax.lax.stop_gradient(run(0, frozen_blocks, False, m, z, frozen=True))
        if frozen_blocks < self.no_blocks:
            m, z = run(frozen_blocks, self.no_blocks, self.remat, m, z, frozen=False)
        return m, z


class EvoformerStack(_BlockStack):
    """The Evoformer trunk [Algorithm 6]: `no_blocks` EvoformerBlocks (scanned), then the
    single representation s = Linear(m[..., 0, :, :]). `frozen_blocks`: see `run_blocks`."""
    c_s: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array, chunk_size: Optional[int] = None,
                 deterministic: bool = True, frozen_blocks: int = 0) -> tuple[Array, Array, Array]:
        # m: [*, N_seq, N_res, C_m], z: [*, N_res, N_res, C_z]
        # msa_mask: [*, N_seq, N_res], pair_mask: [*, N_res, N_res]
        m, z = self.run_blocks(m, z, msa_mask, pair_mask, chunk_size, deterministic, frozen_blocks)
        s = Linear(self.c_s, dtype=self.dtype, name="linear")(m[..., 0, :, :])  # [*, N_res, C_s]
        return m, z, s


class ExtraMSAStack(_BlockStack):
    """The extra-MSA stack [Algorithm 18]: `no_blocks` ExtraMSABlocks (scanned); returns z."""
    block: ClassVar[type[nn.Module]] = ExtraMSABlock

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array,
                 chunk_size: Optional[int] = None, deterministic: bool = True) -> Array:
        # m: [*, N_extra, N_res, C_e], z: [*, N_res, N_res, C_z] -> z
        _, z = self.run_blocks(m, z, msa_mask, pair_mask, chunk_size, deterministic)
        return z
