"""Experiment tracking: one small interface, three optional backends, all usable offline.

    tracker = make_tracker("mlflow", uri="file:./mlruns", run_dir="runs/x")
    tracker.log_params({"strategy": "lora", ...})      # the run's args and config (once)
    tracker.log_metrics({"train/loss": 0.3}, step=12)  # per optimizer step / per epoch
    tracker.log_artifact("runs/x/report.json")         # plots, report.json
    tracker.close()

* `tensorboard`: event files under `uri` (default `<run_dir>/tensorboard`); params as a text
  summary `config`, artifacts copied into `<logdir>/artifacts/`.
* `mlflow`: a run of experiment `molfun_jax` in the tracking store `uri` (default
  `file:<run_dir>/mlruns`, MLflow's local file store).
* `wandb`: a run in `uri`'s folder (default `<run_dir>`); offline unless `WANDB_MODE` says
  otherwise (`wandb sync` uploads it later).

Each backend is an optional extra (`pip install 'molfun-jax[mlflow]'`); a missing package is a
`TrackerError` naming it. Metric names: `train/loss`, `train/lr`, `train/grad_norm` per step,
`epoch/<history column>` per epoch.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
EXPERIMENT = "molfun_jax"


class TrackerError(ValueError):
    """A tracker that cannot be used (unknown kind, backend not installed)."""


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(f"--tracker {extra} needs the {extra!r} extra: pip install 'molfun-jax[{extra}]'") \
            from None


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as flat `a.b` -> string values (what MLflow / TensorBoard text can show)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


class Tracker:
    """The interface (and the `none` tracker: every call does nothing)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's arguments and config (nested mappings allowed)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at `step` (None values are skipped by the caller)."""

    def log_artifact(self, path: str | Path) -> None:
        """A file of the run (plot, report)."""

    def close(self) -> None:
        """Flush and finish the run."""


class TensorBoardTracker(Tracker):
    def __init__(self, logdir: Path) -> None:
        _require("tensorboard", "tensorboard")
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir))

    def _add(self, summary: Any, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(_flat(params).items()))
        self._add(text_pb("config", f"| key | value |\n|---|---|\n{rows}"), 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        for k, v in metrics.items():
            self._add(scalar_pb(k, float(v)), step)

    def log_artifact(self, path: str | Path) -> None:
        dest = self.logdir / "artifacts"
        dest.mkdir(exist_ok=True)
        shutil.copy2(path, dest / Path(path).name)

    def close(self) -> None:
        self._writer.close()


class MLflowTracker(Tracker):
    def __init__(self, uri: str, run_name: Optional[str]) -> None:
        mlflow = _require("mlflow", "mlflow")
        if uri.startswith("file:"):  # MLflow >= 3.x refuses its (maintained, offline) file store without this
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(EXPERIMENT)
        self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in _flat(params).items():
            self._client.log_param(self.run_id, k, v[:6000])  # MLflow's limit on a param value

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._client.log_metric(self.run_id, k, float(v), step=int(step))

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    def __init__(self, folder: Path, run_name: Optional[str]) -> None:
        wandb = _require("wandb", "wandb")
        folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=EXPERIMENT, name=run_name, dir=str(folder),
                               mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        self._files: list[Path] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_artifact(self, path: str | Path) -> None:
        self._run.save(str(Path(path).absolute()), base_path=str(Path(path).absolute().parent), policy="now")

    def close(self) -> None:
        self._run.finish()


def make_tracker(kind: str = "none", uri: Optional[str] = None, run_dir: Optional[str | Path] = None,
                 run_name: Optional[str] = None) -> Tracker:
    """A tracker of `kind` (one of TRACKERS); `uri` as in the module docstring, defaults under
    `run_dir` (the current folder without one)."""
    if kind not in TRACKERS:
        raise TrackerError(f"tracker {kind!r}: choose one of {', '.join(TRACKERS)}")
    base = Path(run_dir or ".").absolute()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(uri.removeprefix("file:")) if uri else base / "tensorboard")
    if kind == "mlflow":
        return MLflowTracker(uri or (base / "mlruns").as_uri(), run_name)
    if kind == "wandb":
        return WandbTracker(Path(uri.removeprefix("file:")) if uri else base, run_name)
    return Tracker()


def step_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A train step's `loss`, `lr`, `grad_norm` under their tracker names."""
    return {f"train/{k}": float(metrics[k]) for k in ("loss", "lr", "grad_norm") if k in metrics}


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row's numbers (not `epoch`, `step`, `best`, None, NaN) as `epoch/<column>`."""
    out = {}
    for k, v in row.items():
        if k in ("epoch", "step", "best") or not isinstance(v, (int, float)) or v != v:
            continue
        out[f"epoch/{k}"] = float(v)
    return out
