"""Evoformer and extra-MSA blocks and stacks (OpenFold `openfold/model/evoformer.py`)
[Algorithms 6, 9, 18].

The stacks `nn.scan` one block over a leading block axis of the params (`blocks/...`, stacked
[no_blocks, ...]), optionally `nn.remat`-ed, so the block is traced and compiled once whatever
the depth (DESIGN.md section 3). OpenFold's runtime knobs (`blocks_per_ckpt`,
`clear_cache_between_blocks`, `tune_chunk_size`, `use_lma`, `inplace_safe`, offloading) have no
counterpart. As in OpenFold v1's model (`_mask_trans=False`), the MSA and pair transitions run
unmasked.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.dropout import DropoutColumnwise, DropoutRowwise
from molfun_jax.model.msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from molfun_jax.model.outer_product_mean import OuterProductMean
from molfun_jax.model.pair_transition import PairTransition, transition
from molfun_jax.model.primitives import Linear, compute_dtype
from molfun_jax.model.triangular_attention import TriangleAttention
from molfun_jax.model.triangular_multiplicative_update import (TriangleMultiplicationIncoming,
                                                               TriangleMultiplicationOutgoing)

Array = jax.Array


def add(x: Array, update: Array) -> Array:
    """Residual update that keeps x's dtype (scan carries must keep their type)."""
    return x + update.astype(x.dtype)


@functools.cache
def _carry_form(block: type[nn.Module]) -> type[nn.Module]:
    """`block` whose call `(*state, *args) -> state` becomes `(state_tuple, *args) ->
    (state_tuple, None)`, the signature `nn.scan` needs; same params, same names."""
    class Scanned(block):  # type: ignore[valid-type, misc]
        def __call__(self, carry: tuple, *args: Any) -> tuple[tuple, None]:
            out = block.__call__(self, *carry, *args)
            return (out if isinstance(out, tuple) else (out,)), None

    Scanned.__name__ = block.__name__
    return Scanned


def scan_blocks(block: type[nn.Module], no_blocks: int, no_args: int, remat: bool,
                remat_policy: Optional[Callable]) -> type[nn.Module]:
    """A module class applying `block` `no_blocks` times with params stacked on axis 0
    (`params` and `lora` collections), fresh param/dropout RNGs per block. Its call is
    `(state_tuple, *args) -> (state_tuple, None)` where the `no_args` args are the same for every
    block and the last two (chunk_size, deterministic) are static."""
    cls = _carry_form(block)
    if remat:
        # argnums count the module as 0 and the state tuple as 1
        cls = nn.remat(cls, policy=remat_policy, prevent_cse=False, static_argnums=(no_args, no_args + 1))
    return nn.scan(cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * no_args, length=no_blocks)


class FromConfigMixin:
    """`Stack.from_config(cfg.model.<stack>, cfg.globals, **overrides)`: the config keys are the
    attributes; dtype and remat come from the globals."""

    @classmethod
    def from_config(cls, cfg: Any, globals_: Any, **overrides: Any) -> Any:
        kw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        kw.update(dtype=compute_dtype(globals_.dtype), remat=bool(globals_.remat))
        return cls(**{**kw, **overrides})


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


class EvoformerBlock(nn.Module):
    """One Evoformer block [Algorithm 6, lines 2-18]: MSA row attention with pair bias
    (row-wise dropout), MSA column attention, then EvoformerBlockCore. `eps` is unused, as in
    OpenFold (kept so the config maps onto the attributes)."""
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


_BLOCK_FIELDS = ("c_m", "c_z", "c_hidden_msa_att", "c_hidden_opm", "c_hidden_mul", "c_hidden_pair_att",
                 "no_heads_msa", "no_heads_pair", "transition_n", "msa_dropout", "pair_dropout", "inf", "eps",
                 "dtype")


class EvoformerStack(nn.Module, FromConfigMixin):
    """The Evoformer trunk [Algorithm 6]: `no_blocks` EvoformerBlocks (scanned), then the
    single representation s = Linear(m[..., 0, :, :]). `remat` rematerialises each block in the
    backward pass with `remat_policy` (default: save nothing)."""
    c_m: int
    c_z: int
    c_hidden_msa_att: int
    c_hidden_opm: int
    c_hidden_mul: int
    c_hidden_pair_att: int
    c_s: int
    no_heads_msa: int
    no_heads_pair: int
    no_blocks: int
    transition_n: int
    msa_dropout: float
    pair_dropout: float
    inf: float
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: Optional[Callable] = jax.checkpoint_policies.nothing_saveable

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array,
                 chunk_size: Optional[int] = None, deterministic: bool = True) -> tuple[Array, Array, Array]:
        # m: [*, N_seq, N_res, C_m], z: [*, N_res, N_res, C_z]
        # msa_mask: [*, N_seq, N_res], pair_mask: [*, N_res, N_res]
        blocks = scan_blocks(EvoformerBlock, self.no_blocks, 4, self.remat, self.remat_policy)(
            **{k: getattr(self, k) for k in _BLOCK_FIELDS}, name="blocks")
        (m, z), _ = blocks((m, z), msa_mask, pair_mask, chunk_size, deterministic)
        s = Linear(self.c_s, dtype=self.dtype, name="linear")(m[..., 0, :, :])  # [*, N_res, C_s]
        return m, z, s


class ExtraMSAStack(nn.Module, FromConfigMixin):
    """The extra-MSA stack [Algorithm 18]: `no_blocks` ExtraMSABlocks (scanned); returns z.
    `remat` / `remat_policy` as EvoformerStack."""
    c_m: int
    c_z: int
    c_hidden_msa_att: int
    c_hidden_opm: int
    c_hidden_mul: int
    c_hidden_pair_att: int
    no_heads_msa: int
    no_heads_pair: int
    no_blocks: int
    transition_n: int
    msa_dropout: float
    pair_dropout: float
    inf: float
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: Optional[Callable] = jax.checkpoint_policies.nothing_saveable

    @nn.compact
    def __call__(self, m: Array, z: Array, msa_mask: Array, pair_mask: Array,
                 chunk_size: Optional[int] = None, deterministic: bool = True) -> Array:
        # m: [*, N_extra, N_res, C_e], z: [*, N_res, N_res, C_z] -> z
        blocks = scan_blocks(ExtraMSABlock, self.no_blocks, 4, self.remat, self.remat_policy)(
            **{k: getattr(self, k) for k in _BLOCK_FIELDS}, name="blocks")
        (_, z), _ = blocks((m, z), msa_mask, pair_mask, chunk_size, deterministic)
        return z
