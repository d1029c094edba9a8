"""End to end (issue 10): `train.py` on the fixture PDBbind index + layout with the LoRA strategy
and the tiny preset, then `predict.py` on the same folder (index; with --use-pocket-files) and on
a CSV + flat folder with a HETATM ligand and its SMILES. Truths: the fixture's files (1ps3 has
no protein file, 2lyw's SDF fails RDKit sanitisation), the index's affinities."""
from __future__ import annotations

import csv
import json

import pytest

from molfun_jax.cli.predict import main as predict_main
from molfun_jax.cli.train import main as train_main
from tests.conftest import FIXTURES
from tests.product_data import compile_cache  # noqa: F401

PDBBIND = FIXTURES.parent / "pdbbind"
INDEX = PDBBIND / "INDEX_general_PL_data.2016"
XK2_SMILES = "O=C1N(Cc2ccc3ccccc3c2)C(Cc2ccccc2)C(O)C(O)C(Cc2ccccc2)N1Cc1ccc2ccccc2c1"
pytestmark = pytest.mark.skipif(not INDEX.is_file(), reason="PDBbind fixtures not found")


@pytest.mark.slow  # ~4 min on a shared 2-core CPU: 3 ligand atom buckets compile the LoRA step 3 times
def test_train_and_predict_on_pdbbind(tmp_path, capsys, compile_cache):
    run = tmp_path / "run"
    assert train_main(["--data", str(INDEX), "--pdbs", str(PDBBIND), "--strategy", "lora", "--preset", "tiny",
                       "--epochs", "2", "--quiet", "--output", str(run), "--max-len", "64", "--num-recycles", "0",
                       "--accum", "1", "--precision", "fp32", "--val-frac", "0.2", "--test-frac", "0.2"]) == 0
    out = capsys.readouterr()
    assert "1ps3" in out.err and "no protein file" in out.err
    assert "Head: ligand" in out.out and "every entry has a ligand (6 of 6)" in out.out
    assert "Note: 2lyw: ligand: RDKit sanitisation failed" in out.out and "partially sanitised" in out.out
    report = json.loads((run / "report.json").read_text())
    assert report["head"]["kind"] == "ligand" and report["data"]["n_loaded"] == 6 and report["epochs_run"] == 2
    assert report["data"]["ligand_atoms"] == {32: 2, 64: 1, 128: 3} or report["data"]["ligand_atoms"] == {
        "32": 2, "64": 1, "128": 3}

    preds = tmp_path / "preds.csv"
    assert predict_main([str(run), "--data", str(INDEX), "--pdbs", str(PDBBIND), "--output", str(preds),
                         "--use-pocket-files"]) == 0
    rows = {r["pdb_id"]: r for r in csv.DictReader(preds.open())}
    truth = {ln.split()[0]: float(ln.split()[3]) for ln in INDEX.read_text().splitlines() if ln[:1] not in "#"}
    assert set(rows) == set(truth)  # 1ps3 from its pocket file
    assert all(float(rows[k]["affinity"]) == pytest.approx(v) for k, v in truth.items())

    data = tmp_path / "flat.csv"
    data.write_text(f"pdb_id,affinity,ligand,smiles\n1hvr,9.5,XK2,{XK2_SMILES}\n")
    assert predict_main([str(run), "--data", str(data), "--pdbs", str(FIXTURES / "complexes"),
                         "--output", str(tmp_path / "flat_preds.csv")]) == 0
    (row,) = csv.DictReader((tmp_path / "flat_preds.csv").open())
    assert row["pdb_id"] == "1hvr" and float(row["prediction"]) == float(row["prediction"])  # finite, written
