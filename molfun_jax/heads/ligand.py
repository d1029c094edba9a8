"""Ligand-aware binding-affinity head: the ligand's chemistry and its pose against the pocket
enter the prediction, not only the pocket residues' trunk representation.

1. Ligand graph encoder: atom features -> `c_atom`, then `n_mp_layers` rounds of message passing
   over bonds, the bond features inside each message (m_ab = relu(W_n x_b + W_e e_ab), summed
   over bonded real atoms b, residual update, LayerNorm).
2. Interface block: each ligand atom attends (`n_heads` heads of `c_hidden`) over the pocket
   residues' single representation (keys masked to `pocket_mask * seq_mask`, or `seq_mask` when
   the pocket is empty), the logits biased by radial basis features of the distances from the
   ligand atom to the residue's nearest heavy atom and to its CA (3D pose; `n_rbf` Gaussians on
   [0, `rbf_max`] Angstrom).
3. Masked mean pooling over ligand atoms and over the pocket residues, then an MLP
   `2 c_atom -> hidden_dim -> 1` with dropout.

Only distances enter the network, so the prediction is invariant to rotating / translating the
complex; sums and means over atoms make it invariant to the order of ligand atoms; padding atoms
send no messages and are pooled out, padding residues are masked out of attention and pooling.

Parameters (F = ligand atom features (45), B = bond features (7), c = c_atom, H = n_heads,
h = c_hidden, R = n_rbf, L = n_mp_layers, D = hidden_dim):
    (F c + c) + L (2 c^2 + B c + 4 c) + 2 C_s + (2 R H + H) + c H h + 2 C_s H h + (H h c + c) + 2 c
    + (C_s c + c) + (2 c D + D) + (D + 1)
At the defaults (c = 64, H = 4, h = 32, R = 16, L = 3, D = 128) and C_s = 384 (model_1_ptm):
186,693 parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.heads.affinity import LOSSES, SOURCES
from molfun_jax.model.primitives import LayerNorm, Linear
from molfun_jax.np import residue_constants as rc

Array = jax.Array
# example keys the ligand head reads besides single / seq_mask / pocket_mask (its keyword arguments)
LIGAND_HEAD_INPUT_KEYS = ("all_atom_positions", "all_atom_mask", "ligand_atom_feat", "ligand_bond_feat",
                          "ligand_positions", "ligand_mask")
_FAR = 1e4  # Angstrom: distance of a missing atom (its radial features are 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LigandHeadConfig:
    """Ligand head hyper-parameters (`kind='ligand'`; `source`, `loss`, `huber_delta` and
    `dropout` as `HeadConfig`)."""
    kind: str = "ligand"
    c_atom: int = 64
    n_mp_layers: int = 3
    n_heads: int = 4
    c_hidden: int = 32
    n_rbf: int = 16
    rbf_max: float = 16.0
    hidden_dim: int = 128
    dropout: float = 0.1
    source: str = "evoformer"
    loss: str = "mse"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind != "ligand":
            raise ValueError(f"LigandHeadConfig.kind must be 'ligand', got {self.kind!r}")
        for field, allowed in (("source", SOURCES), ("loss", LOSSES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"LigandHeadConfig.{field}={getattr(self, field)!r}; choose one of {allowed}")
        for field in ("c_atom", "n_heads", "c_hidden", "n_rbf", "hidden_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"LigandHeadConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_mp_layers < 0 or self.rbf_max <= 0:
            raise ValueError("LigandHeadConfig: n_mp_layers must be >= 0 and rbf_max > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LigandHeadConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def radial_basis(d: Array, n_rbf: int, d_max: float) -> Array:
    """[*] distances -> [*, n_rbf] Gaussians exp(-((d - mu_k) / sigma)^2), mu_k evenly on
    [0, d_max], sigma = d_max / n_rbf."""
    mu = jnp.linspace(0.0, d_max, n_rbf, dtype=jnp.float32)  # [R]
    sigma = d_max / n_rbf
    return jnp.exp(-jnp.square((d[..., None] - mu) / sigma))  # [*, R]


def _masked_mean(x: Array, w: Array) -> Array:
    # x: [*, N, C], w: [*, N] -> [*, C] (an all-zero mask gives 0, not NaN)
    return jnp.sum(x * w[..., None], axis=-2) / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)


class LigandAffinityHead(nn.Module):
    """Ligand graph encoder + ligand-atom -> pocket-residue attention + pooled MLP (float32)."""
    config: LigandHeadConfig = LigandHeadConfig()

    @nn.compact
    def __call__(self, single: Array, seq_mask: Array, pocket_mask: Optional[Array] = None, *,
                 all_atom_positions: Array, all_atom_mask: Array, ligand_atom_feat: Array, ligand_bond_feat: Array,
                 ligand_positions: Array, ligand_mask: Array, deterministic: bool = True) -> Array:
        """single [*, N_res, C_s], seq_mask / pocket_mask [*, N_res], all_atom_positions
        [*, N_res, 37, 3], all_atom_mask [*, N_res, 37], ligand_atom_feat [*, A, F],
        ligand_bond_feat [*, A, A, B], ligand_positions [*, A, 3], ligand_mask [*, A] -> [*]."""
        f32, cfg = jnp.float32, self.config
        lig_mask = ligand_mask.astype(f32)  # [*, A]
        bonds = ligand_bond_feat.astype(f32)  # [*, A, A, B]
        # a bond from a real atom b to atom a (padding atoms have no bonds; masked anyway)
        senders = (jnp.sum(bonds, axis=-1) > 0).astype(f32) * lig_mask[..., None, :]  # [*, A, A]

        # -- ligand graph encoder
        x = Linear(cfg.c_atom, name="atom_embed")(ligand_atom_feat.astype(f32))  # [*, A, c]
        for i in range(cfg.n_mp_layers):
            node = Linear(cfg.c_atom, name=f"mp_{i}_node")(x)  # [*, A, c]
            edge = Linear(cfg.c_atom, use_bias=False, name=f"mp_{i}_edge")(bonds)  # [*, A, A, c]
            msg = jax.nn.relu(node[..., None, :, :] + edge) * senders[..., None]  # [*, A, A, c]
            agg = jnp.sum(msg, axis=-2)  # [*, A, c]
            x = LayerNorm(name=f"mp_{i}_norm")(x + Linear(cfg.c_atom, name=f"mp_{i}_update")(agg))  # [*, A, c]

        # -- interface: ligand atoms attend to pocket residues, biased by pose distances
        s = LayerNorm(name="single_norm")(single.astype(f32))  # [*, N, C_s]
        w = seq_mask.astype(f32)  # [*, N]
        if pocket_mask is not None:
            pocket = pocket_mask.astype(f32) * w  # [*, N]
            w = jnp.where(jnp.sum(pocket, axis=-1, keepdims=True) > 0, pocket, w)  # [*, N]
        pos = all_atom_positions.astype(f32)  # [*, N, 37, 3]
        diff = ligand_positions.astype(f32)[..., :, None, None, :] - pos[..., None, :, :, :]  # [*, A, N, 37, 3]
        d = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + 1e-12)  # [*, A, N, 37]
        present = all_atom_mask.astype(f32)[..., None, :, :] > 0  # [*, 1, N, 37]
        d = jnp.where(present, d, _FAR)  # [*, A, N, 37]
        d_min = jnp.min(d, axis=-1)  # [*, A, N]
        d_ca = d[..., rc.atom_order["CA"]]  # [*, A, N]
        rbf = jnp.concatenate([radial_basis(d_min, cfg.n_rbf, cfg.rbf_max),
                               radial_basis(d_ca, cfg.n_rbf, cfg.rbf_max)], axis=-1)  # [*, A, N, 2R]
        bias = Linear(cfg.n_heads, name="distance_bias")(rbf)  # [*, A, N, H]

        h, c = cfg.n_heads, cfg.c_hidden
        q = Linear(h * c, use_bias=False, name="linear_q")(x)  # [*, A, H*c]
        k = Linear(h * c, use_bias=False, name="linear_k")(s)  # [*, N, H*c]
        v = Linear(h * c, use_bias=False, name="linear_v")(s)  # [*, N, H*c]
        q = q.reshape(q.shape[:-1] + (h, c))  # [*, A, H, c]
        k = k.reshape(k.shape[:-1] + (h, c))  # [*, N, H, c]
        v = v.reshape(v.shape[:-1] + (h, c))  # [*, N, H, c]
        logits = jnp.einsum("...ahc,...nhc->...ahn", q, k) / jnp.sqrt(f32(c))  # [*, A, H, N]
        logits = logits + jnp.swapaxes(bias, -1, -2)  # [*, A, H, N]
        logits = jnp.where(w[..., None, None, :] > 0, logits, -1e9)  # [*, A, H, N]
        attn = jax.nn.softmax(logits, axis=-1)  # [*, A, H, N]
        o = jnp.einsum("...ahn,...nhc->...ahc", attn, v)  # [*, A, H, c]
        o = o.reshape(o.shape[:-2] + (h * c,))  # [*, A, H*c]
        x = LayerNorm(name="interface_norm")(x + Linear(cfg.c_atom, name="linear_o")(o))  # [*, A, c]

        # -- pooling and MLP
        lig = _masked_mean(x, lig_mask)  # [*, c]
        res = Linear(cfg.c_atom, name="residue_proj")(_masked_mean(s, w))  # [*, c]
        z = jnp.concatenate([lig, res], axis=-1)  # [*, 2c]
        z = jax.nn.relu(Linear(cfg.hidden_dim, init="relu", name="linear_1")(z))  # [*, D]
        z = nn.Dropout(cfg.dropout)(z, deterministic=deterministic)  # [*, D]
        return Linear(1, name="linear_2")(z)[..., 0]  # [*]
