"""Model features against OpenFold's `data_pipeline` + `feature_pipeline` (predict mode,
randomness off) on real structures: single-sequence MSA features, template features of the
structure itself, precomputed MSAs; residue index, pocket mask, model interface."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from molfun_jax.data import (FEATURE_SCHEMA, FeatureConfig, StructureError, align_precomputed, load_precomputed,
                             make_features, parse_structure)
from molfun_jax.np import residue_constants as rc

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "structures"
if not FIXTURES.is_dir():
    pytest.skip(f"structure fixtures not found at {FIXTURES}", allow_module_level=True)

# a third of the chains (all 25 are compared with OpenFold's parser in test_data_parsing), with
# those whose numbering jumps (1h4aX, 2xdgA, 3a4rA)
CHAINS = sorted({*sorted(p.name for p in (FIXTURES / "chains").glob("*.pdb.gz"))[::3],
                 "1h4aX.pdb.gz", "2xdgA.pdb.gz", "3a4rA.pdb.gz"})
TORSIONS = ("template_torsion_angles_sin_cos", "template_alt_torsion_angles_sin_cos")
ARCTAN = ("msa_feat", "extra_deletion_value")  # deletion values: atan(d / 3) * 2 / pi


@pytest.fixture(scope="module")
def of():
    from tests.reference import openfold_data
    return openfold_data()


def openfold_predict(of, raw: dict, **predict) -> dict:
    """OpenFold's feature pipeline in predict mode with its randomness off (no BERT masking; no
    recycling copies), without the recycling axis."""
    cfg = of.config.model_config("model_1_ptm").data
    cfg.predict.masked_msa_replace_fraction = 0.0
    cfg.common.max_recycling_iters = 0
    for k, v in predict.items():
        cfg.predict[k] = v
    out = of.feature_pipeline.FeaturePipeline(cfg).process_features(raw, "predict")
    return {k: v[..., 0].numpy() for k, v in out.items()}


def assert_same_features(ours: dict, ref: dict, what: str) -> None:
    """Every model feature equal; OpenFold's fixed-size padding beyond our rows is all zero.
    Torsion sin/cos (float32 arithmetic) to 1e-5 relative where defined (torsion mask 1) and 0
    where not (OpenFold has values computed from missing atoms there: rounding noise for
    degenerate frames); features with an arctangent (numpy's vs torch's: 1 ulp) to 1e-6. Those
    errors go to the parity table."""
    from tests.reference import assert_parity
    for k, v in ours.items():
        if k == "pocket_mask":
            continue
        r = ref[k]
        assert r.ndim == v.ndim, k
        inside = tuple(slice(0, s) for s in v.shape)
        pad = r.copy()
        pad[inside] = 0
        assert not np.any(pad), f"{k}: OpenFold has non-zero rows beyond ours"
        assert np.dtype(v.dtype).kind == np.dtype(r.dtype).kind, k
        if k in TORSIONS:
            defined = ours["template_torsion_angles_mask"][..., None] > 0
            assert_parity(f"data {what} {k}", v, np.where(defined, r[inside], 0.0), rtol=1e-5)
        elif k in ARCTAN:
            assert_parity(f"data {what} {k}", v, r[inside], rtol=1e-6)
        else:
            np.testing.assert_array_equal(v, r[inside], err_msg=f"{what}: {k}")


def text_of(path: Path) -> str:
    return (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)).read()


def openfold_structure_template(of, prot) -> dict:
    """Raw template features of a parsed protein as `templates._extract_template_features` makes
    them for an identity mapping: zero-centred atoms, HHblits-order one-hot sequence."""
    pos = prot.atom_positions.astype(np.float32)
    mask = prot.atom_mask.astype(np.float32)
    present = mask.astype(bool)
    pos[present] -= pos[present].mean(axis=0)
    seq = of.data_pipeline._aatype_to_str_sequence(prot.aatype)
    return {"template_aatype": rc.sequence_to_onehot(seq, rc.HHBLITS_AA_TO_ID)[None],
            "template_all_atom_positions": pos[None], "template_all_atom_mask": mask[None],
            "template_sum_probs": np.ones((1, 1), np.float32)}


@pytest.mark.parametrize("name", CHAINS)
def test_pdb_chain_features_match_openfold(of, name, tmp_path):
    """`DataPipeline.process_pdb` (no alignments: the single-sequence MSA) with the structure as
    its template, through `FeaturePipeline` (predict), vs ours. OpenFold numbers residues 0..N-1
    whatever the gaps, so we use residue_index='sequential' here (see the next test)."""
    text = text_of(FIXTURES / "chains" / name)
    pdb = tmp_path / "x.pdb"
    pdb.write_text(text)
    raw = of.data_pipeline.DataPipeline(template_featurizer=None).process_pdb(
        str(pdb), alignment_dir=str(tmp_path), is_distillation=False)
    raw.update(openfold_structure_template(of, of.protein.from_pdb_string(text)))
    ref = openfold_predict(of, raw)
    ours = make_features(parse_structure(FIXTURES / "chains" / name, modified_residues="unknown"),
                         residue_index="sequential")
    assert_same_features(ours, ref, name)


@pytest.mark.parametrize("name,chain", [("5PTI.cif.gz", "A"), ("1YJP.cif", "A"), ("3PWP.cif.gz", "B"),
                                        ("3PWP.cif.gz", "E"), ("7ETN.cif.gz", "A")])
def test_mmcif_features_match_openfold_custom_template(of, name, chain, tmp_path):
    """OpenFold's own "structure as template" path, `make_sequence_features_with_custom_template`
    (single-sequence MSA + `templates.get_custom_template_features`), vs our defaults (3PWP E has
    an insertion code and numbering jumps; our 'structure' residue index matches there too)."""
    path = FIXTURES / "complexes" / name
    text = text_of(path)
    cif = tmp_path / "x.cif"
    cif.write_text(text)
    mm = of.mmcif_parsing.parse(file_id=name[:4], mmcif_string=text).mmcif_object
    raw = of.data_pipeline.make_sequence_features_with_custom_template(
        mm.chain_to_seqres[chain], str(cif), name[:4], chain, kalign_binary_path=None)
    assert_same_features(make_features(parse_structure(path, chains=[chain])), openfold_predict(of, raw),
                         f"{name}:{chain}")


def _without(parsed: dict, drop: np.ndarray) -> dict:
    """A parsed structure with residues `drop` removed (a chain break of missing residues)."""
    keep = np.setdiff1d(np.arange(len(parsed["aatype"])), drop)
    out = {k: (v[keep] if isinstance(v, np.ndarray) and len(v) == len(parsed["aatype"]) else v)
           for k, v in parsed.items()}
    out["sequence"] = "".join(np.array(list(parsed["sequence"]))[keep])
    return out


def test_residue_index_follows_chain_breaks():
    """'structure': +1 between peptide-bonded residues, even where the authors' numbering jumps
    (1h4aX, 2xdgA, 3PWP D/E and its insertion code; none of the fixtures has a real break), the
    numbering gap across a real break (residues 30-34 of 2cviA removed), 200 between chains."""
    for name in ("chains/1h4aX.pdb.gz", "chains/2xdgA.pdb.gz", "complexes/3PWP.pdb.gz"):
        p = parse_structure(FIXTURES / name)
        ri, ch = make_features(p, templates=False)["residue_index"], p["chain_index"]
        assert np.any((np.diff(p["residue_index"]) != 1) & (np.diff(ch) == 0))
        np.testing.assert_array_equal(np.diff(ri), np.where(np.diff(ch) == 0, 1, 201))

    p = parse_structure(FIXTURES / "chains" / "2cviA.pdb.gz")
    gap = _without(p, np.flatnonzero((p["residue_index"] >= 30) & (p["residue_index"] <= 34)))
    feats = make_features(gap)
    ri, j = feats["residue_index"], int(np.flatnonzero(gap["residue_index"] == 29)[0])
    assert ri[j + 1] - ri[j] == 6 and np.all(np.delete(np.diff(ri), j) == 1)
    np.testing.assert_array_equal(make_features(gap, residue_index="sequential")["residue_index"],
                                  np.arange(len(ri)))
    # the torsions that need the missing predecessor are undefined (mask 0, sin/cos 0)
    assert feats["template_torsion_angles_mask"][0, j + 1, :2].sum() == 0
    assert not np.any(feats["template_torsion_angles_sin_cos"][0, j + 1, :2])
    assert feats["template_torsion_angles_mask"][0, j + 2, :3].sum() == 3


def _pdb_atoms(path: Path, record: str, resname: str) -> list[tuple[str, int, np.ndarray]]:
    """(chain, residue number, xyz) of heavy atoms read straight from the PDB lines."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(record) and line[17:20] == resname and line[76:78].strip() != "H":
            out.append((line[21], int(line[22:26]), np.array([float(line[30:38]), float(line[38:46]),
                                                              float(line[46:54])])))
    return out


def test_pocket_mask_1hvr_active_site():
    """HIV-1 protease + XK263: the pocket (8 A, any heavy atom) holds, in both monomers, the
    catalytic Asp25 and its Thr26-Gly27, the flap tip Gly48-Gly49-Ile50, the 80s loop Pro81,
    Val82, Ile84 and Arg8 (the S1-S3 subsites); the N- and C-terminal strands of the dimer
    interface and the 60s loop are out. Asp25's distance is also checked on the raw PDB lines."""
    path = FIXTURES / "complexes" / "1hvr.pdb"
    p = parse_structure(path)
    pocket = make_features(p)["pocket_mask"]
    sel = {(p["chain_ids"][c], int(n)) for c, n, m in zip(p["chain_index"], p["residue_index"], pocket) if m}
    for chain in "AB":
        for num in (8, 25, 26, 27, 48, 49, 50, 81, 82, 84):
            assert (chain, num) in sel, (chain, num)
        for num in [*range(1, 7), *range(60, 76), *range(90, 100)]:
            assert (chain, num) not in sel, (chain, num)
    assert {n for c, n in sel if c == "A"} == {n for c, n in sel if c == "B"}  # the symmetric site
    assert 40 <= len(sel) <= 70
    lig = np.stack([x for _, _, x in _pdb_atoms(path, "HETATM", "XK2")])
    asp25 = np.stack([x for c, n, x in _pdb_atoms(path, "ATOM", "ASP") if (c, n) == ("A", 25)])
    assert np.min(np.linalg.norm(asp25[:, None] - lig[None], axis=-1)) < 4.0
    assert not np.any(make_features(parse_structure(FIXTURES / "chains" / "2cviA.pdb.gz"))["pocket_mask"])


def test_templates_off_and_model_interface():
    """Shapes and dtypes are what `molfun_jax.model.AlphaFold` takes (`dummy_features`), plus
    `pocket_mask`: the feature schema's model inputs and the pocket mask (a chain without a ligand has no ligand
    features); with templates off, one all-zero template with `template_mask` 0."""
    from molfun_jax.config import model_config
    from molfun_jax.model import dummy_features
    p = parse_structure(FIXTURES / "chains" / "2cviA.pdb.gz")
    n = len(p["aatype"])
    spec = dummy_features(model_config("tiny"), n, n_seq=1, n_extra=1, n_templ=1)
    for templates in (True, False):
        f = make_features(p, templates=templates)
        assert set(f) == set(spec) | {"pocket_mask"} == set(FEATURE_SCHEMA.model_inputs) | {"pocket_mask"}
        for k, s in spec.items():
            assert f[k].shape == s.shape and f[k].dtype == s.dtype, k
        assert f["pocket_mask"].shape == (n,) and f["pocket_mask"].dtype == FEATURE_SCHEMA.spec("pocket_mask").dtype
        assert f["template_mask"][0] == float(templates)
        if not templates:
            assert not any(np.any(v) for k, v in f.items() if k.startswith("template_"))


def _synthetic_msa(seq: str, n: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """The query plus n - 1 variants: 25% substitutions, a few gaps, deletion counts 0-3."""
    rng = np.random.default_rng(seed)
    msa, dels = [seq], [[0] * len(seq)]
    for _ in range(n - 1):
        s = np.array(list(seq))
        sub = rng.random(len(s)) < 0.25
        s[sub] = rng.choice(list("ACDEFGHIKLMNPQRSTVWY-"), sub.sum())
        msa.append("".join(s))
        dels.append([int(d) for d in rng.integers(0, 4, len(s)) * (rng.random(len(s)) < 0.1)])
    return msa, dels


def _raw_features(of, seq: str, prot, n_seq: int = 24) -> dict:
    msa, dels = _synthetic_msa(seq, n_seq)
    raw = {**of.data_pipeline.make_sequence_features(seq, "test", len(seq)),
           **of.data_pipeline.make_msa_features([msa], [dels])}
    raw.update(openfold_structure_template(of, prot))
    return raw


def test_precomputed_msa_matches_openfold(of, monkeypatch, tmp_path):
    """A raw data_pipeline dict with a 24-sequence MSA (and a template), as .pkl and as .npz:
    MSA sampling (8 clusters), nearest-neighbour clustering of the 16 others, cluster profiles,
    extra-MSA cropping (to 10) and the template, vs OpenFold with its random permutations
    replaced by the identity (ours: msa_seed=None)."""
    import torch
    path = FIXTURES / "chains" / "2cviA.pdb.gz"
    parsed = parse_structure(path, modified_residues="unknown")
    raw = _raw_features(of, parsed["sequence"], of.protein.from_pdb_string(text_of(path)))
    (tmp_path / "f.pkl").write_bytes(pickle.dumps(raw))
    np.savez(tmp_path / "f.npz", **{k: v for k, v in raw.items() if v.dtype != object})
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: torch.arange(n))
    ref = openfold_predict(of, raw, max_msa_clusters=8, max_extra_msa=10)
    cfg = FeatureConfig(templates=False, max_msa_clusters=8, max_extra_msa=10, msa_seed=None)
    for f in ("f.pkl", "f.npz"):
        pre = align_precomputed(load_precomputed(tmp_path / f), parsed["sequence"], tmp_path / f)
        ours = make_features(parsed, pre, cfg)
        assert ours["msa_feat"].shape == (8, len(parsed["aatype"]), 49) and ours["extra_msa"].shape[0] == 10
        assert_same_features(ours, ref, f"precomputed {f}")


def test_precomputed_sampling_is_seeded(of):
    path = FIXTURES / "chains" / "2cviA.pdb.gz"
    parsed = parse_structure(path)
    raw = _raw_features(of, parsed["sequence"], of.protein.from_pdb_string(text_of(path)))
    pre = align_precomputed(raw, parsed["sequence"], path)
    cfg = FeatureConfig(max_msa_clusters=8, max_extra_msa=10)
    a, b = make_features(parsed, pre, cfg, msa_seed=3), make_features(parsed, pre, cfg, msa_seed=3)
    c = make_features(parsed, pre, cfg, msa_seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["msa_feat"], c["msa_feat"])
    query = np.eye(23, dtype=np.float32)[parsed["aatype"]]
    for f in (a, c):
        np.testing.assert_array_equal(f["msa_feat"][0, :, :23], query)  # the query stays first
        assert f["template_mask"].tolist() == [1.0, 1.0]  # the structure, then the precomputed one
    masked = make_features(parsed, pre, cfg, msa_seed=3, masked_msa_fraction=0.15)
    assert np.any(masked["msa_feat"][..., 22] == 1)  # BERT mask token
    np.testing.assert_array_equal(masked["msa_feat"], make_features(parsed, pre, cfg, msa_seed=3,
                                                                    masked_msa_fraction=0.15)["msa_feat"])


def test_precomputed_alignment_to_the_structure(of, tmp_path):
    """Features made for a longer sequence (e.g. SEQRES with a tag) are mapped onto the observed
    residues; features of another protein are refused."""
    path = FIXTURES / "chains" / "2cviA.pdb.gz"
    parsed = parse_structure(path)
    seq = parsed["sequence"]
    msa, dels = _synthetic_msa("MGSSHHHHHH" + seq, 6)
    raw = {**of.data_pipeline.make_sequence_features("MGSSHHHHHH" + seq, "t", len(seq) + 10),
           **of.data_pipeline.make_msa_features([msa], [dels])}
    pre = align_precomputed(raw, seq, tmp_path / "f.pkl")
    np.testing.assert_array_equal(pre["msa"], raw["msa"][:, 10:])
    np.testing.assert_array_equal(pre["deletion_matrix"], raw["deletion_matrix_int"][:, 10:])
    other = parse_structure(FIXTURES / "chains" / "1lpbA.pdb.gz")["sequence"]
    with pytest.raises(StructureError, match="does not match the structure"):
        align_precomputed(raw, other, tmp_path / "f.pkl")
    bad = tmp_path / "processed.pkl"
    bad.write_bytes(pickle.dumps({"msa_feat": np.zeros((1, 2, 49))}))
    with pytest.raises(StructureError, match="look like processed features"):
        load_precomputed(bad)


def test_raw_precomputed_features_are_aligned_by_make_features(of):
    path = FIXTURES / "chains" / "2cviA.pdb.gz"
    parsed = parse_structure(path)
    raw = _raw_features(of, parsed["sequence"], of.protein.from_pdb_string(text_of(path)))
    a = make_features(parsed, raw, max_msa_clusters=8)
    b = make_features(parsed, align_precomputed(raw, parsed["sequence"], path), max_msa_clusters=8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
