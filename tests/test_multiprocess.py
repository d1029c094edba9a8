"""Multi-process training on JAX's distributed runtime: real `scripts/train.py` processes on
localhost (CPU, gloo collectives) train the tiny preset on the fixture chains (head_only: the
trunk runs once per example, so the data-parallel step is the head's; LoRA's trunk backward costs
minutes to compile per process on a 2-core machine). The truth is a
1-process run of the same flags: data parallelism sums the same per-example gradients, so the
losses and metrics agree to float32 round-off, and the checkpoint the processes wrote together
loads and predicts like the 1-process one."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.mp_driver import run_processes
from tests.product_data import CHAINS, compile_cache, data_csv, tiny_weights  # noqa: F401 (fixtures)

TRAIN = ROOT / "scripts" / "train.py"
RTOL = 1e-5


def run_flags(data: Path, weights: Path, out: Path, epochs: int, batch_size: int) -> list[str]:
    return ["--data", str(data), "--pdbs", str(CHAINS), "--preset", "tiny", "--weights", str(weights),
            "--strategy", "head_only", "--lr", "1e-3", "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--accum", "1", "--seed", "1", "--val-frac", "0.25",
            "--test-frac", "0.25", "--max-len", "16", "--num-recycles", "0", "--no-amp", "--quiet",
            "--output", str(out)]


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(f)]


def assert_same_metrics(got: Path, want: Path) -> None:
    a, b = metrics(got), metrics(want)
    assert len(a) == len(b) and a and list(a[0]) == list(b[0])
    for ra, rb in zip(a, b):
        for k in ra:
            if rb[k] in ("", "None"):
                assert ra[k] == rb[k], k
            else:
                x, y = float(ra[k]), float(rb[k])
                assert math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-12), f"epoch {ra['epoch']} {k}: {x} vs {y}"


def quiet(r) -> bool:
    """Whether a process printed nothing of its own (gloo's C++ connection line aside)."""
    return all(line.startswith("[Gloo]") for line in r.stdout.splitlines())


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_csv, tiny_weights, compile_cache) -> Path:
    out = tmp_path_factory.mktemp("mp") / "one"
    run_processes(TRAIN, run_flags(data_csv, tiny_weights, out, 2, 2), 1, compile_cache)
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(one_process_run, data_csv, tiny_weights, compile_cache, tmp_path):
    """2 processes x 1 device: the metrics equal the 1-process run's, process 0 alone reports,
    and the checkpoint the two processes wrote loads and predicts in this single process as the
    1-process run predicted its val / test splits (and as process 0 wrote them, gathered from
    both processes' shards)."""
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.checkpoint import verify
    from molfun_jax.data import AffinityDataset

    out = tmp_path / "two"
    ranks = run_processes(TRAIN, run_flags(data_csv, tiny_weights, out, 2, 2), 2, compile_cache)
    assert "Epoch 2/2 | train_loss: " in ranks[0].stdout and quiet(ranks[1])
    assert_same_metrics(out, one_process_run)
    saved = json.loads((out / "run_args.json").read_text())
    assert not {"coordinator_address", "num_processes", "process_id"} & set(saved)  # one launch's, not the run's
    for ckpt in (out / "checkpoints" / "2", out / "best" / "2"):
        verify(ckpt)  # the manifest process 0 wrote after both processes saved

    ds = AffinityDataset.from_csv(data_csv, CHAINS, buckets=(16,))
    got = dict(zip(ds.ids, MolfunStructureModel.load(out).predict([ds[i] for i in range(len(ds))], 2)))
    for split in ("val", "test"):  # the 1-process run's predictions, and those process 0 wrote
        for run in (one_process_run, out):
            with open(run / f"{split}_predictions.csv") as f:
                rows = list(csv.DictReader(f))
            assert rows
            np.testing.assert_allclose([got[r["pdb_id"]] for r in rows], [float(r["prediction"]) for r in rows],
                                       rtol=RTOL)


@pytest.mark.slow
def test_two_processes_resume_like_one(one_process_run, data_csv, tiny_weights, compile_cache, tmp_path):
    """2 processes train 2 epochs; with epoch 2's checkpoints removed (as if killed during epoch
    2: the LR schedule is the 2-epoch run's), 2 processes `--resume` from epoch 1 and end as the
    1-process run did."""
    out = tmp_path / "two"
    run_processes(TRAIN, run_flags(data_csv, tiny_weights, out, 2, 2), 2, compile_cache)
    for d in (out / "checkpoints" / "2", out / "best" / "2"):
        shutil.rmtree(d, ignore_errors=True)
    resumed = run_processes(TRAIN, ["--resume", str(out)], 2, compile_cache)
    assert f"Resuming {out} after epoch 1" in resumed[0].stdout and quiet(resumed[1])
    assert "Epoch 2/2 | train_loss: " in resumed[0].stdout
    assert_same_metrics(out, one_process_run)


@pytest.mark.slow
def test_two_processes_of_two_devices_train_like_one_of_four(data_csv, tiny_weights, compile_cache, tmp_path):
    """2 processes x 2 forced host devices (a 4-device mesh over both) equal 1 process x 4 devices."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_processes(TRAIN, run_flags(data_csv, tiny_weights, one, 2, 4), 1, compile_cache, devices=4)
    run_processes(TRAIN, run_flags(data_csv, tiny_weights, two, 2, 4), 2, compile_cache, devices=2)
    assert_same_metrics(two, one)
