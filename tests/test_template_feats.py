"""Template / extra-MSA feature builders vs OpenFold's `openfold.utils.feats` on real structures."""
import gzip

import numpy as np
import pytest

from molfun_jax.np import residue_constants as rc
from molfun_jax.utils.template_feats import (build_extra_msa_feat, build_template_angle_feat,
                                             build_template_pair_feat,
                                             pseudo_beta_fn)
from tests.conftest import FIXTURES, need_fixtures
from tests.reference import assert_parity, to_torch, torch

from openfold.data.data_transforms import atom37_to_torsion_angles  # noqa: E402
from openfold.utils import feats as of  # noqa: E402

N = 12


def _atom37(name: str, start: int, n: int) -> dict[str, np.ndarray]:
    """aatype [n], atom37 positions [n, 37, 3] and mask [n, 37] of residues start..start+n of a
    fixture chain (Biopython)."""
    from Bio.PDB import PDBParser
    need_fixtures()
    with gzip.open(FIXTURES / "chains" / f"{name}.pdb.gz", "rt") as f:
        chain = next(PDBParser(QUIET=True).get_structure(name, f)[0].get_chains())
    residues = [r for r in chain if r.id[0] == " "][start:start + n]
    aatype = np.array([rc.restype_order.get(rc.restype_3to1.get(r.get_resname(), "X"), rc.restype_num)
                       for r in residues], np.int64)
    pos = np.zeros((n, rc.atom_type_num, 3), np.float32)
    mask = np.zeros((n, rc.atom_type_num), np.float32)
    for i, r in enumerate(residues):
        for atom in r:
            if atom.get_id() in rc.atom_order:
                pos[i, rc.atom_order[atom.get_id()]] = atom.coord
                mask[i, rc.atom_order[atom.get_id()]] = 1.0
    return {"template_aatype": aatype, "template_all_atom_positions": pos, "template_all_atom_mask": mask}


@pytest.fixture(scope="module")
def templates() -> dict[str, np.ndarray]:
    """Two templates [2, N, ...] from real chains, with OpenFold's pseudo-beta and torsion
    features. Includes glycines, a missing CB, a residue without N (no frame) and padding."""
    feats = [_atom37("1ahsA", 0, N), _atom37("2cviA", 5, N)]
    feats[0]["template_all_atom_mask"][3, rc.atom_order["CB"]] = 0.0  # missing CB (non-Gly)
    feats[1]["template_all_atom_mask"][4, rc.atom_order["N"]] = 0.0  # missing backbone N
    for k in ("template_all_atom_positions", "template_all_atom_mask"):  # two padded residues
        feats[1][k][-2:] = 0.0
    feats[1]["template_aatype"][-2:] = 0
    feats[1]["template_all_atom_positions"] *= feats[1]["template_all_atom_mask"][..., None]
    batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
    assert (batch["template_aatype"] == rc.restype_order["G"]).sum() >= 2
    tb = {k: to_torch(v) for k, v in batch.items()}
    tb["template_pseudo_beta"], tb["template_pseudo_beta_mask"] = of.pseudo_beta_fn(
        tb["template_aatype"], tb["template_all_atom_positions"], tb["template_all_atom_mask"])
    tb = atom37_to_torsion_angles("template_")(tb)
    return {k: v.numpy() for k, v in tb.items()}


def test_pseudo_beta_fn_matches_openfold(templates):
    b = templates
    pb, pb_mask = pseudo_beta_fn(b["template_aatype"], b["template_all_atom_positions"],
                                 b["template_all_atom_mask"])
    np.testing.assert_array_equal(pb, b["template_pseudo_beta"])
    np.testing.assert_array_equal(pb_mask, b["template_pseudo_beta_mask"])
    assert_parity("pseudo_beta_fn", pb, b["template_pseudo_beta"])
    only = pseudo_beta_fn(b["template_aatype"], b["template_all_atom_positions"], None)
    np.testing.assert_array_equal(only, pb)


def test_build_template_angle_feat_matches_openfold(templates):
    want = of.build_template_angle_feat({k: to_torch(v) for k, v in templates.items()})
    got = build_template_angle_feat(templates)
    assert got.shape == (2, N, 57)
    assert_parity("build_template_angle_feat", got, want)


@pytest.mark.parametrize("use_unit_vector", [False, True])
@pytest.mark.parametrize("eps, inf", [(1e-20, 1e8), (1e-8, 1e5)])  # defaults; model config values
def test_build_template_pair_feat_matches_openfold(templates, use_unit_vector, eps, inf):
    d = {"min_bin": 3.25, "max_bin": 50.75, "no_bins": 39}
    want = of.build_template_pair_feat({k: to_torch(v) for k, v in templates.items()},
                                       use_unit_vector=use_unit_vector, eps=eps, inf=inf, **d)
    got = np.asarray(build_template_pair_feat(templates, use_unit_vector=use_unit_vector, eps=eps,
                                              inf=inf, **d))
    assert got.shape == (2, N, N, 88)
    want_np = want.numpy()
    # distogram, masks and one-hots are exact (no bin-edge ties in real coordinates)
    discrete = np.r_[0:84, 87]
    np.testing.assert_array_equal(got[..., discrete], want_np[..., discrete])
    assert want_np[..., :39].sum() > 0.5 * N * N  # many bins populated
    assert_parity(f"build_template_pair_feat(unit_vector={use_unit_vector}, eps={eps:g})", got, want)
    unit = got[..., 84:87]
    if use_unit_vector:
        norms = np.linalg.norm(unit, axis=-1)
        off_diag = (want_np[..., 87] > 0) & ~np.eye(N, dtype=bool)
        np.testing.assert_allclose(norms[off_diag], 1.0, atol=1e-5)
    else:
        assert not unit.any()


def test_build_extra_msa_feat_matches_openfold():
    rng = np.random.default_rng(0)
    batch = {"extra_msa": rng.integers(0, 23, size=(5, N)),
             "extra_has_deletion": (rng.random((5, N)) < 0.3).astype(np.float32),
             "extra_deletion_value": rng.random((5, N)).astype(np.float32)}
    want = of.build_extra_msa_feat({k: to_torch(v) for k, v in batch.items()})
    got = build_extra_msa_feat(batch)
    assert got.shape == (5, N, 25)
    assert_parity("build_extra_msa_feat", got, want)
