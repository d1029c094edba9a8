"""The ligand wiring (issue 10, phase 2): PDBbind index + layout and CSV + flat folder into
examples with ligand features, the head registry, strategies' label trees for the ligand head,
the head-only cache, checkpoints / exports of the ligand head. Truths: the fixture index's text,
RDKit's own reading of the ligand files, scipy distances, hand-derived byte counts."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from rdkit import Chem
from scipy.spatial.distance import cdist

from molfun_jax import checkpoint as ckpt
from molfun_jax.api import MolfunStructureModel
from molfun_jax.data import AffinityDataset, DatasetConfig, EntryFilters, parse_structure
from molfun_jax.feature_schema import FEATURE_SCHEMA
from molfun_jax.heads import (HEADS, LIGAND_HEAD_INPUT_KEYS, HeadConfig, LigandHeadConfig, head_config_from_dict,
                              make_head)
from molfun_jax.training import Full, HeadOnly, LoRA, Partial, cache_entry_bytes, cache_trunk, data_mesh
from molfun_jax.training.step import HEAD_INPUT_KEYS, AffinityModel
from tests.conftest import FIXTURES
from tests.product_data import compile_cache, fast_config, fast_weights  # noqa: F401

PDBBIND = FIXTURES.parent / "pdbbind"
INDEX = PDBBIND / "INDEX_general_PL_data.2016"
COMPLEXES = FIXTURES / "complexes"
XK2_SMILES = "O=C1N(Cc2ccc3ccccc3c2)C(Cc2ccccc2)C(O)C(O)C(Cc2ccccc2)N1Cc1ccc2ccccc2c1"
SMALL_HEAD = LigandHeadConfig(c_atom=16, n_mp_layers=1, n_heads=2, c_hidden=8, n_rbf=8, hidden_dim=16, dropout=0.0)
pytestmark = pytest.mark.skipif(not INDEX.is_file(), reason="PDBbind fixtures not found")


def _heavy(path, sanitize: bool = True) -> np.ndarray:
    """[n, 3] heavy-atom coordinates of a ligand file as RDKit reads it."""
    mol = Chem.MolFromMolFile(str(path), sanitize=sanitize, removeHs=False)
    return np.asarray(mol.GetConformer().GetPositions())[[a.GetAtomicNum() > 1 for a in mol.GetAtoms()]]


def _index_lines() -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split() for ln in INDEX.read_text().splitlines() if ln.strip() and ln[0] != "#"}


@pytest.fixture(scope="module")
def pdbbind():
    return AffinityDataset.from_csv(INDEX, PDBBIND, buckets=(64,), report=False)


def test_index_and_layout_load_with_ligands(pdbbind):
    lines = _index_lines()
    assert sorted(e.pdb_id for e in pdbbind.entries) == sorted(set(lines) - {"1ps3"})
    (bad,) = pdbbind.bad
    assert bad.pdb_id == "1ps3" and "no protein file" in bad.reason and "--use-pocket-files" in bad.reason
    for e, ex in zip(pdbbind.entries, pdbbind):
        f = lines[e.pdb_id]
        assert e.target == float(f[3]) and e.year == int(f[2]) and e.meta["kind"] == f[4][:2].rstrip("=")
        assert e.resolution == (None if f[1] == "NMR" else float(f[1]))
        # the ligand's heavy atoms as RDKit reads the file (2lyw only unsanitised), in the file's frame
        path = PDBBIND / e.pdb_id / f"{e.pdb_id}_ligand.sdf"
        heavy = _heavy(path, sanitize=e.pdb_id != "2lyw")
        n = int(ex["ligand_mask"].sum())
        assert n == len(heavy) == e.n_atoms and ex["ligand_mask"].shape == (e.atom_bucket,)
        np.testing.assert_allclose(ex["ligand_positions"][:n], heavy, atol=1e-4)
        assert not ex["ligand_positions"][n:].any() and not ex["ligand_atom_feat"][n:].any()
        # pocket mask from the ligand file's coordinates over the kept (cropped) residues
        res = ex["seq_mask"] > 0
        d = cdist(ex["all_atom_positions"][res].reshape(-1, 3), heavy).min(axis=1).reshape(-1, 37)
        want = (np.where(ex["all_atom_mask"][res] > 0, d, np.inf).min(axis=1) <= 8.0)
        np.testing.assert_array_equal(ex["pocket_mask"][res] > 0, want)
        assert want.any()
    assert pdbbind.has_ligands
    notes = dict(pdbbind.warnings())
    assert "partially sanitised" in notes["2lyw"]


def test_spatial_crop_keeps_the_residues_nearest_the_ligand_file(pdbbind):
    e = next(e for e in pdbbind.entries if e.pdb_id == "1y6r")
    ex = pdbbind[pdbbind.ids.index("1y6r")]
    assert e.cropped and e.n_res == 466
    parsed = parse_structure(e.structure)
    lig = _heavy(e.ligand_file)
    d = cdist(parsed["atom_positions"].reshape(-1, 3), lig).min(axis=1).reshape(-1, 37)
    d = np.where(parsed["atom_mask"] > 0, d, np.inf).min(axis=1)
    keep = np.sort(np.argsort(d, kind="stable")[:64])
    np.testing.assert_allclose(ex["all_atom_positions"], parsed["atom_positions"][keep], atol=1e-5)


def test_pocket_files_and_filters():
    ds = AffinityDataset.from_csv(INDEX, PDBBIND, buckets=(64,), report=False, use_pocket_files=True,
                                  filters=EntryFilters(max_resolution=2.0, min_year=2004))
    assert not ds.bad and [e.pdb_id for e in ds.entries] == ["4qf8", "4x6p"]  # 1ps3 (2003) is filtered by year
    assert {b.pdb_id for b in ds.filtered} == {"1nlo", "1nlp", "1y6r", "2lyw", "1ps3"}
    ds = AffinityDataset.from_csv(INDEX, PDBBIND, buckets=(64,), report=False, use_pocket_files=True,
                                  filters=EntryFilters(max_year=2003))
    (e,) = [e for e in ds.entries if e.pdb_id == "1ps3"]
    assert e.used_pocket and e.structure.name == "1ps3_pocket.pdb" and e.has_ligand


def _csv(path, rows):
    path.write_text("pdb_id,affinity,ligand,smiles,kind,ligand_file\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_csv_flat_folder_hetatm_ligand_with_and_without_smiles(tmp_path):
    bad_sdf = tmp_path / "broken.sdf"
    bad_sdf.write_text("not a molecule\n")
    data = _csv(tmp_path / "d.csv", [("1hvr", "9.5", "XK2", XK2_SMILES, "Ki", ""),
                                     ("1a28", "7.0", "", "", "IC50", str(bad_sdf))])
    ds = AffinityDataset.from_csv(data, COMPLEXES, buckets=(64,), report=False)
    (e,), (b,) = ds.entries, ds.bad
    assert b.pdb_id == "1a28" and "broken.sdf" in b.path
    ex = ds[0]
    ref = Chem.MolFromPDBFile(str(COMPLEXES / "1hvr.pdb"))
    xk2 = [a.GetIdx() for a in ref.GetAtoms() if a.GetPDBResidueInfo().GetResidueName() == "XK2"]
    assert e.n_atoms == len(xk2) == Chem.MolFromSmiles(XK2_SMILES).GetNumAtoms() and ex["ligand_bond_orders_known"] == 1
    # aromatic bonds from the template: 4 naphthyl/phenyl rings' worth (bond type block, 'aromatic' column 3)
    n_arom = sum(b.GetIsAromatic() for b in Chem.MolFromSmiles(XK2_SMILES).GetBonds())
    assert ex["ligand_bond_feat"][..., 3].sum() == 2 * n_arom
    assert EntryFilters(drop_ic50=True).reason(ds.entries[0]) is None

    data = _csv(tmp_path / "e.csv", [("1hvr", "9.5", "XK2", "", "", "")])
    ds = AffinityDataset.from_csv(data, COMPLEXES, buckets=(64,), report=False)
    assert ds[0]["ligand_bond_orders_known"] == 0 and not ds[0]["ligand_bond_feat"][..., 3].any()
    assert any("only elements and connectivity" in w for _, w in ds.warnings())


def test_head_registry_round_trip():
    assert set(HEADS) == {"pocket", "ligand"}
    assert head_config_from_dict({"hidden_dim": 8}) == HeadConfig(hidden_dim=8)  # written before `kind`
    assert head_config_from_dict(SMALL_HEAD.to_dict()) == SMALL_HEAD
    with pytest.raises(ValueError, match="unknown head kind 'x'"):
        head_config_from_dict({"kind": "x"})
    assert set(LIGAND_HEAD_INPUT_KEYS) <= set(HEAD_INPUT_KEYS)
    assert all(not FEATURE_SCHEMA.spec(k).model_input for k in LIGAND_HEAD_INPUT_KEYS)
    assert type(make_head(SMALL_HEAD)).__name__ == "LigandAffinityHead"


@pytest.mark.parametrize("strategy", [HeadOnly(), LoRA(rank=2), Partial(unfreeze_last_n=1), Full()],
                         ids=["head_only", "lora", "partial", "full"])
def test_ligand_head_params_are_the_head_label_at_head_lr(strategy):
    cfg = fast_config()
    from molfun_jax.model import param_shapes

    trunk = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(cfg))
    v = AffinityModel(cfg, SMALL_HEAD).init_variables(trunk, strategy, jax.random.PRNGKey(0))
    head = traverse_util.flatten_dict(v["head"])
    assert any(p[0] == "atom_embed" for p in head) and any(p[0] == "distance_bias" for p in head)
    plan = strategy.plan(v, SMALL_HEAD.source)
    labels = traverse_util.flatten_dict(plan.labels())
    assert {labels[("head", *p)] for p in head} == {"head"} and ("head", *next(iter(head))) in labels
    assert not any(p[0] == "head" for p, lab in labels.items() if lab != "head")
    assert plan.learning_rates["head"] == strategy.learning_rates(cfg.model.evoformer_stack.no_blocks)["head"]


@pytest.fixture(scope="module")
def one_bucket(pdbbind):
    """The fixture entries of one (length, atom) bucket: 4qf8 and 1y6r (64 residues, 32 atoms)."""
    idx = pdbbind.buckets()[(64, 32)]
    return [{**pdbbind[i], "pdb_id": pdbbind.ids[i]} for i in idx]


@pytest.mark.slow  # ~60 s on a shared 2-core CPU (compiles the trunk twice)
def test_head_only_cache_keeps_ligand_inputs(one_bucket, fast_weights):
    model = MolfunStructureModel("tiny", HeadOnly(), weights=fast_weights, config=fast_config(), head_config=SMALL_HEAD)
    am = AffinityModel(model.config, SMALL_HEAD)
    cached = cache_trunk(am, model.variables, one_bucket, 2, data_mesh())
    c_s = model.config.model.evoformer_stack.c_s
    predict = jax.jit(am.predict)
    for ex, c in zip(one_bucket, cached):
        assert set(LIGAND_HEAD_INPUT_KEYS) <= set(c)
        n_res, atoms = 64, 32  # hand-derived bytes: single + seq/pocket masks + pose + ligand graph + target
        want = 4 * (n_res * c_s + 2 * n_res + n_res * 37 * 3 + n_res * 37 + atoms * 45 + atoms * atoms * 7
                    + atoms * 3 + atoms) + 4
        assert cache_entry_bytes(ex, c_s) == want
        feats = {k: v for k, v in ex.items() if k != "pdb_id"}
        np.testing.assert_allclose(predict(model.variables, c), predict(model.variables, feats), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ligand_run(tmp_path_factory, one_bucket, fast_weights):
    run = tmp_path_factory.mktemp("ligand_run")
    model = MolfunStructureModel("tiny", LoRA(rank=2, amp=False), weights=fast_weights, config=fast_config(),
                                 head_config=SMALL_HEAD)
    model.fit(one_bucket, None, epochs=1, batch_size=2, output=run, progress=False)
    return model, run


@pytest.mark.slow  # ~75 s on a 2-core CPU (a LoRA fit, save, load, export)
def test_checkpoint_records_the_head_and_refuses_another(ligand_run, one_bucket, fast_weights, tmp_path):
    model, run = ligand_run
    meta = ckpt.read_meta(ckpt.locate(run))
    assert meta["head"]["kind"] == "ligand" and meta["head"]["c_atom"] == 16
    assert meta["ligand_features"]["buckets"] == [32, 64, 128] and meta["ligand_features"]["version"] == 1
    loaded = MolfunStructureModel.load(run, weights=fast_weights)
    assert loaded.head_config == SMALL_HEAD
    np.testing.assert_array_equal(loaded.predict(one_bucket), model.predict(one_bucket))
    with pytest.raises(ckpt.CheckpointError, match="'ligand' affinity head; it cannot be loaded into the 'pocket'"):
        MolfunStructureModel.load(run, weights=fast_weights, head="pocket")
    pocket = MolfunStructureModel("tiny", LoRA(rank=2, amp=False), weights=fast_weights, config=fast_config())
    with pytest.raises(ckpt.CheckpointError, match="--head ligand"):
        pocket.load_checkpoint(run)
    out = model.export(tmp_path / "export")
    exported = MolfunStructureModel.load(out)
    assert json.loads((out / "meta.json").read_text())["head"]["kind"] == "ligand"
    ref, got = model.predict(one_bucket), exported.predict(one_bucket)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_head_choice_of_the_cli(pdbbind):
    import argparse

    from molfun_jax.cli.train import choose_head, parse_args

    info = {"n_loaded": 6, "n_ligands": 6, "has_ligands": True}
    ns = argparse.Namespace(head=None, demo=False)
    assert choose_head(ns, info) == ("ligand", "every entry has a ligand (6 of 6); --head pocket for the "
                                               "protein-only head")
    assert choose_head(argparse.Namespace(head="pocket", demo=False), info)[0] == "pocket"
    partial = {"n_loaded": 6, "n_ligands": 4, "has_ligands": False}
    assert choose_head(ns, partial) == ("pocket", "2 of 6 entries have no ligand file or named ligand")
    with pytest.raises(ValueError, match="--head ligand needs a ligand for every entry; 2 of 6 have none"):
        choose_head(argparse.Namespace(head="ligand", demo=False), partial)
    a = parse_args(["--data", str(INDEX), "--pdbs", str(PDBBIND), "--head", "ligand", "--max-resolution", "2.5",
                    "--min-year", "2000", "--drop-ic50", "--use-pocket-files", "--output", "/nonexistent/p2a"])
    assert (a.head, a.max_resolution, a.min_year, a.drop_ic50, a.use_pocket_files) == ("ligand", 2.5, 2000, True, True)


def test_prediction_entries_of_a_pdbbind_folder_without_data():
    from molfun_jax.data import read_entries

    entries, bad = read_entries(None, PDBBIND, labelled=False)
    assert sorted(e.pdb_id for e in entries) == sorted(set(_index_lines()) - {"1ps3"})
    assert all(e.target is None and e.layout == "pdbbind" and e.ligand_file.suffix == ".sdf" for e in entries)
    assert [b.pdb_id for b in bad] == ["1ps3"]
    assert {e.pdb_id: e.ligand_fallback is not None for e in entries}["4x6p"]  # its .mol2
