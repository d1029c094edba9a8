"""Template and extra-MSA feature builders (OpenFold `openfold/utils/feats.py`): pseudo-beta
positions, template angle / pair features [Algorithm 2, lines 7-9] and the extra-MSA feature.

Geometry is float32 (frames from `molfun_jax.utils.rigid_utils`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp

from molfun_jax.np import residue_constants as rc
from molfun_jax.utils.rigid_utils import Rigid

Array = jax.Array


def pseudo_beta_fn(aatype: Array, all_atom_positions: Array,
                   all_atom_masks: Optional[Array]) -> Union[Array, tuple[Array, Array]]:
    """CB position (CA for glycine) [*, N_res, 3], and its mask [*, N_res] when masks are given."""
    is_gly = aatype == rc.restype_order["G"]  # [*, N_res]
    ca_idx, cb_idx = rc.atom_order["CA"], rc.atom_order["CB"]
    pseudo_beta = jnp.where(is_gly[..., None], all_atom_positions[..., ca_idx, :],
                            all_atom_positions[..., cb_idx, :])
    if all_atom_masks is None:
        return pseudo_beta
    pseudo_beta_mask = jnp.where(is_gly, all_atom_masks[..., ca_idx], all_atom_masks[..., cb_idx])
    return pseudo_beta, pseudo_beta_mask


def build_template_angle_feat(template_feats: Mapping[str, Array]) -> Array:
    """[*, N_templ, N_res, 57]: aatype one-hot (22), torsion sin/cos (14), alt. torsion sin/cos
    (14) and torsion mask (7)."""
    sin_cos = template_feats["template_torsion_angles_sin_cos"]  # [*, N_templ, N_res, 7, 2]
    alt_sin_cos = template_feats["template_alt_torsion_angles_sin_cos"]
    return jnp.concatenate([
        jax.nn.one_hot(template_feats["template_aatype"], 22, dtype=jnp.float32),
        sin_cos.reshape(sin_cos.shape[:-2] + (14,)).astype(jnp.float32),
        alt_sin_cos.reshape(alt_sin_cos.shape[:-2] + (14,)).astype(jnp.float32),
        template_feats["template_torsion_angles_mask"].astype(jnp.float32),
    ], axis=-1)


def build_template_pair_feat(batch: Mapping[str, Array], min_bin: float, max_bin: float,
                             no_bins: int, use_unit_vector: bool = False, eps: float = 1e-20,
                             inf: float = 1e8) -> Array:
    """[*, N_res, N_res, no_bins + 49] template pair feature of ONE template per leading index:
    pseudo-beta distogram (squared-distance bins, last capped by `inf`), pseudo-beta pair mask,
    aatype one-hots of j and i, unit vectors to j in i's backbone frame (zeroed unless
    `use_unit_vector`, as OpenFold v1), backbone pair mask; all masked by the backbone pair mask."""
    template_mask = batch["template_pseudo_beta_mask"].astype(jnp.float32)  # [*, N_res]
    template_mask_2d = template_mask[..., None] * template_mask[..., None, :]  # [*, N_res, N_res]

    tpb = batch["template_pseudo_beta"].astype(jnp.float32)  # [*, N_res, 3]
    # [*, N_res, N_res, 1]
    dgram = jnp.sum((tpb[..., None, :] - tpb[..., None, :, :]) ** 2, axis=-1, keepdims=True)
    lower = jnp.linspace(min_bin, max_bin, no_bins, dtype=jnp.float32) ** 2
    upper = jnp.concatenate([lower[1:], jnp.array([inf], jnp.float32)], axis=-1)
    dgram = ((dgram > lower) & (dgram < upper)).astype(jnp.float32)  # [*, N_res, N_res, no_bins]

    to_concat = [dgram, template_mask_2d[..., None]]

    aatype_one_hot = jax.nn.one_hot(batch["template_aatype"], rc.restype_num + 2, dtype=jnp.float32)
    n_res = aatype_one_hot.shape[-2]
    pair_shape = aatype_one_hot.shape[:-2] + (n_res, n_res, aatype_one_hot.shape[-1])
    to_concat.append(jnp.broadcast_to(aatype_one_hot[..., None, :, :], pair_shape))  # aatype[j]
    to_concat.append(jnp.broadcast_to(aatype_one_hot[..., :, None, :], pair_shape))  # aatype[i]

    n, ca, c = (rc.atom_order[a] for a in ("N", "CA", "C"))
    pos = batch["template_all_atom_positions"].astype(jnp.float32)  # [*, N_res, 37, 3]
    frames = Rigid.make_transform_from_reference(pos[..., n, :], pos[..., ca, :], pos[..., c, :], eps=eps)
    # [*, N_res(i), N_res(j), 3]: R_i^T (t_j - t_i)
    rigid_vec = frames[..., None].invert_apply(frames.trans[..., None, :, :])

    inv_distance_scalar = jax.lax.rsqrt(eps + jnp.sum(rigid_vec ** 2, axis=-1))  # [*, N_res, N_res]

    t_aa_masks = batch["template_all_atom_mask"].astype(jnp.float32)
    template_mask = t_aa_masks[..., n] * t_aa_masks[..., ca] * t_aa_masks[..., c]
    template_mask_2d = template_mask[..., None] * template_mask[..., None, :]

    inv_distance_scalar = inv_distance_scalar * template_mask_2d
    unit_vector = rigid_vec * inv_distance_scalar[..., None]
    if not use_unit_vector:
        unit_vector = unit_vector * 0.0

    to_concat.extend(unit_vector[..., i:i + 1] for i in range(3))
    to_concat.append(template_mask_2d[..., None])

    act = jnp.concatenate(to_concat, axis=-1)
    return act * template_mask_2d[..., None]


def build_extra_msa_feat(batch: Mapping[str, Array]) -> Array:
    """[*, N_extra_seq, N_res, 25]: residue one-hot (23), has-deletion, deletion value."""
    return jnp.concatenate([
        jax.nn.one_hot(batch["extra_msa"], 23, dtype=jnp.float32),
        batch["extra_has_deletion"][..., None].astype(jnp.float32),
        batch["extra_deletion_value"][..., None].astype(jnp.float32),
    ], axis=-1)
