"""`--tracker`: a tiny head-only CLI run (in-process) logs to TensorBoard event files, an MLflow
file store and a wandb offline run; what is read back with each backend's own reader must equal
the run's metrics.csv."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.product_data import compile_cache, data_csv, tiny_run, tiny_weights  # noqa: F401 (fixtures)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(b), 1e-12)  # TensorBoard stores float32


def test_tensorboard_event_files(tmp_path, data_csv, tiny_weights, compile_cache):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    out = tmp_path / "run"
    rows = tiny_run(out, data_csv, tiny_weights, "--tracker", "tensorboard")
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    assert [s for s, _ in series("train/loss")] == [1, 2, 3, 4]  # 2 optimizer steps per epoch
    for r in rows:
        step = int(r["step"])
        epoch_losses = [v for s, v in series("train/loss") if step - 2 < s <= step]
        assert close(np.mean(epoch_losses), float(r["train_loss"]))  # equal-weight steps: the epoch mean
        assert close(dict(series("train/lr"))[step], float(r["lr"]))
        assert close(dict(series("epoch/val_loss"))[step], float(r["val_loss"]))
        assert close(dict(series("epoch/train_loss"))[step], float(r["train_loss"]))
    assert all(v > 0 and np.isfinite(v) for _, v in series("train/grad_norm"))
    config = tensor_util.make_ndarray(acc.Tensors("config")[0].tensor_proto).item().decode()
    assert "| args.strategy | head_only |" in config and "model_config." in config
    assert {p.name for p in (out / "tensorboard" / "artifacts").iterdir()} >= {"report.json", "loss.png",
                                                                              "val_scatter.png", "metrics.csv"}


@pytest.mark.slow  # a CLI run per tracker; TensorBoard's runs by default
def test_mlflow_file_store(tmp_path, data_csv, tiny_weights, compile_cache):
    import mlflow

    out, store = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    rows = tiny_run(out, data_csv, tiny_weights, "--tracker", "mlflow", "--tracker-uri", store)
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("molfun_jax").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["args.strategy"] == "head_only" and run.data.params["args.epochs"] == "2"
    for key, col in (("epoch/val_loss", "val_loss"), ("epoch/train_loss", "train_loss"), ("train/lr", "lr")):
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert all(np.isclose(hist[int(r["step"])], float(r[col]), rtol=1e-12) for r in rows), key
    assert len(client.get_metric_history(run.info.run_id, "train/grad_norm")) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.json", "loss.png", "metrics.csv"}


@pytest.mark.slow  # a CLI run per tracker; TensorBoard's runs by default
def test_wandb_offline_run_folder(tmp_path, data_csv, tiny_weights, compile_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    tiny_run(out, data_csv, tiny_weights, "--tracker", "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and (runs[0] / "files" / "report.json").is_file()


def test_missing_backend_names_the_extra(monkeypatch, tmp_path):
    from molfun_jax.tracking import TrackerError, make_tracker

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(TrackerError, match=r"pip install 'molfun-jax\[mlflow\]'"):
        make_tracker("mlflow", run_dir=tmp_path)
    with pytest.raises(TrackerError, match="choose one of none, tensorboard, mlflow, wandb"):
        make_tracker("neptune")
