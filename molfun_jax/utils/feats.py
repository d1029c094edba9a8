"""Frames and atom positions from torsion angles (OpenFold `openfold/utils/feats.py`):
all-atom frames [Algorithm 24], atom14 positions from literature coordinates, atom14 -> atom37.
Residue tables come from `molfun_jax.np.residue_constants` (indexed by aatype, 0..20)."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from molfun_jax.np import residue_constants as rc
from molfun_jax.utils.rigid_utils import Rigid, stack_matrix

Array = jax.Array


def torsion_angles_to_frames(r: Rigid, alpha: Array, aatype: Array) -> Rigid:
    """Backbone frames r [*, N] and torsion angles alpha [*, N, 7, 2] (sin, cos) -> the 8 rigid
    group frames in the global frame [*, N, 8] [Algorithm 24, lines 1-10]."""
    # [*, N, 8] default frames of each rigid group w.r.t. its parent
    default_r = Rigid.from_tensor_4x4(jnp.asarray(rc.restype_rigid_group_default_frame)[aatype])

    # [*, N, 8, 2]: the backbone group gets the identity rotation (sin 0, cos 1)
    bb_rot = jnp.broadcast_to(jnp.array([0.0, 1.0], alpha.dtype), alpha.shape[:-2] + (1, 2))
    alpha = jnp.concatenate([bb_rot, alpha], axis=-2)

    # [*, N, 8, 3, 3] rotations about x: [[1, 0, 0], [0, cos, -sin], [0, sin, cos]]
    sin, cos = alpha[..., 0], alpha[..., 1]
    all_rots = Rigid(stack_matrix([[1, 0, 0], [0, cos, -1 * sin], [0, sin, cos]], sin),
                     jnp.zeros(sin.shape + (3,), sin.dtype))
    all_frames = default_r.compose(all_rots)

    chi1_frame_to_bb = all_frames[..., 4]
    chi2_frame_to_bb = chi1_frame_to_bb.compose(all_frames[..., 5])
    chi3_frame_to_bb = chi2_frame_to_bb.compose(all_frames[..., 6])
    chi4_frame_to_bb = chi3_frame_to_bb.compose(all_frames[..., 7])

    all_frames_to_bb = Rigid.cat([all_frames[..., :5], chi2_frame_to_bb[..., None],
                                  chi3_frame_to_bb[..., None], chi4_frame_to_bb[..., None]], axis=-1)
    return r[..., None].compose(all_frames_to_bb)


def frames_and_literature_positions_to_atom14_pos(r: Rigid, aatype: Array) -> Array:
    """Group frames r [*, N, 8] -> atom14 positions [*, N, 14, 3] (literature coordinates placed
    in each atom's group frame; absent atoms are zero) [Algorithm 24, line 11]."""
    # [*, N, 14] rigid group of each atom
    group_idx = jnp.asarray(rc.restype_atom14_to_rigid_group)[aatype]
    # [*, N, 14] frame of each atom's group (a gather: OpenFold's one-hot sum)
    t_atoms_to_global = Rigid(jnp.take_along_axis(r.rots, group_idx[..., None, None], axis=-3),
                              jnp.take_along_axis(r.trans, group_idx[..., None], axis=-2))
    atom_mask = jnp.asarray(rc.restype_atom14_mask)[aatype][..., None]  # [*, N, 14, 1]
    lit_positions = jnp.asarray(rc.restype_atom14_rigid_group_positions)[aatype]  # [*, N, 14, 3]
    return t_atoms_to_global.apply(lit_positions) * atom_mask


def atom14_to_atom37(atom14: Array, batch: Mapping[str, Array]) -> Array:
    """Atom14 data [*, N, 14, C] -> atom37 [*, N, 37, C] using `residx_atom37_to_atom14` and
    zeroing atoms absent from the residue (`atom37_atom_exists`)."""
    idx = batch["residx_atom37_to_atom14"]  # [*, N, 37]
    idx = idx.reshape((1,) * (atom14.ndim - idx.ndim - 1) + idx.shape + (1,))
    atom37 = jnp.take_along_axis(atom14, idx, axis=-2)
    return atom37 * batch["atom37_atom_exists"][..., None].astype(atom37.dtype)
