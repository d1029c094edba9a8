"""scripts/train.py on the `tiny` preset and 8 real fixture chains cropped to 16 residues, labelled
with a structure-derived compactness score (radius of gyration / N^0.4; tests/product_data.py):
flag validation and clear errors, the flags -> strategy mapping, a run's printed lines and
files (metrics.csv, plots, report.json, checkpoints), a run killed with SIGKILL mid-epoch and
resumed (same losses as uninterrupted), the splits, `.pt` weights, precomputed features, bf16
and the demo."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.product_data import (CHAINS, IDS, compile_cache, data_csv, need_fixtures,  # noqa: F401 (fixtures)
                                shared_path, tiny_weights, write_csv)

TRAIN = ROOT / "scripts" / "train.py"


def train_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    """The shared run: every training flag set away from its default."""
    return ["--data", str(data), "--pdbs", str(CHAINS), "--preset", "tiny", "--weights", str(weights),
            "--strategy", "lora", "--lora-rank", "4", "--lr", "1e-3", "--epochs", "3", "--batch-size", "2",
            "--accum", "1", "--ema", "0.5", "--warmup", "1", "--scheduler", "linear", "--grad-clip", "0.5",
            "--weight-decay", "0.001", "--early-stopping", "5", "--seed", "1", "--split", "random",
            "--val-frac", "0.25", "--test-frac", "0.25", "--max-len", "16", "--num-recycles", "0",
            "--no-amp", "--keep", "2", "--quiet", "--output", str(out), *extra]


def run_script(script: Path, args: list[str], cache: Path, timeout: int = 600,
               prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "MOLFUN_JAX_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    code = (f"import sys, runpy; sys.argv = {[str(script)] + args!r}; {prelude}\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def lora_cli_run(tmp_path_factory, data_csv, tiny_weights, compile_cache):
    with shared_path(tmp_path_factory, "cli_lora_run") as out:
        if not (out / "stdout.txt").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a run a killed worker left unfinished
            r = run_script(TRAIN, train_args(data_csv, tiny_weights, out), compile_cache)
            assert r.returncode == 0, r.stdout + r.stderr
            (out / "stdout.txt").write_text(r.stdout)
    return out


# ---------------------------------------------------------------------------- validation
def parse(argv: list[str]):
    from molfun_jax.cli.train import parse_args
    return parse_args(argv)


@pytest.fixture()
def ok(tmp_path, data_csv) -> list[str]:
    return ["--data", str(data_csv), "--pdbs", str(CHAINS), "--preset", "tiny", "--output", str(tmp_path / "o")]


BAD_FLAGS = [
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--accum", "0"], "--accum must be >= 1"),
    (["--ema", "1.0"], "--ema is an EMA decay in [0, 1)"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--early-stopping", "-2"], "--early-stopping must be >= 0"),
    (["--max-len", "4"], "--max-len must be >= 8"),
    (["--num-recycles", "-1"], "--num-recycles must be >= 0"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["--strategy", "partial", "--unfreeze-blocks", "0"], "--unfreeze-blocks must be >= 1"),
    (["--strategy", "partial", "--unfreeze-blocks", "3"], "--unfreeze-blocks 3: the Evoformer has 2 blocks (preset tiny)"),
    (["--val-frac", "0.6", "--test-frac", "0.5"], "must leave some training data"),
    (["--keep", "0"], "--keep must be >= 1"),
    (["--preset", "model_9"], "--preset 'model_9' is not one of"),
    (["--precision", "bf16", "--no-amp"], "--no-amp and --precision bf16 contradict"),
    (["--strategy", "adapters"], "argument --strategy: invalid choice: 'adapters'"),
    (["--split", "cluster"], "argument --split: invalid choice"),
    (["--scheduler", "step"], "argument --scheduler: invalid choice"),
    (["--remat", "sometimes"], "argument --remat: invalid choice: 'sometimes'"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--weights", "/nonexistent/w.pt"], "--weights /nonexistent/w.pt: no such file or folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_clearly(ok, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(ok + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_paths_are_refused_clearly(tmp_path, data_csv, capsys):
    def err(argv: list[str]) -> str:
        with pytest.raises(SystemExit):
            parse(argv)
        return capsys.readouterr().err

    pdbs = ["--pdbs", str(CHAINS)]
    assert "--data CSV is required (or --demo" in err(pdbs)
    assert "--data /no/such.csv: no such file" in err(["--data", "/no/such.csv"] + pdbs)
    assert "--pdbs DIR (the structures named in the CSV) is required" in err(["--data", str(data_csv)])
    assert "--pdbs /no/dir: no such folder" in err(["--data", str(data_csv), "--pdbs", "/no/dir"])
    assert "--features /no/feat: no such folder" in err(["--data", str(data_csv)] + pdbs + ["--features", "/no/feat"])
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    assert "expected an OpenFold .pt file or a converted folder" in err(["--data", str(data_csv)] + pdbs +
                                                                         ["--weights", str(txt)])
    assert "not a converted weights folder (no meta.json)" in err(["--data", str(data_csv)] + pdbs +
                                                                   ["--weights", str(tmp_path)])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    assert f"--output {busy} exists and is not empty" in err(["--data", str(data_csv)] + pdbs + ["--output", str(busy)])
    assert "not a run folder (no run_args.json)" in err(["--resume", str(busy)])
    assert "--resume needs a run folder" in err(["--resume"])
    assert "--demo makes its own synthetic data" in err(["--demo", "--data", str(data_csv)])
    assert "--split temporal needs a `year` column" in err(["--demo", "--split", "temporal"])


def test_run_errors_exit_2_with_a_message(tmp_path, capsys, compile_cache):
    """Errors found while running (here: a CSV without usable entries) end with `error: ...`."""
    from scripts.train import main

    need_fixtures()
    bad = tmp_path / "bad.csv"
    bad.write_text("pdb_id,affinity\nnope,1.0\n1ahsA,not-a-number\n")
    assert main(["--data", str(bad), "--pdbs", str(CHAINS), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no usable entry" in err and "not a number" in err
    assert err.count("not a number") == 1  # the bad-entry table is printed once, in the error


def test_flags_make_the_strategy():
    from molfun_jax.cli.train import build_strategy
    from molfun_jax.training import Full, HeadOnly, LoRA, Partial

    base = dict(lr=None, lora_rank=8, unfreeze_blocks=4, warmup=10, scheduler="linear", ema=0.999, accum=3,
                grad_clip=0.5, precision="bf16", early_stopping=4, weight_decay=0.02)
    common = dict(warmup_steps=10, scheduler="linear", ema_decay=0.999, accumulation_steps=3, grad_clip=0.5,
                  amp=True, early_stopping_patience=4, weight_decay=0.02)
    assert build_strategy(Namespace(**base, strategy="lora")) == LoRA(rank=8, **common)
    assert build_strategy(Namespace(**{**base, "lr": 3e-4, "lora_rank": 2}, strategy="lora")) == \
        LoRA(rank=2, lr_lora=3e-4, **common)
    assert build_strategy(Namespace(**{**base, "lr": 2e-5}, strategy="partial")) == \
        Partial(unfreeze_last_n=4, lr_trunk=2e-5, **common)
    assert build_strategy(Namespace(**{**base, "lr": 1e-6}, strategy="full")) == Full(lr=1e-6, **common)
    s = build_strategy(Namespace(**{**base, "precision": "fp32"}, strategy="head_only"))
    assert s == HeadOnly(**{**common, "amp": False}) and s.compute_dtype == "float32"


def test_splits(data_csv, tmp_path):
    from molfun_jax.cli.train import load_splits

    def split(kind: str, csv_path: Path = data_csv) -> tuple:
        a = Namespace(data=csv_path, pdbs=CHAINS, features=None, max_len=16, val_frac=0.25, test_frac=0.25,
                      split=kind, seed=0, use_pocket_files=False, max_resolution=None, min_year=None,
                      max_year=None, drop_ic50=False)
        tr, va, te, info = load_splits(a)
        return [e["pdb_id"] for e in tr], [e["pdb_id"] for e in va], [e["pdb_id"] for e in te], info

    tr, va, te, info = split("random")
    assert (len(tr), len(va), len(te)) == (4, 2, 2) and sorted(tr + va + te) == sorted(IDS)
    assert info["lengths"] == {16: 8} and info["n_cropped"] == 8
    tr, va, te, _ = split("temporal")  # years 2001.. in CSV order: oldest train, newest test
    assert (tr, va, te) == (list(IDS[:4]), list(IDS[4:6]), list(IDS[6:]))
    tr, va, te, _ = split("identity")
    assert sorted(tr + va + te) == sorted(IDS) and len(tr) >= 4
    no_year = write_csv(tmp_path / "noyear.csv", years=False)
    with pytest.raises(ValueError, match="add a `year` column"):
        split("temporal", no_year)


# ---------------------------------------------------------------------------- runs
def test_run_prints_and_writes_everything(lora_cli_run):
    out = lora_cli_run
    stdout = (out / "stdout.txt").read_text()
    lines = stdout.splitlines()
    assert lines[0].startswith("Data: 8 examples from ") and "-> 4 train / 2 val / 2 test (random split)" in lines[0]
    assert any(line.startswith("Weights: ") and "(converted)" in line for line in lines)
    assert any(line.startswith("Model: OpenFold (84,922 params) | preset tiny | 0 recycles") for line in lines)
    assert any(line.startswith("Strategy: lora (rank 4, linear_q, linear_v) | trainable: ") and
               "LR: 1.0e-03 (head 1.0e-02) | warmup 1, linear, EMA 0.5, early stopping 5 | float32" in line
               for line in lines), stdout
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert [e.split(" |")[0] for e in epochs] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert all("train_loss: " in e and "val_loss: " in e and "lr: " in e for e in epochs)
    assert any(line.startswith("Test (2 examples, best epoch ") for line in lines)

    rows = metrics_rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss", "lr", "val_rmse"))
    report = json.loads((out / "report.json").read_text())
    assert set(report["test_metrics"]) == {"n", "rmse", "mae", "pearson", "spearman"}
    assert report["test_metrics"]["n"] == 2 and report["epochs_run"] == 3
    assert report["trainable"] == {"head": 4417, "lora": 2560, "total": 6977}
    assert report["data"]["splits"]["test"] and report["strategy"]["ema_decay"] == 0.5
    for png in ("loss.png", "val_scatter.png", "test_scatter.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "test_predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert [p["pdb_id"] for p in preds] == report["data"]["splits"]["test"]
    assert set(preds[0]) == {"pdb_id", "prediction", "affinity", "error"}
    # keep 2 epoch checkpoints; one best; the run's arguments for --resume
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 3]
    assert [int(p.name) for p in (out / "best").iterdir()] == [report["best_epoch"]]
    assert json.loads((out / "run_args.json").read_text())["lora_rank"] == 4


# killer prelude: SIGKILL the process right after its `step`-th optimizer step
KILLER = """
import os, signal
from molfun_jax import reports
_advance, _n = reports.StepProgress.advance, [0]
def advance(self, *args, **kwargs):
    _advance(self, *args, **kwargs)
    _n[0] += 1
    if _n[0] == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
reports.StepProgress.advance = advance
"""


@pytest.mark.parametrize("kill_at_step", [
    3,  # 2 optimizer steps per epoch: after the first step of epoch 2
    pytest.param(1, marks=pytest.mark.slow),  # inside epoch 1, before any checkpoint: starts over
])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(kill_at_step, lora_cli_run, data_csv, tiny_weights,
                                                             compile_cache, tmp_path):
    out = tmp_path / "killed"
    r = run_script(TRAIN, train_args(data_csv, tiny_weights, out), compile_cache,
                   prelude=KILLER.format(step=kill_at_step))
    assert r.returncode == -9, r.stdout + r.stderr  # SIGKILL
    done = (kill_at_step - 1) // 2
    assert [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("Epoch ")] == \
        [f"Epoch {e}/3" for e in range(1, done + 1)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [str(e) for e in range(1, done + 1)]
    r = run_script(TRAIN, ["--resume", str(out)], compile_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"Resuming {out} after epoch {done}" if done else "no epoch was completed") in r.stdout
    assert metrics_rows(out) == metrics_rows(lora_cli_run)
    # the later epochs' lines are the uninterrupted run's (times aside)
    strip = lambda s: [line.rsplit(" | ", 1)[0] for line in s.splitlines() if line.startswith("Epoch ")]  # noqa: E731
    assert strip(r.stdout) == strip((lora_cli_run / "stdout.txt").read_text())[done:]


def test_resume_keeps_the_run_settings(lora_cli_run, capsys):
    """A resumed run may not change its settings (it may extend --epochs)."""
    with pytest.raises(SystemExit):
        parse(["--resume", str(lora_cli_run), "--lr", "0.1", "--lora-rank", "4"])
    assert "these differ: --lr 0.1 (the run used 0.001)" in capsys.readouterr().err
    a = parse(["--resume", str(lora_cli_run), "--epochs", "5"])
    assert (a.epochs, a.lora_rank, a.ema, a.resume, a.output) == (5, 4, 0.5, True, lora_cli_run)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    # a far too high LR makes the val loss rise at once: early stopping after 1 worse epoch
    ("head_only", ["--lr", "3.0", "--early-stopping", "1", "--epochs", "8"]),
    ("partial", ["--unfreeze-blocks", "1", "--epochs", "2"]),
    ("full", ["--epochs", "2"])])
def test_other_strategies(strategy, extra, data_csv, tiny_weights, compile_cache, tmp_path):
    out = tmp_path / strategy
    args = ["--data", str(data_csv), "--pdbs", str(CHAINS), "--preset", "tiny", "--weights", str(tiny_weights),
            "--strategy", strategy, *extra, "--max-len", "16", "--num-recycles", "0",
            "--precision", "fp32", "--output", str(out), "--split", "identity"]
    r = run_script(TRAIN, args, compile_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Strategy: {strategy}" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"]["name"] == strategy and "test_metrics" in report
    if "--early-stopping" in extra:
        assert report["early_stopped"] and report["epochs_run"] < 8
        assert f"Early stopping after epoch {report['epochs_run']}" in r.stdout
        val = [h["val_loss"] for h in report["history"]]
        assert report["epochs_run"] == report["best_epoch"] + 1 and min(val) == val[report["best_epoch"] - 1]


@pytest.mark.slow
def test_pt_weights_features_bf16(data_csv, tiny_weights, compile_cache, tmp_path):
    """An OpenFold .pt (converted on the fly, cached in the run folder), precomputed features
    (.npz: the chain's own sequence plus 3 point mutants as its MSA), bf16 compute, temporal split."""
    import torch

    from convert.torch_to_flax import flax_to_torch
    from molfun_jax.config import model_config
    from molfun_jax.data import parse_structure
    from molfun_jax.np import residue_constants as rc
    from molfun_jax.pretrained import load_pretrained

    params, _ = load_pretrained(tiny_weights, model_config("tiny"))
    pt = tmp_path / "tiny.pt"
    torch.save(flax_to_torch(params, model_config("tiny")), pt)
    feats = tmp_path / "features"
    feats.mkdir()
    for pid in IDS:
        seq = parse_structure(CHAINS / f"{pid}.pdb.gz")["sequence"]
        rows = [seq] + [seq[:i] + "A" + seq[i + 1:] for i in (3, 10, 20)]
        msa = np.asarray([[rc.HHBLITS_AA_TO_ID[c] for c in s] for s in rows], np.int32)
        np.savez(feats / f"{pid}.npz", msa=msa, deletion_matrix_int=np.zeros_like(msa))
    out = tmp_path / "run"
    args = ["--data", str(data_csv), "--pdbs", str(CHAINS), "--features", str(feats), "--preset", "tiny",
            "--weights", str(pt), "--strategy", "head_only", "--epochs", "1", "--max-len", "16",
            "--num-recycles", "0", "--precision", "bf16", "--split", "temporal", "--output", str(out)]
    r = run_script(TRAIN, args, compile_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Converting tiny.pt to Flax weights" in r.stdout and "| bfloat16" in r.stdout
    assert len(list((out / "weights_cache").iterdir())) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["base_weights"]["kind"] == "pt" and report["data"]["features"] == str(feats)


@pytest.mark.slow
def test_demo_tiny(compile_cache, tmp_path):
    """The demo's code path (synthetic data, random weights) on the tiny preset."""
    r = run_script(TRAIN, ["--demo", "--preset", "tiny", "--epochs", "2", "--output", str(tmp_path / "d")],
                   compile_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Demo: synthetic data, 6 train / 2 val chains of 32 residues" in r.stdout
    assert "Weights: none given -> random initialisation" in r.stdout
    assert "Model: OpenFold (84,922 params)" in r.stdout and "Epoch 2/2 | train_loss: " in r.stdout


@pytest.mark.slow
def test_demo_full_size(compile_cache, tmp_path):
    """README's demo: model_1_ptm (93,237,338 params), a few minutes on a 2-core CPU."""
    r = run_script(TRAIN, ["--demo", "--output", str(tmp_path / "d")], compile_cache, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Model: OpenFold (93,237,338 params)" in r.stdout
    assert "Strategy: head_only" in r.stdout and "Epoch 10/10 | train_loss: " in r.stdout
