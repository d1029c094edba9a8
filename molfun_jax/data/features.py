"""Model features of one example, with OpenFold's names and semantics (numpy, float32 / int32).

`make_features(parse_structure(path))` gives what OpenFold's `data_pipeline` + `feature_pipeline`
(predict mode, randomness off) give for a single-sequence MSA, without the recycling axis and
without their padding rows:
- sequence features: `aatype`, `residue_index`, `seq_mask`, `target_feat` [N, 22];
- MSA features (`sample_msa`, `make_masked_msa`, `nearest_neighbor_clusters`,
  `summarize_clusters`, `crop_extra_msa`, `make_msa_feat` of `openfold.data.data_transforms`):
  `msa_feat` [S, N, 49], `msa_mask` [S, N], `extra_msa` [Se, N], `extra_msa_mask`,
  `extra_has_deletion`, `extra_deletion_value` [Se, N]. A single-sequence MSA has S = 1 (the
  query) and no extra sequence; OpenFold pads those to fixed sizes with zero rows (mask 0): we
  keep one such row, Se = 1, which the model ignores like the others;
- template features of the input structure itself (OpenFold's custom-template path,
  `templates.get_custom_template_features`: the chain's atoms, zero-centred, as template 0), with
  `fix_templates_aatype`, `make_pseudo_beta('template_')`, `atom37_to_torsion_angles('template_')`
  (torsions whose mask is 0 are (0, 0), see `torsion_angles`);
  with templates off: one all-zero template, `template_mask` 0 (T = 1);
- `atom14_atom_exists`, `residx_atom14_to_atom37`, `residx_atom37_to_atom14`,
  `atom37_atom_exists` (`make_atom14_masks`);
- `pocket_mask` [N]: residues with any heavy atom within `pocket_cutoff` of a ligand heavy atom
  (all zero without a ligand).

Residue index: 'structure' (default) numbers residues so that relative positions are right:
+1 between peptide-bonded neighbours, the authors' numbering gap across a chain break (missing
residues), +1 for insertion codes, and `chain_gap` (200, OpenFold's multi-chain gap) between
chains; 'sequential' is OpenFold's `process_pdb` (0..N-1, plus the chain gaps). Torsion angles
treat a residue whose predecessor is not at index - 1 as having none (as a missing residue).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from scipy.spatial import cKDTree

from molfun_jax.data.precomputed import HHBLITS_TO_OURS, align_precomputed
from molfun_jax.data.templates import empty_template_features, template_features
from molfun_jax.feature_schema import Features
from molfun_jax.np import residue_constants as rc

Seed = Optional[Union[int, Sequence[int]]]
RESIDUE_INDEX_MODES = ("structure", "sequential")
_F32, _I32 = np.float32, np.int32


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Options of `make_features`.

    templates: use the input structure as template 0 (on by default).
    max_templates: templates kept (the structure's, then precomputed hits).
    pocket_cutoff: Angstrom, heavy atom to ligand heavy atom.
    residue_index: 'structure' or 'sequential' (see module doc); chain_gap between chains.
    max_msa_clusters / max_extra_msa: MSA rows kept for precomputed MSAs (OpenFold's training
        values; its predict mode uses 512 / 5120).
    masked_msa_fraction: BERT masking of the MSA (OpenFold: 0.15); 0 = off.
    msa_seed: seed of MSA sampling, extra-MSA cropping and masking; None = no shuffling
        (OpenFold's order with its randomness disabled).
    """
    templates: bool = True
    max_templates: int = 4
    pocket_cutoff: float = 8.0
    residue_index: str = "structure"
    chain_gap: int = 200
    max_msa_clusters: int = 128
    max_extra_msa: int = 1024
    masked_msa_fraction: float = 0.0
    msa_seed: Seed = 0

    def __post_init__(self) -> None:
        if self.residue_index not in RESIDUE_INDEX_MODES:
            raise ValueError(f"residue_index={self.residue_index!r}; choose one of {RESIDUE_INDEX_MODES}")
        if self.max_templates < 1 or self.max_msa_clusters < 1 or self.max_extra_msa < 0:
            raise ValueError("max_templates and max_msa_clusters must be >= 1, max_extra_msa >= 0")
        if not 0.0 <= self.masked_msa_fraction <= 1.0:
            raise ValueError(f"masked_msa_fraction must be in [0, 1], got {self.masked_msa_fraction}")
        if self.masked_msa_fraction > 0 and self.msa_seed is None:
            raise ValueError("masked_msa_fraction > 0 needs an msa_seed")


# ---------------------------------------------------------------------------- residue tables
def _atom14_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(restype -> atom14 -> atom37 [21, 14], restype -> atom37 -> atom14 [21, 37], atom14 mask
    [21, 14]) as `data_transforms.make_atom14_masks` builds them (UNK: zeros)."""
    to37, to14, mask14 = [], [], []
    for rt in rc.restypes:
        names = rc.restype_name_to_atom14_names[rc.restype_1to3[rt]]
        to37.append([rc.atom_order[n] if n else 0 for n in names])
        idx14 = {n: i for i, n in enumerate(names)}
        to14.append([idx14.get(n, 0) for n in rc.atom_types])
        mask14.append([1.0 if n else 0.0 for n in names])
    to37.append([0] * 14)
    to14.append([0] * 37)
    mask14.append([0.0] * 14)
    return np.asarray(to37, _I32), np.asarray(to14, _I32), np.asarray(mask14, _F32)


RESTYPE_ATOM14_TO_ATOM37, RESTYPE_ATOM37_TO_ATOM14, RESTYPE_ATOM14_MASK = _atom14_tables()
RESTYPE_ATOM37_MASK = rc.STANDARD_ATOM_MASK.astype(_F32)  # [21, 37]


def _one_hot(x: np.ndarray, n: int) -> np.ndarray:
    return (x[..., None] == np.arange(n)).astype(_F32)


# ---------------------------------------------------------------------------- sequence
def residue_index_feature(parsed: Mapping[str, Any], mode: str = "structure", chain_gap: int = 200) -> np.ndarray:
    """[N] int32 residue index of the model (see module doc)."""
    chain = np.asarray(parsed["chain_index"])
    n = len(chain)
    step = np.ones(n, np.int64)
    step[0] = 0
    if mode == "structure" and n > 1:
        num = np.asarray(parsed["residue_index"], np.int64)
        pos, mask = parsed["atom_positions"], parsed["atom_mask"]
        c, nn = rc.atom_order["C"], rc.atom_order["N"]
        dist = np.linalg.norm(pos[:-1, c] - pos[1:, nn], axis=-1)
        bonded = (mask[:-1, c] > 0) & (mask[1:, nn] > 0) & (dist < 2.0)
        step[1:] = np.where(bonded, 1, np.maximum(num[1:] - num[:-1], 1))
    elif mode not in RESIDUE_INDEX_MODES:
        raise ValueError(f"residue_index={mode!r}; choose one of {RESIDUE_INDEX_MODES}")
    new_chain = np.r_[False, chain[1:] != chain[:-1]]
    step[new_chain] = 1 + chain_gap
    return np.cumsum(step).astype(_I32)


# ---------------------------------------------------------------------------- MSA
def _masked_msa(msa: np.ndarray, profile: np.ndarray, fraction: float, rng: np.random.Generator,
                uniform_prob: float = 0.1, profile_prob: float = 0.1, same_prob: float = 0.1) -> np.ndarray:
    """BERT-style corruption of MSA positions (`data_transforms.make_masked_msa`); 22 = mask token."""
    random_aa = np.asarray([0.05] * 20 + [0.0, 0.0], _F32)
    probs = uniform_prob * random_aa + profile_prob * profile + same_prob * _one_hot(msa, 22)
    mask_prob = 1.0 - profile_prob - same_prob - uniform_prob
    probs = np.concatenate([probs, np.full(probs.shape[:-1] + (1,), mask_prob, _F32)], axis=-1) + 1e-10
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    sampled = np.minimum((cdf < rng.random(msa.shape)[..., None]).sum(-1), 22)
    return np.where(rng.random(msa.shape) < fraction, sampled, msa).astype(_I32)


def msa_features(msa: np.ndarray, deletion_matrix: np.ndarray, aatype: np.ndarray, *,
                 max_msa_clusters: int, max_extra_msa: int, masked_msa_fraction: float = 0.0,
                 rng: Optional[np.random.Generator] = None) -> Features:
    """MSA processing of OpenFold's ensembled transforms, in its order: `sample_msa` (query first,
    the others shuffled by `rng`, or kept in order without), `make_masked_msa`,
    `nearest_neighbor_clusters`, `summarize_clusters`, `crop_extra_msa`, `make_msa_feat`.

    msa: [S, N] int, our restype order (20 = X, 21 = gap); deletion_matrix: [S, N].
    """
    msa = np.asarray(msa, _I32)
    dele = np.asarray(deletion_matrix, _F32)
    n_seq, n_res = msa.shape
    mask = np.ones((n_seq, n_res), _F32)
    profile = _one_hot(msa, 22).mean(axis=0) if masked_msa_fraction > 0 else None  # make_hhblits_profile

    rest = np.arange(1, n_seq) if rng is None else rng.permutation(n_seq - 1) + 1
    order = np.concatenate([[0], rest]).astype(np.int64)
    n_sel = min(max_msa_clusters, n_seq)
    sel, rest = order[:n_sel], order[n_sel:]
    e_msa, e_del, e_mask = msa[rest], dele[rest], mask[rest]
    msa, dele, mask = msa[sel], dele[sel], mask[sel]
    if masked_msa_fraction > 0:
        msa = _masked_msa(msa, profile, masked_msa_fraction, rng)

    # nearest_neighbor_clusters + summarize_clusters (gap agreement weight 0, mask token 0)
    weights = np.asarray([1.0] * 21 + [0.0, 0.0], _F32)
    msa_1hot = _one_hot(msa, 23)
    extra_1hot = e_mask[:, :, None] * _one_hot(e_msa, 23)
    mask_counts = _F32(1e-6) + mask
    msa_sum = msa_1hot.copy()
    del_sum = dele.copy()
    if len(rest):
        agreement = extra_1hot.reshape(len(rest), -1) @ (msa_1hot * mask[:, :, None] * weights).reshape(n_sel, -1).T
        assign = np.argmax(agreement, axis=1)
        counts = np.zeros_like(mask)
        np.add.at(counts, assign, e_mask)
        mask_counts = mask_counts + counts
        np.add.at(msa_sum, assign, extra_1hot)
        del_part = np.zeros_like(dele)
        np.add.at(del_part, assign, e_mask * e_del)
        del_sum = del_part + dele
    cluster_profile = msa_sum / mask_counts[:, :, None]
    cluster_deletion_mean = del_sum / mask_counts

    n_extra = min(max_extra_msa, len(rest))
    pick = (np.arange(len(rest)) if rng is None else rng.permutation(len(rest)))[:n_extra]
    e_msa, e_del, e_mask = e_msa[pick], e_del[pick], e_mask[pick]

    def deletion_value(d: np.ndarray) -> np.ndarray:
        return (np.arctan(d / _F32(3.0)) * _F32(2.0 / np.pi)).astype(_F32)

    msa_feat = np.concatenate([msa_1hot, np.clip(dele, 0.0, 1.0)[..., None], deletion_value(dele)[..., None],
                               cluster_profile, deletion_value(cluster_deletion_mean)[..., None]], axis=-1)
    if n_extra == 0:  # the model needs one (fully masked) extra row, as OpenFold's zero padding
        e_msa, e_del, e_mask = (np.zeros((1, n_res), _I32), np.zeros((1, n_res), _F32), np.zeros((1, n_res), _F32))
    has_break = np.zeros((n_res, 1), _F32)  # between_segment_residues: always 0 for chains
    return {
        "target_feat": np.concatenate([has_break, _one_hot(aatype, 21)], axis=-1),
        "msa_feat": msa_feat.astype(_F32),
        "msa_mask": mask,
        "extra_msa": e_msa.astype(_I32),
        "extra_msa_mask": e_mask.astype(_F32),
        "extra_has_deletion": np.clip(e_del, 0.0, 1.0).astype(_F32),
        "extra_deletion_value": deletion_value(e_del),
    }


# ---------------------------------------------------------------------------- templates
def zero_centered(positions: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Positions with the mean of the present atoms subtracted from the present atoms
    (`mmcif_parsing.get_atom_coords(_zero_center_positions=True)`)."""
    out = np.array(positions, _F32)
    present = np.asarray(mask) > 0
    if present.any():
        out[present] -= out[present].mean(axis=0)
    return out


# ---------------------------------------------------------------------------- pocket
def ligand_distance(parsed: Mapping[str, Any]) -> np.ndarray:
    """[N] distance (Angstrom) from each residue's nearest heavy atom to the nearest ligand heavy
    atom; inf without a ligand."""
    pos, mask = parsed["atom_positions"], parsed["atom_mask"]
    lig = np.asarray(parsed.get("ligand_positions", np.zeros((0, 3))), _F32)
    out = np.full(len(pos), np.inf, np.float64)
    if len(lig) == 0:
        return out
    present = mask > 0
    d, _ = cKDTree(lig).query(pos[present].astype(np.float64), k=1)
    res = np.nonzero(present)[0]
    np.minimum.at(out, res, d)
    return out


def pocket_mask(parsed: Mapping[str, Any], cutoff: float = 8.0) -> np.ndarray:
    """[N] float32: 1 for residues with any heavy atom within `cutoff` of a ligand heavy atom."""
    return (ligand_distance(parsed) <= cutoff).astype(_F32)


# ---------------------------------------------------------------------------- assembly
def make_features(parsed: Mapping[str, Any], precomputed: Optional[Mapping[str, np.ndarray]] = None,
                  config: Optional[FeatureConfig] = None, **overrides: Any) -> Features:
    """One example's model features (names and shapes as `molfun_jax.model.AlphaFold` takes them).

    Args:
        parsed: `parse_structure` output.
        precomputed: OpenFold `data_pipeline` features (`load_precomputed`), raw (aligned here to
            the structure's residues) or already aligned by `align_precomputed`: `msa` [S, N]
            (HHblits ids), `deletion_matrix` [S, N], optional templates (features computed on
            the pipeline's own residues, then mapped). Their templates follow the structure's.
        config: `FeatureConfig`; keyword `overrides` replace its fields (e.g. `templates=False`).
    """
    cfg = dataclasses.replace(config or FeatureConfig(), **overrides)
    if precomputed is not None and "residue_map" not in precomputed:  # raw: map onto the structure
        precomputed = align_precomputed(precomputed, parsed["sequence"], parsed.get("path", "<precomputed>"))
    aatype = np.asarray(parsed["aatype"], _I32)
    n = len(aatype)
    residue_index = residue_index_feature(parsed, cfg.residue_index, cfg.chain_gap)
    rng = None if cfg.msa_seed is None else np.random.default_rng(cfg.msa_seed)

    if precomputed is not None:
        msa = HHBLITS_TO_OURS[np.asarray(precomputed["msa"], np.int64)]
        deletions = np.asarray(precomputed["deletion_matrix"], _F32)
    else:
        msa, deletions = aatype[None], np.zeros((1, n), _F32)
    feats = msa_features(msa, deletions, aatype, max_msa_clusters=cfg.max_msa_clusters,
                         max_extra_msa=cfg.max_extra_msa, masked_msa_fraction=cfg.masked_msa_fraction, rng=rng)

    templates = []
    if cfg.templates:
        has_prev = np.r_[False, np.diff(residue_index) == 1]
        mask = np.asarray(parsed["atom_mask"], _F32)
        templates.append(template_features(aatype[None], zero_centered(parsed["atom_positions"], mask)[None],
                                           mask[None], has_prev))
    if precomputed is not None and len(precomputed.get("template_aatype", ())):
        templates.append({k: v for k, v in precomputed.items() if k.startswith("template_")})
    if templates:
        keys = templates[0].keys()
        feats.update({k: np.concatenate([t[k] for t in templates])[:cfg.max_templates] for k in keys})
    else:
        feats.update(empty_template_features(n))

    feats.update({
        "aatype": aatype,
        "residue_index": residue_index,
        "seq_mask": np.ones(n, _F32),
        "atom14_atom_exists": RESTYPE_ATOM14_MASK[aatype],
        "residx_atom14_to_atom37": RESTYPE_ATOM14_TO_ATOM37[aatype],
        "residx_atom37_to_atom14": RESTYPE_ATOM37_TO_ATOM14[aatype],
        "atom37_atom_exists": RESTYPE_ATOM37_MASK[aatype],
        "pocket_mask": pocket_mask(parsed, cfg.pocket_cutoff),
    })
    return feats
