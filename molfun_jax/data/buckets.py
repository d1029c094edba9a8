"""Length buckets, cropping, padding and collation, so that training compiles one program per
bucket (and per fixed MSA / template depth) rather than one per protein length.

Padding is with zeros everywhere (masks 0, as OpenFold's `make_fixed_size`). Which axis of a
feature is padded or cropped comes from its shape in the feature schema
(`molfun_jax.feature_schema`); a feature the schema does not declare is an error.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from molfun_jax.feature_schema import (FEATURE_SCHEMA, N_EXTRA, N_RES, N_SEQ, N_TEMPL, Features,
                                     FeatureSchema, FeatureSpec)

DEFAULT_BUCKETS = (64, 128, 256, 384, 512)
CROP_MODES = ("spatial", "contiguous")


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


def _checked_spec(schema: FeatureSchema, name: str, value: np.ndarray) -> FeatureSpec:
    spec = schema.spec(name)
    if np.ndim(value) != len(spec.shape):
        raise ValueError(f"feature {name!r} has shape {np.shape(value)}; the feature schema says {spec.shape}")
    return spec


def crop_features(feats: Mapping[str, np.ndarray], indices: np.ndarray,
                  schema: FeatureSchema = FEATURE_SCHEMA) -> Features:
    """The features of the residues `indices`, along each feature's `schema.cropped_dim` axis
    (features without one unchanged)."""
    out = {}
    for k, v in feats.items():
        axis = _checked_spec(schema, k, v).axis(schema.cropped_dim)
        out[k] = np.take(v, indices, axis=axis) if axis >= 0 else v
    return out


def pad_features(feats: Mapping[str, np.ndarray], n_res: Optional[int], n_msa: Optional[int] = None,
                 n_extra: Optional[int] = None, n_templ: Optional[int] = None, *,
                 sizes: Optional[Mapping[str, int]] = None, schema: FeatureSchema = FEATURE_SCHEMA) -> Features:
    """Zero-pad the residue axis to `n_res` (None: as it is) and, when given, the MSA /
    extra-MSA / template axes to `n_msa` / `n_extra` / `n_templ`; `sizes` gives targets of other
    padded dims of the schema by name. Axes without a target keep their size."""
    want = {N_RES: n_res, N_SEQ: n_msa, N_EXTRA: n_extra, N_TEMPL: n_templ, **(sizes or {})}
    unknown = sorted(set(want) - set(schema.padded_dims))
    if unknown:
        raise ValueError(f"pad_features: {unknown} are not padded dims of the schema {schema.padded_dims}")
    out = {}
    for k, v in feats.items():
        pad = []
        for dim, size in zip(_checked_spec(schema, k, v).shape, np.shape(v)):
            target = want.get(dim) if isinstance(dim, str) else None
            if target is not None and size > target:
                raise ValueError(f"{k}: axis {dim} has {size} > {target} (crop before padding)")
            pad.append((0, target - size if target is not None else 0))
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
