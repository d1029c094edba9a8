"""The demo's synthetic data (`train.py --demo`): random sequences on ideal alpha helices with a
learnable pKd-like target, in `parse_structure`'s layout and featurised like real structures."""
from __future__ import annotations

from typing import Any

import numpy as np

from molfun_jax.data.features import make_features
from molfun_jax.np import residue_constants as rc

Example = dict[str, Any]
DEMO_TRAIN, DEMO_VAL, DEMO_LEN = 6, 2, 32
HYDROPHOBIC = frozenset("AVILMFWC")


def synthetic_structure(n_res: int, rng: np.random.Generator) -> dict[str, Any]:
    """A random sequence on an ideal alpha helix (N, CA, C, CB from residue_constants' backbone
    frame; glycine without CB): `parse_structure`'s layout."""
    aatype = rng.integers(0, 20, n_res).astype(np.int32)
    t = np.arange(n_res) * np.deg2rad(100.0)
    ca = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(n_res)], -1)
    pos = np.zeros((n_res, 37, 3), np.float32)
    mask = np.zeros((n_res, 37), np.float32)
    for i in range(n_res):
        prev, nxt = ca[max(i - 1, 0)], ca[min(i + 1, n_res - 1)]
        e1 = nxt - prev
        e1 /= np.linalg.norm(e1)
        v = ca[i] - 0.5 * (prev + nxt)
        e2 = v - e1 * (v @ e1)
        e2 /= np.linalg.norm(e2) if np.linalg.norm(e2) > 0 else 1.0
        rot = np.stack([e1, e2, np.cross(e1, e2)], -1)  # columns: local x, y, z
        name = rc.restype_1to3[rc.restypes[aatype[i]]]
        for atom, group, xyz in rc.rigid_group_atom_positions[name]:
            if group == 0:
                pos[i, rc.atom_order[atom]] = ca[i] + rot @ np.asarray(xyz)
                mask[i, rc.atom_order[atom]] = 1.0
    seq = "".join(rc.restypes[a] for a in aatype)
    return {"aatype": aatype, "atom_positions": pos, "atom_mask": mask, "residue_index": np.arange(1, n_res + 1),
            "chain_index": np.zeros(n_res, np.int32), "sequence": seq, "ligand_positions": np.zeros((0, 3), np.float32)}


def demo_data(seed: int = 0, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL,
              n_res: int = DEMO_LEN) -> tuple[list[Example], list[Example]]:
    """Synthetic examples: random helical chains of `n_res` residues; target (a pKd-like number)
    = 6 + 8 * (hydrophobic fraction - 0.4) + noise(0.2), so the composition is learnable. The
    validation chains are spread over the inner target range (every k-th by target, ends excluded),
    so that 2 of them are representative."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n_train + n_val):
        s = synthetic_structure(n_res, rng)
        frac = np.mean([c in HYDROPHOBIC for c in s["sequence"]])
        ex = make_features(s)
        ex["target"] = np.float32(6.0 + 8.0 * (frac - 0.4) + 0.2 * rng.standard_normal())
        ex["pdb_id"] = f"synthetic_{i:02d}"
        out.append(ex)
    order = np.argsort([float(e["target"]) for e in out], kind="stable")
    val_idx = set(order[np.linspace(1, len(out) - 2, n_val).round().astype(int)].tolist()) if n_val else set()
    return [e for i, e in enumerate(out) if i not in val_idx], [e for i, e in enumerate(out) if i in val_idx]
