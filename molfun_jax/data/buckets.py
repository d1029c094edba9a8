"""Length buckets, cropping, padding and collation, so that training compiles one program per
bucket (and per fixed MSA / template depth) rather than one per protein length.

Padding is with zeros everywhere (masks 0, as OpenFold's `make_fixed_size`); every feature's
axes are listed in `FEATURE_AXES`: N residues, S MSA rows, E extra-MSA rows, T templates,
'.' a fixed size.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

DEFAULT_BUCKETS = (64, 128, 256, 384, 512)
CROP_MODES = ("spatial", "contiguous")

FEATURE_AXES = {
    "aatype": "N", "residue_index": "N", "seq_mask": "N", "pocket_mask": "N", "target_feat": "N.",
    "atom14_atom_exists": "N.", "residx_atom14_to_atom37": "N.", "residx_atom37_to_atom14": "N.",
    "atom37_atom_exists": "N.",
    "msa_feat": "SN.", "msa_mask": "SN",
    "extra_msa": "EN", "extra_msa_mask": "EN", "extra_has_deletion": "EN", "extra_deletion_value": "EN",
    "template_aatype": "TN", "template_all_atom_positions": "TN..", "template_all_atom_mask": "TN.",
    "template_mask": "T", "template_pseudo_beta": "TN.", "template_pseudo_beta_mask": "TN",
    "template_torsion_angles_sin_cos": "TN..", "template_alt_torsion_angles_sin_cos": "TN..",
    "template_torsion_angles_mask": "TN.",
}
Features = dict[str, np.ndarray]


def bucket_length(n_res: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> Optional[int]:
    """The smallest bucket >= n_res, or None when n_res is longer than the largest."""
    fits = [b for b in sorted(buckets) if b >= n_res]
    return fits[0] if fits else None


def crop_indices(n_res: int, size: int, mode: str = "spatial", ligand_distance: Optional[np.ndarray] = None,
                 pocket_cutoff: float = 8.0) -> np.ndarray:
    """Sorted indices of the residues kept when cropping `n_res` residues to `size`.

    'spatial': the `size` residues nearest the ligand (by `ligand_distance`, ties in sequence
    order); 'contiguous': a window centred on the pocket (residues within `pocket_cutoff`, else
    the residue nearest the ligand). Without a ligand both take the first `size` residues.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}; choose one of {CROP_MODES}")
    if n_res <= size:
        return np.arange(n_res)
    dist = np.full(n_res, np.inf) if ligand_distance is None else np.asarray(ligand_distance, np.float64)
    if not np.isfinite(dist).any():
        return np.arange(size)
    if mode == "spatial":
        return np.sort(np.argsort(dist, kind="stable")[:size])
    pocket = np.flatnonzero(dist <= pocket_cutoff)
    center = (pocket[0] + pocket[-1]) // 2 if len(pocket) else int(np.argmin(dist))
    start = int(np.clip(center - size // 2, 0, n_res - size))
    return np.arange(start, start + size)


def crop_features(feats: Mapping[str, np.ndarray], indices: np.ndarray) -> Features:
    """The features of the residues `indices` (other keys unchanged)."""
    out = {}
    for k, v in feats.items():
        axes = FEATURE_AXES.get(k)
        out[k] = np.take(v, indices, axis=axes.index("N")) if axes and "N" in axes else v
    return out


def pad_features(feats: Mapping[str, np.ndarray], n_res: int, n_msa: Optional[int] = None,
                 n_extra: Optional[int] = None, n_templ: Optional[int] = None) -> Features:
    """Zero-pad the residue axis to `n_res` and, when given, the MSA / extra-MSA / template
    axes to `n_msa` / `n_extra` / `n_templ` (other keys unchanged)."""
    sizes = {"N": n_res, "S": n_msa, "E": n_extra, "T": n_templ}
    out = {}
    for k, v in feats.items():
        axes = FEATURE_AXES.get(k)
        if axes is None:
            out[k] = v
            continue
        pad = []
        for ax, dim in zip(axes, v.shape):
            want = sizes.get(ax)
            if want is not None and dim > want:
                raise ValueError(f"{k}: axis {ax} has {dim} > {want} (crop before padding)")
            pad.append((0, (want - dim) if want is not None else 0))
        out[k] = np.pad(v, pad) if any(p for _, p in pad) else v
    return out


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> Features:
    """Stack examples of one bucket (same keys and shapes) along a new leading batch axis."""
    if not examples:
        raise ValueError("collate: no examples")
    keys = set(examples[0])
    for i, ex in enumerate(examples[1:], 1):
        if set(ex) != keys:
            raise ValueError(f"collate: example {i} has keys {sorted(set(ex) ^ keys)} that example 0 "
                             "does not share (or lacks)")
        for k in keys:
            if np.shape(ex[k]) != np.shape(examples[0][k]):
                raise ValueError(f"collate: {k} has shape {np.shape(ex[k])} in example {i} but "
                                 f"{np.shape(examples[0][k])} in example 0 (different buckets?)")
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}
