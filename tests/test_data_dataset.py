"""AffinityDataset.from_csv on the fixture structures: good entries load, every bad one is
reported with its specific reason; buckets, cropping, collation, precomputed features, splits."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from molfun_jax.data import (AffinityDataset, DataError, DatasetConfig, FeatureConfig, collate, crop_indices,
                             identity_split, ligand_distance, make_features, parse_structure, random_split,
                             sequence_identity, temporal_split)
from molfun_jax.np import residue_constants as rc

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "structures"
if not FIXTURES.is_dir():
    pytest.skip(f"structure fixtures not found at {FIXTURES}", allow_module_level=True)

CHAIN_IDS = sorted(p.name[:-7] for p in (FIXTURES / "chains").glob("*.pdb.gz"))
MODEL_KEYS = {"aatype", "residue_index", "seq_mask", "target_feat", "msa_feat", "msa_mask", "extra_msa",
              "extra_msa_mask", "extra_has_deletion", "extra_deletion_value", "template_aatype",
              "template_all_atom_positions", "template_all_atom_mask", "template_mask", "template_pseudo_beta",
              "template_pseudo_beta_mask", "template_torsion_angles_sin_cos",
              "template_alt_torsion_angles_sin_cos", "template_torsion_angles_mask", "atom14_atom_exists",
              "residx_atom14_to_atom37", "residx_atom37_to_atom14", "atom37_atom_exists", "pocket_mask"}


def write_csv(path: Path, rows: list[str], header: str = "pdb_id,affinity") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> AffinityDataset:
    """The 25 fixture chains with a year each (2001-2025) and a label derived from the
    structure (radius of gyration / N^0.4, so it is a function of the input)."""
    rows = []
    for i, pdb_id in enumerate(CHAIN_IDS):
        p = parse_structure(FIXTURES / "chains" / f"{pdb_id}.pdb.gz")
        ca = p["atom_positions"][:, rc.atom_order["CA"]]
        rg = np.sqrt(np.mean(np.sum((ca - ca.mean(0)) ** 2, -1)))
        rows.append(f"{pdb_id},{rg / len(ca) ** 0.4:.4f},{2001 + i}")
    csv = write_csv(tmp_path_factory.mktemp("chains") / "chains.csv", rows, "pdb_id,affinity,year")
    t0 = time.perf_counter()
    ds = AffinityDataset.from_csv(csv, FIXTURES / "chains")
    ds.load_seconds = time.perf_counter() - t0
    return ds


def test_from_csv_loads_the_25_chains(chains):
    assert len(chains) == 25 and not chains.bad and chains.ids == CHAIN_IDS
    assert chains.load_seconds < 30  # scripts/bench_data.py measures it (about 1 s)
    assert {b: len(ix) for b, ix in chains.buckets().items()} == {(128, 0): 9, (256, 0): 16}  # no ligand atoms
    for e, ex in zip(chains.entries, chains):
        assert set(ex) == MODEL_KEYS | {"target"}
        assert ex["target"] == np.float32(e.target) and ex["aatype"].shape == (e.bucket,)
        assert ex["seq_mask"].sum() == e.n_res and not ex["seq_mask"][e.n_res:].any()
        assert ex["msa_feat"].shape == (1, e.bucket, 49) and ex["template_mask"].tolist() == [1.0]
        assert not ex["template_all_atom_mask"][:, e.n_res:].any()
    assert chains.years == list(range(2001, 2026))


def test_batches_and_collate(chains):
    seen = []
    for batch in chains.batches(4, shuffle=True, seed=1):
        b, n = batch["aatype"].shape
        assert b <= 4 and n in (128, 256)
        assert batch["msa_feat"].shape == (b, 1, n, 49) and batch["target"].shape == (b,)
        seen += batch["target"].tolist()
    assert sorted(seen) == sorted(chains.targets.tolist())
    small, large = chains.buckets()[(128, 0)][0], chains.buckets()[(256, 0)][0]
    with pytest.raises(ValueError, match="different buckets"):
        collate([chains[small], chains[large]])


def test_splits_of_the_dataset(chains):
    train, val, test = random_split(chains, (0.6, 0.2, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (15, 5, 5)
    assert not set(train.ids) & set(test.ids)
    train, val, test = temporal_split(chains, (0.6, 0.2, 0.2))
    assert max(train.years) < min(val.years) <= max(val.years) < min(test.years)
    train, val, test = identity_split(chains, (0.6, 0.2, 0.2), threshold=0.3)
    assert len(train) + len(val) + len(test) == 25 and len(test) > 0
    for held in (val, test):
        for a in held.chain_sequences:
            for b in train.chain_sequences:
                assert sequence_identity(a[0], b[0]) < 0.3


def _link(folder: Path, name: str, target: Path) -> None:
    (folder / name).symlink_to(target)


def test_csv_mixing_good_and_bad_entries(tmp_path, capsys):
    """Each bad entry gets its own specific reason (naming the file where there is one), the good
    ones load, and one table lists the bad ones."""
    s = tmp_path / "structures"
    s.mkdir()
    for c in ("2cviA", "1lpbA", "2gu3A", "2va0A", "3a4rA", "1or4A"):
        _link(s, f"{c}.pdb.gz", FIXTURES / "chains" / f"{c}.pdb.gz")
    _link(s, "1hvr.pdb", FIXTURES / "complexes" / "1hvr.pdb")
    _link(s, "3pwp.cif.gz", FIXTURES / "complexes" / "3PWP.cif.gz")
    edge = {"invalid": "1YJP_invalid.cif.gz", "fullerene": "fullerene.pdb.gz", "incomplete": "incomplete.pdb",
            "nucl": "nucl_res.pdb", "water": "water_methane_acetic-acid_ammonia.pdb", "hydro": "wrong_hydrogens.pdb.gz"}
    for pdb_id, f in edge.items():
        _link(s, pdb_id + f[f.index("."):], FIXTURES / "edge" / f)
    (s / "empty.pdb").write_bytes(b"")
    (s / "trunc.pdb.gz").write_bytes((FIXTURES / "chains" / "2cviA.pdb.gz").read_bytes()[:300])
    csv = write_csv(tmp_path / "data.csv", [
        "2cviA,5.0,,,", "1lpbA,6.1,,,", "1hvr,8.2,1995,,XK2", "hydro,3.0,,,",
        "3a4rA,nan,,,", "2gu3A,abc,,,", "2va0A,,,,", "2cviA,7.0,,,", "9xyz,1.0,,,",
        "invalid,1,,,", "fullerene,1,,,", "incomplete,1,,,", "nucl,1,,,", "water,1,,,",
        "empty,1,,,", "trunc,1,,,", "3PWP,4.0,,,", "1or4A,5,20x1,,", "1lpbA,5,,Z,", "1hvr,5,,B,ABC",
    ], "pdb_id,affinity,year,chain,ligand")
    ds = AffinityDataset.from_csv(csv, s, crop=None)
    assert ds.ids == ["2cviA", "1lpbA", "1hvr", "hydro"]
    assert ds.years[:3] == [None, None, 1995]
    assert ds[2]["pocket_mask"].sum() == 62
    expected = {
        6: "affinity 'nan' is not a finite number", 7: "affinity 'abc' is not a number", 8: "no affinity value",
        9: "duplicate entry (first at row 2)", 10: "no structure file 9xyz",
        11: "invalid atom record type(s) WRONG", 12: "no protein chain: only small molecules (MOL)",
        13: "CA-only trace", 14: "nucleic-acid residues", 15: "water (HOH)", 16: "empty file",
        17: "truncated gzip file", 18: "829 residues, longer than the largest bucket (512), and cropping is off",
        19: "year '20x1' is not a number", 20: "chain 'Z' not in the file", 21: "ligand ABC not found",
    }
    reasons = {b.row: b for b in ds.bad}
    assert sorted(reasons) == sorted(expected)
    for row, text in expected.items():
        assert text in reasons[row].reason, (row, reasons[row].reason)
    for row in (11, 12, 13, 14, 15, 16, 17, 18, 20, 21):
        assert reasons[row].path and Path(reasons[row].path).parent == s, row
    err = capsys.readouterr().err
    assert "16 bad of 20 entries" in err
    for pdb_id in ("9xyz", "fullerene", "trunc", "3PWP"):
        assert pdb_id in err
    assert "truncated gzip" in ds.report()

    with pytest.raises(DataError, match="strict mode"):
        AffinityDataset.from_csv(csv, s, crop=None, strict=True, report=False)
    only_bad = write_csv(tmp_path / "bad.csv", ["fullerene,1", "9xyz,2"])
    with pytest.raises(DataError, match="no usable entry") as e:
        AffinityDataset.from_csv(only_bad, s, report=False)
    assert "fullerene" in str(e.value) and "no structure file 9xyz" in str(e.value)
    with pytest.raises(DataError, match="no 'affinity' column"):
        AffinityDataset.from_csv(write_csv(tmp_path / "cols.csv", ["2cviA,1"], "pdb_id,pkd"), s)


def test_cropping_around_the_pocket(tmp_path):
    """1hvr (198 residues) into a 64-residue bucket: the spatial crop keeps the whole pocket (62
    residues), the contiguous crop a window around it; without a ligand the first residues."""
    p = parse_structure(FIXTURES / "complexes" / "1hvr.pdb")
    d = ligand_distance(p)
    idx = crop_indices(198, 64, "spatial", d)
    assert len(idx) == 64 and np.all(np.diff(idx) > 0) and np.all(d[idx].max() <= np.sort(d)[63])
    idx = crop_indices(198, 64, "contiguous", d)
    assert np.all(np.diff(idx) == 1) and np.any(d[idx] <= 8.0)
    np.testing.assert_array_equal(crop_indices(198, 64, "spatial", None), np.arange(64))

    csv = write_csv(tmp_path / "c.csv", ["1hvr,1.0"])
    full = make_features(p)["residue_index"].tolist()
    for mode in ("spatial", "contiguous"):
        ds = AffinityDataset.from_csv(csv, FIXTURES / "complexes", buckets=(64,), crop=mode)
        ex, e = ds[0], ds.entries[0]
        assert e.cropped and e.n_res == 198 and ex["aatype"].shape == (64,) and ex["seq_mask"].all()
        assert ex["pocket_mask"].sum() == (62 if mode == "spatial" else (d[idx] <= 8.0).sum())
        assert set(ex["residue_index"].tolist()) <= set(full)


def _npz_features(path: Path, seq: str, n_seq: int, seed: int) -> None:
    """A raw data_pipeline feature file (numbers only) with a random MSA around `seq`."""
    rng = np.random.default_rng(seed)
    ids = np.array([rc.HHBLITS_AA_TO_ID[a] for a in seq])
    msa = np.repeat(ids[None], n_seq, 0)
    sub = rng.random(msa.shape) < 0.3
    sub[0] = False
    msa[sub] = rng.integers(0, 22, sub.sum())
    aatype = np.eye(21, dtype=np.int32)[[rc.restype_order_with_x[a] for a in seq]]
    np.savez(path, aatype=aatype, msa=msa.astype(np.int32),
             deletion_matrix_int=(rng.random(msa.shape) < 0.05).astype(np.int32) * 2,
             residue_index=np.arange(len(seq), dtype=np.int32), seq_length=np.full(len(seq), len(seq), np.int32))


def test_precomputed_features_dir(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    for i, c in enumerate(("2cviA", "1lpbA")):
        _npz_features(feats / f"{c}.npz", parse_structure(FIXTURES / "chains" / f"{c}.pdb.gz")["sequence"], 20, i)
    csv = write_csv(tmp_path / "d.csv", ["2cviA,1", "1lpbA,2", "2gu3A,3"])
    cfg = DatasetConfig(features=FeatureConfig(max_msa_clusters=8, max_extra_msa=16))
    ds = AffinityDataset.from_csv(csv, FIXTURES / "chains", feats, config=cfg, report=False)
    assert ds.ids == ["2cviA", "1lpbA"] and "no precomputed features 2gu3A.pkl|.npz" in ds.bad[0].reason
    assert ds.depths == (8, 16, 4)
    for ex in ds:
        assert ex["msa_feat"].shape == (8, 128, 49) and ex["extra_msa"].shape == (16, 128)
        assert ex["msa_mask"][:, :80].all() and ex["extra_msa_mask"][:12, :80].all()
        assert ex["template_mask"].tolist() == [1.0, 0.0, 0.0, 0.0]
    batch = next(ds.batches(2))
    assert batch["msa_feat"].shape == (2, 8, 128, 49)
    lazy = AffinityDataset.from_csv(csv, FIXTURES / "chains", feats, config=cfg, report=False, lazy=True)
    for a, b in zip(ds, lazy):  # rebuilt on access, identically (seeded per entry)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
