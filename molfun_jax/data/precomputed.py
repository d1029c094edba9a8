"""Precomputed OpenFold features: the raw `data_pipeline` dict (`aatype`, `msa`,
`deletion_matrix_int`, `template_*`, ...) as OpenFold pickles it (`{pdb_id}.pkl`), or the same
arrays in an `.npz`, aligned to the residues of the structure.

Security: unpickling can run arbitrary code. `load_precomputed` unpickles only the file it is
given; point it (and `AffinityDataset.from_csv(features_dir=...)`) only at feature files you made
or trust. `.npz` files are read with `allow_pickle=False` and are safe to load from anywhere.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
from Bio import Align

from molfun_jax.data.errors import StructureError
from molfun_jax.data.templates import template_features
from molfun_jax.np import residue_constants as rc

PathLike = Union[str, Path]
FEATURE_SUFFIXES = (".pkl", ".npz")
HHBLITS_TO_OURS = np.asarray(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, np.int32)  # [22] HHblits id -> restype
MIN_IDENTITY = 0.9  # aligned structure residues identical to the features' sequence (X matches all)


def load_precomputed(path: PathLike) -> dict[str, np.ndarray]:
    """Read a raw OpenFold feature dict from `.pkl` (pickle: trusted files only) or `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise StructureError(path, "precomputed feature file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                feats = {k: z[k] for k in z.files}
        elif path.suffix == ".pkl":
            with path.open("rb") as f:
                feats = pickle.load(f)  # noqa: S301 (the user's own feature folder; see module doc)
        else:
            raise StructureError(path, f"unknown feature file type {path.suffix!r} (expected .pkl or .npz)")
    except StructureError:
        raise
    except Exception as e:  # unpickling / zip errors come in many types
        raise StructureError(path, f"cannot read precomputed features: {type(e).__name__}: {e}") from None
    if not isinstance(feats, Mapping):
        raise StructureError(path, f"precomputed features are a {type(feats).__name__}, not a dict")
    if "msa" not in feats:
        hint = " (these look like processed features; give the raw data_pipeline dict)" if "msa_feat" in feats else ""
        raise StructureError(path, f"no 'msa' in precomputed features{hint}; keys: {sorted(feats)[:12]}")
    if "deletion_matrix_int" not in feats and "deletion_matrix" not in feats:
        raise StructureError(path, "no 'deletion_matrix_int' (or 'deletion_matrix') in precomputed features")
    return dict(feats)


def precomputed_sequence(feats: Mapping[str, Any]) -> str:
    """The query sequence of a raw feature dict (from `aatype`, else the MSA's first row)."""
    if "aatype" in feats:
        aatype = np.asarray(feats["aatype"])
        aatype = aatype.argmax(-1) if aatype.ndim == 2 else aatype
        return "".join(rc.restypes_with_x[min(int(a), 20)] for a in aatype)
    return "".join(rc.ID_TO_HHBLITS_AA[int(a)] for a in np.asarray(feats["msa"])[0])


def residue_map(source: str, target: str, path: PathLike, min_identity: float = MIN_IDENTITY) -> np.ndarray:
    """[len(target)] index into `source` of each residue of `target` (the structure's sequence),
    by global alignment with free end gaps; every target residue must be aligned and
    `min_identity` of them identical (X matches anything)."""
    if source == target:
        return np.arange(len(target))
    aligner = Align.PairwiseAligner(mode="global", match_score=1.0, mismatch_score=-1.0, open_gap_score=-3.0,
                                    extend_gap_score=-0.5, end_gap_score=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aln = aligner.align(source, target)[0]
    cols = np.full(len(target), -1)
    for (s0, s1), (t0, t1) in zip(*aln.aligned):
        cols[t0:t1] = np.arange(s0, s1)
    n_aligned = int(np.sum(cols >= 0))
    same = sum(1 for t, c in enumerate(cols) if c >= 0 and (source[c] == target[t] or "X" in (source[c], target[t])))
    if n_aligned < len(target) or same < min_identity * len(target):
        raise StructureError(path, f"precomputed features' sequence ({len(source)} residues) does not match the "
                                   f"structure ({len(target)} residues): {n_aligned} aligned, {same} identical; "
                                   f"select the chain(s) the features were made for")
    return cols


def align_precomputed(feats: Mapping[str, Any], sequence: str, path: PathLike) -> dict[str, np.ndarray]:
    """The raw features mapped onto the structure's residues (`sequence`), for `make_features`:
    `residue_map` [N] (the features' residue of each structure residue), `msa` [S, N] (HHblits
    ids), `deletion_matrix` [S, N], and, when the features have templates, their model template
    features (computed on the features' own residues, as OpenFold does, then mapped)."""
    cols = residue_map(precomputed_sequence(feats), sequence, path)
    msa = np.asarray(feats["msa"])
    dele = np.asarray(feats.get("deletion_matrix_int", feats.get("deletion_matrix")), np.float32)
    if msa.ndim != 2 or dele.shape != msa.shape or msa.shape[0] == 0:
        raise StructureError(path, f"bad MSA shapes: msa {msa.shape}, deletion matrix {dele.shape}")
    out = {"residue_map": cols, "msa": msa[:, cols].astype(np.int32), "deletion_matrix": dele[:, cols]}
    t_aatype = np.asarray(feats.get("template_aatype", np.zeros((0,))))
    if t_aatype.ndim >= 2 and t_aatype.shape[0] > 0:
        ids = t_aatype.argmax(-1) if t_aatype.ndim == 3 else t_aatype  # one-hot in HHblits order
        mask = feats.get("template_all_atom_mask", feats.get("template_all_atom_masks"))
        if mask is None or "template_all_atom_positions" not in feats:
            raise StructureError(path, "template_aatype without template_all_atom_positions / _mask")
        t = template_features(HHBLITS_TO_OURS[ids.astype(np.int64)], np.asarray(feats["template_all_atom_positions"]),
                              np.asarray(mask))
        out.update({k: (v if k == "template_mask" else v[:, cols]) for k, v in t.items()})
    return out
