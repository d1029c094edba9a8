"""scripts/predict.py and scripts/export.py on the run of tests/test_cli.py (tiny preset, real
fixture chains cropped to 16 residues, compactness label: tests/product_data.py): a CSV with and
without labels, a folder of structures, the merged export (within 1e-5), bad inputs."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.product_data import CHAINS, IDS, compile_cache, data_csv, tiny_weights, write_csv  # noqa: F401
from tests.test_cli import lora_cli_run  # noqa: F401 (fixture)


def predict(*argv) -> int:
    from scripts.predict import main
    return main([str(a) for a in argv])


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_labelled_csv(lora_cli_run, data_csv, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert predict(lora_cli_run, "--data", data_csv, "--pdbs", CHAINS, "--output", out) == 0
    rows = read(out)
    assert [r["pdb_id"] for r in rows] == list(IDS)
    assert set(rows[0]) == {"pdb_id", "prediction", "affinity", "error"}
    for r in rows:
        assert np.isclose(float(r["error"]), float(r["prediction"]) - float(r["affinity"]), atol=1e-5)
    # the same model and inputs as the run's own test-set evaluation: the same numbers
    run_test = {r["pdb_id"]: r["prediction"] for r in read(lora_cli_run / "test_predictions.csv")}
    assert run_test and all({r["pdb_id"]: r["prediction"] for r in rows}[k] == v for k, v in run_test.items())
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())["metrics"]
    assert metrics["n"] == 8 and metrics["rmse"] > 0
    assert (tmp_path / "preds_scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert "Metrics (8 labelled): RMSE " in capsys.readouterr().out


def test_predict_folder_and_unlabelled_csv(lora_cli_run, tmp_path):
    folder = tmp_path / "structures"
    folder.mkdir()
    for pid in IDS[:3]:
        shutil.copy(CHAINS / f"{pid}.pdb.gz", folder)
    (folder / "notes.txt").write_text("not a structure")
    out = tmp_path / "folder.csv"
    assert predict(lora_cli_run, "--pdbs", folder, "--output", out) == 0
    rows = read(out)
    assert [r["pdb_id"] for r in rows] == sorted(IDS[:3]) and set(rows[0]) == {"pdb_id", "prediction"}
    assert not out.with_suffix(".metrics.json").exists()
    unlabelled = write_csv(tmp_path / "ids.csv", ids=IDS[:3], years=False, labels=False)
    out2 = tmp_path / "ids_preds.csv"
    assert predict(lora_cli_run, "--data", unlabelled, "--pdbs", CHAINS, "--output", out2) == 0
    assert {r["pdb_id"]: r["prediction"] for r in read(out2)} == {r["pdb_id"]: r["prediction"] for r in rows}


@pytest.mark.slow  # ~25 s; test_checkpoint's merge/export check runs by default
def test_export_predicts_the_same(lora_cli_run, data_csv, tmp_path, capsys):
    from scripts.export import main as export

    exported = tmp_path / "exported"
    assert export([str(lora_cli_run), str(exported)]) == 0
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["strategy"] == {"name": "merged"} and meta["exported_from"]["name"] == "lora"
    a, b = tmp_path / "ckpt.csv", tmp_path / "export.csv"
    assert predict(lora_cli_run, "--data", data_csv, "--pdbs", CHAINS, "--output", a) == 0
    assert predict(exported, "--data", data_csv, "--pdbs", CHAINS, "--output", b) == 0
    pa = np.array([float(r["prediction"]) for r in read(a)])
    pb = np.array([float(r["prediction"]) for r in read(b)])
    assert np.max(np.abs(pa - pb)) / np.max(np.abs(pa)) <= 1e-5
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export([str(lora_cli_run), str(exported)])
    assert "exists and is not empty" in capsys.readouterr().err


def test_bad_inputs(lora_cli_run, data_csv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict(tmp_path / "none", "--pdbs", CHAINS)
    assert "no such checkpoint, run or export folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict(lora_cli_run, "--pdbs", tmp_path / "nope")
    err = capsys.readouterr().err
    assert f"--pdbs {tmp_path / 'nope'}: no such folder" in err
    with pytest.raises(SystemExit):
        predict(lora_cli_run, "--data", tmp_path / "x.csv", "--pdbs", CHAINS)
    assert "no such file" in capsys.readouterr().err
    # not a checkpoint
    assert predict(tmp_path, "--pdbs", CHAINS, "--output", tmp_path / "p.csv") == 2
    assert "not a molfun_jax checkpoint" in capsys.readouterr().err
    # unknown ids are reported and left out; nothing left -> an error
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(f"pdb_id,affinity\n{IDS[0]},2.0\nnope,1.0\n{IDS[1]},x\n")
    out = tmp_path / "mixed_preds.csv"
    assert predict(lora_cli_run, "--data", mixed, "--pdbs", CHAINS, "--output", out) == 0
    err = capsys.readouterr().err
    assert "no structure file nope" in err and "'x' is not a number" in err
    rows = read(out)
    assert [r["pdb_id"] for r in rows] == [IDS[0], IDS[1]] and rows[1]["affinity"] == ""
    none = tmp_path / "none.csv"
    none.write_text("pdb_id\nnope\n")
    assert predict(lora_cli_run, "--data", none, "--pdbs", CHAINS, "--output", tmp_path / "n.csv") == 2
    assert "nothing to predict" in capsys.readouterr().err
    noid = tmp_path / "noid.csv"
    noid.write_text("name\nx\n")
    assert predict(lora_cli_run, "--data", noid, "--pdbs", CHAINS, "--output", tmp_path / "n.csv") == 2
    assert "no 'pdb_id' column" in capsys.readouterr().err
