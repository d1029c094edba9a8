"""Run reports: a rich progress bar, `metrics.csv` (one row per epoch), PNG plots (loss curves,
predicted-vs-true scatter with Pearson r and RMSE) and `report.json`.

Every file is rewritten whole through a temp file + rename, so a run killed at any point leaves
the last complete version (and a resumed run rewrites them from the restored history).
"""
from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from molfun_jax.atomic import write_bytes_atomic, write_json_atomic

METRIC_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "lr", "val_rmse", "val_mae", "val_pearson",
                  "val_spearman", "epoch_time_s", "skipped_steps")


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """RMSE, MAE, Pearson r and Spearman rho (r, rho are NaN when meaningless: fewer than 3
    points, where |r| is always 1, or a constant series)."""
    from scipy import stats

    t = np.asarray(y_true, np.float64)
    p = np.asarray(y_pred, np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal 1-D shapes")
    err = p - t
    out = {"n": int(t.size),
           "rmse": float(np.sqrt(np.mean(err ** 2))) if t.size else math.nan,
           "mae": float(np.mean(np.abs(err))) if t.size else math.nan,
           "pearson": math.nan, "spearman": math.nan}
    if t.size >= 3 and np.ptp(t) > 0 and np.ptp(p) > 0:
        out["pearson"] = float(stats.pearsonr(t, p)[0])
        out["spearman"] = float(stats.spearmanr(t, p)[0])
    return out


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj


def write_metrics_csv(path: str | Path, history: Iterable[Mapping[str, Any]]) -> Path:
    """`metrics.csv`: one row per epoch (columns METRIC_COLUMNS; missing values empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and math.isnan(row[k]))
                        else row[k]) for k in METRIC_COLUMNS})
    write_bytes_atomic(Path(path), buf.getvalue().encode())
    return Path(path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def plot_losses(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Train/validation loss per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [h.get("val_loss") for h in history]
    if any(v is not None and math.isfinite(v) for v in val):
        ax.plot(epochs, [math.nan if v is None else v for v in val], "s-", label="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (normalised targets)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_fig(fig, Path(path))


def plot_scatter(y_true: Sequence[float], y_pred: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Predicted vs true with the identity line, Pearson r and RMSE in the title."""
    plt = _pyplot()
    m = regression_metrics(y_true, y_pred)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y_true, y_pred, s=18, alpha=0.8)
    both = np.concatenate([np.asarray(y_true, float), np.asarray(y_pred, float)])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    r = "n/a" if math.isnan(m["pearson"]) else f"{m['pearson']:.3f}"
    ax.set_title(f"{title + ': ' if title else ''}r = {r}, RMSE = {m['rmse']:.3f} (n={m['n']})")
    ax.grid(alpha=0.3)
    return _save_fig(fig, Path(path))


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """`report.json` (strict JSON: NaN written as null)."""
    write_json_atomic(Path(path), json_safe(report))
    return Path(path)


class StepProgress:
    """A rich progress bar over the optimizer steps of one epoch (steps, ETA, running loss).

    Drawn only on an interactive terminal; in logs and tests it prints nothing (the per-epoch line
    is printed by the caller)."""

    def __init__(self, enabled: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console = Console(file=sys.stderr)
        self.enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=console, transient=True,
                                  disable=not self.enabled)
        self._task = None

    def __enter__(self) -> "StepProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, loss="-")

    def advance(self, loss: float | None = None, skipped: int = 0) -> None:
        fields = {} if loss is None else {"loss": f"{loss:.4f}" + (f" ({skipped} skipped)" if skipped else "")}
        self._progress.update(self._task, advance=1, **fields)
