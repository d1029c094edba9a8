"""Template features (OpenFold `data_transforms`: `make_pseudo_beta('template_')`,
`atom37_to_torsion_angles('template_')`) of template structures, and the all-zero template that
stands for templates off (derived from the feature schema)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from molfun_jax.feature_schema import FEATURE_SCHEMA, N_RES, N_TEMPL, Features, FeatureSchema
from molfun_jax.np import residue_constants as rc

_F32, _I32 = np.float32, np.int32


def _chi_atom_indices() -> np.ndarray:
    """[21, 4, 4] atom37 indices of the chi-angle atoms (`data_transforms.get_chi_atom_indices`)."""
    out = []
    for r in rc.restypes:
        chis = [[rc.atom_order[a] for a in chi] for chi in rc.chi_angles_atoms[rc.restype_1to3[r]]]
        out.append(chis + [[0, 0, 0, 0]] * (4 - len(chis)))
    out.append([[0, 0, 0, 0]] * 4)
    return np.asarray(out, np.int64)


CHI_ATOM_INDICES = _chi_atom_indices()
CHI_ANGLES_MASK = np.asarray(list(rc.chi_angles_mask) + [[0.0] * 4], _F32)  # [21, 4]
CHI_PI_PERIODIC = np.asarray(rc.chi_pi_periodic, _F32)  # [21, 4]


def pseudo_beta(aatype: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CB (CA for glycine) position [*, N, 3] and mask [*, N] (`data_transforms.pseudo_beta_fn`)."""
    is_gly = aatype == rc.restype_order["G"]
    ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
    pos = np.where(is_gly[..., None], positions[..., ca, :], positions[..., cb, :])
    return pos.astype(_F32), np.where(is_gly, mask[..., ca], mask[..., cb]).astype(_F32)


def torsion_angles(aatype: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                   has_prev: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sin/cos [*, N, 7, 2], alternative sin/cos [*, N, 7, 2], mask [*, N, 7]) of the torsions
    pre-omega, phi, psi, chi1-4 (`data_transforms.atom37_to_torsion_angles`, float32, same
    operation order). `has_prev` [N] (default: all but the first) says whether residue i - 1 is
    residue i's predecessor; where not, it counts as missing. Where the mask is 0, sin/cos are 0:
    OpenFold computes them from the zero coordinates of missing atoms, which for a degenerate
    frame (e.g. the first residue's pre-omega) is float rounding noise of either sign."""
    aatype = np.minimum(aatype, 20)
    pos = np.asarray(positions, _F32)
    mask = np.asarray(mask, _F32)
    prev_pos = np.concatenate([np.zeros_like(pos[..., :1, :, :]), pos[..., :-1, :, :]], axis=-3)
    prev_mask = np.concatenate([np.zeros_like(mask[..., :1, :]), mask[..., :-1, :]], axis=-2)
    if has_prev is not None:
        keep = np.asarray(has_prev, bool)
        prev_pos = prev_pos * keep[:, None, None]
        prev_mask = prev_mask * keep[:, None]

    pre_omega_pos = np.concatenate([prev_pos[..., 1:3, :], pos[..., :2, :]], axis=-2)  # CA-, C-, N, CA
    phi_pos = np.concatenate([prev_pos[..., 2:3, :], pos[..., :3, :]], axis=-2)  # C-, N, CA, C
    psi_pos = np.concatenate([pos[..., :3, :], pos[..., 4:5, :]], axis=-2)  # N, CA, C, O
    pre_omega_mask = np.prod(prev_mask[..., 1:3], axis=-1) * np.prod(mask[..., :2], axis=-1)
    phi_mask = prev_mask[..., 2] * np.prod(mask[..., :3], axis=-1)
    psi_mask = np.prod(mask[..., :3], axis=-1) * mask[..., 4]

    idx = CHI_ATOM_INDICES[aatype].reshape(aatype.shape + (16,))  # [*, N, 4 chis x 4 atoms]
    chis_pos = np.take_along_axis(pos, idx[..., None], axis=-2).reshape(aatype.shape + (4, 4, 3))
    chis_atom_mask = np.take_along_axis(mask, idx, axis=-1).reshape(aatype.shape + (4, 4))
    chis_mask = CHI_ANGLES_MASK[aatype] * np.prod(chis_atom_mask, axis=-1)

    atoms = np.concatenate([pre_omega_pos[..., None, :, :], phi_pos[..., None, :, :], psi_pos[..., None, :, :],
                            chis_pos], axis=-3)  # [*, N, 7, 4, 3]
    torsion_mask = np.concatenate([pre_omega_mask[..., None], phi_mask[..., None], psi_mask[..., None], chis_mask],
                                  axis=-1)

    # Rigid.from_3_points(p_neg_x_axis=atom 1, origin=atom 2, p_xy_plane=atom 0), eps 1e-8
    eps = _F32(1e-8)
    p_neg_x, origin, p_xy = atoms[..., 1, :], atoms[..., 2, :], atoms[..., 0, :]
    e0 = [origin[..., i] - p_neg_x[..., i] for i in range(3)]
    e1 = [p_xy[..., i] - origin[..., i] for i in range(3)]
    denom = np.sqrt(e0[0] * e0[0] + e0[1] * e0[1] + e0[2] * e0[2] + eps)
    e0 = [c / denom for c in e0]
    dot = e0[0] * e1[0] + e0[1] * e1[1] + e0[2] * e1[2]
    e1 = [c2 - c1 * dot for c1, c2 in zip(e0, e1)]
    denom = np.sqrt(e1[0] * e1[0] + e1[1] * e1[1] + e1[2] * e1[2] + eps)
    e1 = [c / denom for c in e1]
    e2 = [e0[1] * e1[2] - e0[2] * e1[1], e0[2] * e1[0] - e0[0] * e1[2], e0[0] * e1[1] - e0[1] * e1[0]]
    # frame.invert().apply(atom 3): rows of R^T are e0, e1, e2; translation -R^T origin
    x = atoms[..., 3, :]

    def rot(e: list) -> tuple[np.ndarray, np.ndarray]:
        return (e[0] * x[..., 0] + e[1] * x[..., 1] + e[2] * x[..., 2],
                e[0] * origin[..., 0] + e[1] * origin[..., 1] + e[2] * origin[..., 2])

    (y_x, y_t), (z_x, z_t) = rot(e1), rot(e2)
    sin_cos = np.stack([z_x + _F32(-1.0) * z_t, y_x + _F32(-1.0) * y_t], axis=-1)
    sin_cos = sin_cos / np.sqrt(np.sum(np.square(sin_cos), axis=-1, keepdims=True) + eps)
    sin_cos = sin_cos * np.asarray([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0], _F32)[:, None]
    sin_cos = sin_cos * torsion_mask[..., None]
    mirror = np.concatenate([np.ones(aatype.shape + (3,), _F32), 1.0 - 2.0 * CHI_PI_PERIODIC[aatype]], axis=-1)
    alt = sin_cos * mirror[..., None]
    return sin_cos.astype(_F32), alt.astype(_F32), torsion_mask.astype(_F32)


def template_features(aatype: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                      has_prev: Optional[np.ndarray] = None) -> Features:
    """Model template features of T templates: aatype [T, N] (our order), positions
    [T, N, 37, 3], mask [T, N, 37]."""
    aatype = np.asarray(aatype, _I32)
    pb, pb_mask = pseudo_beta(aatype, positions, mask)
    sin_cos, alt, tmask = torsion_angles(aatype, positions, mask, has_prev)
    return {
        "template_aatype": aatype,
        "template_all_atom_positions": np.asarray(positions, _F32),
        "template_all_atom_mask": np.asarray(mask, _F32),
        "template_mask": np.ones(aatype.shape[:1], _F32),
        "template_pseudo_beta": pb,
        "template_pseudo_beta_mask": pb_mask,
        "template_torsion_angles_sin_cos": sin_cos,
        "template_alt_torsion_angles_sin_cos": alt,
        "template_torsion_angles_mask": tmask,
    }

def empty_template_features(n_res: int, schema: FeatureSchema = FEATURE_SCHEMA) -> Features:
    """One all-zero template (`template_mask` 0, templates off): every feature of `schema` with
    a template axis, with N_templ = 1 and N_res = `n_res`."""
    return schema.zeros(schema.names_with(N_TEMPL), {N_TEMPL: 1, N_RES: n_res})
