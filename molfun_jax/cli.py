"""What `scripts/train.py`, `scripts/predict.py` and `scripts/export.py` run (argument parsing
and validation live in the scripts): data loading, the model, the fit with checkpoints and
reports, the final evaluation, the demo's synthetic data."""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

Example = dict[str, Any]
DEMO_TRAIN, DEMO_VAL, DEMO_LEN = 6, 2, 32
# the strategy field that `--lr` sets (the head trains at 10x it, except under head_only)
LR_FIELD = {"head_only": "lr", "lora": "lr_lora", "partial": "lr_trunk", "full": "lr"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def run_reporting_errors(fn: Callable[[], Any]) -> int:
    """The scripts' exit code: 0, or 2 with `error: ...` on stderr for a user error (bad data,
    checkpoint, value or missing file) instead of a traceback."""
    from molfun_jax.data import DataError

    try:
        fn()
    except (DataError, ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def enable_compilation_cache() -> Optional[str]:
    """XLA's persistent compilation cache (a rerun skips compiling the model): `MOLFUN_JAX_CACHE`
    or ~/.cache/molfun_jax/xla; `MOLFUN_JAX_CACHE=off` disables it."""
    import jax

    where = os.environ.get("MOLFUN_JAX_CACHE", str(Path.home() / ".cache" / "molfun_jax" / "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return None
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return where


def default_precision() -> str:
    """bf16 on an accelerator, fp32 on CPU (bf16 matmuls are slow on CPUs)."""
    import jax

    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def build_strategy(a: argparse.Namespace):
    """The training.Strategy of the CLI flags (`--lr` None = the strategy's default LR)."""
    from molfun_jax.training import Full, HeadOnly, LoRA, Partial

    common = dict(warmup_steps=a.warmup, scheduler=a.scheduler, ema_decay=a.ema, accumulation_steps=a.accum,
                  grad_clip=a.grad_clip, amp=a.precision == "bf16", early_stopping_patience=a.early_stopping,
                  weight_decay=a.weight_decay)
    kind = {"head_only": HeadOnly, "lora": LoRA, "partial": Partial, "full": Full}[a.strategy]
    if a.lr is not None:
        common[LR_FIELD[a.strategy]] = a.lr
    if a.strategy == "lora":
        common["rank"] = a.lora_rank
    if a.strategy == "partial":
        common["unfreeze_last_n"] = a.unfreeze_blocks
    return kind(**common)


def strategy_line(model: Any) -> str:
    s = model.strategy
    plan = s.plan(model.variables, model.head_config.source)
    lrs = plan.learning_rates
    counts = plan.count(model.variables)
    detail = {"lora": f" (rank {getattr(s, 'rank', '')}, {', '.join(getattr(s, 'target_modules', ()))})",
              "partial": f" (last {getattr(s, 'unfreeze_last_n', '')} Evoformer blocks)",
              "full": f" (layer LR decay {getattr(s, 'layer_lr_decay', '')})"}.get(s.name, "")
    main = plan.primary_label
    lr = f"LR: {lrs[main]:.1e}" + (f" (head {lrs['head']:.1e})" if main != "head" else "")
    extras = []
    if s.warmup_steps:
        extras.append(f"warmup {s.warmup_steps}")
    extras.append(s.scheduler)
    if s.ema_decay:
        extras.append(f"EMA {s.ema_decay}")
    if s.early_stopping_patience:
        extras.append(f"early stopping {s.early_stopping_patience}")
    return (f"Strategy: {s.name}{detail} | trainable: {counts['total']:,} params | {lr} | "
            f"{', '.join(extras)} | {s.compute_dtype}")


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    val = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "-"
    extra = ""
    if row.get("val_rmse") is not None:
        extra = f" | val_rmse: {row['val_rmse']:.3f}"
    return (f"Epoch {row['epoch']}/{epochs} | train_loss: {row['train_loss']:.4f} | val_loss: {val}{extra} | "
            f"lr: {row['lr']:.2e} | {row['epoch_time_s']:.2f}s" + (" *" if row.get("best") else ""))


# ------------------------------------------------------------------------------ demo data
HYDROPHOBIC = frozenset("AVILMFWC")


def synthetic_structure(n_res: int, rng: np.random.Generator) -> dict[str, Any]:
    """A random sequence on an ideal alpha helix (N, CA, C, CB from residue_constants' backbone
    frame; glycine without CB): `parse_structure`'s layout."""
    from molfun_jax.np import residue_constants as rc

    aatype = rng.integers(0, 20, n_res).astype(np.int32)
    t = np.arange(n_res) * np.deg2rad(100.0)
    ca = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(n_res)], -1)
    pos = np.zeros((n_res, 37, 3), np.float32)
    mask = np.zeros((n_res, 37), np.float32)
    for i in range(n_res):
        prev, nxt = ca[max(i - 1, 0)], ca[min(i + 1, n_res - 1)]
        e1 = nxt - prev
        e1 /= np.linalg.norm(e1)
        v = ca[i] - 0.5 * (prev + nxt)
        e2 = v - e1 * (v @ e1)
        e2 /= np.linalg.norm(e2) if np.linalg.norm(e2) > 0 else 1.0
        rot = np.stack([e1, e2, np.cross(e1, e2)], -1)  # columns: local x, y, z
        name = rc.restype_1to3[rc.restypes[aatype[i]]]
        for atom, group, xyz in rc.rigid_group_atom_positions[name]:
            if group == 0:
                pos[i, rc.atom_order[atom]] = ca[i] + rot @ np.asarray(xyz)
                mask[i, rc.atom_order[atom]] = 1.0
    seq = "".join(rc.restypes[a] for a in aatype)
    return {"aatype": aatype, "atom_positions": pos, "atom_mask": mask, "residue_index": np.arange(1, n_res + 1),
            "chain_index": np.zeros(n_res, np.int32), "sequence": seq, "ligand_positions": np.zeros((0, 3), np.float32)}


def demo_data(seed: int = 0, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL,
              n_res: int = DEMO_LEN) -> tuple[list[Example], list[Example]]:
    """Synthetic examples: random helical chains of `n_res` residues; target (a pKd-like number)
    = 6 + 8 * (hydrophobic fraction - 0.4) + noise(0.2), so the composition is learnable. The
    validation chains are spread over the inner target range (every k-th by target, ends excluded),
    so that 2 of them are representative."""
    from molfun_jax.data.features import make_features

    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n_train + n_val):
        s = synthetic_structure(n_res, rng)
        frac = np.mean([c in HYDROPHOBIC for c in s["sequence"]])
        ex = make_features(s)
        ex["target"] = np.float32(6.0 + 8.0 * (frac - 0.4) + 0.2 * rng.standard_normal())
        ex["pdb_id"] = f"synthetic_{i:02d}"
        out.append(ex)
    order = np.argsort([float(e["target"]) for e in out], kind="stable")
    val_idx = set(order[np.linspace(1, len(out) - 2, n_val).round().astype(int)].tolist()) if n_val else set()
    return [e for i, e in enumerate(out) if i not in val_idx], [e for i, e in enumerate(out) if i in val_idx]


# ------------------------------------------------------------------------------ training run
def _fmt_metrics(m: Mapping[str, Any]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"
    return f"RMSE {f(m['rmse'])} | MAE {f(m['mae'])} | Pearson r {f(m['pearson'])} | Spearman {f(m['spearman'])}"


def write_predictions_csv(path: Path, ids: Sequence[str], pred: Sequence[float],
                          true: Optional[Sequence[Optional[float]]] = None) -> Path:
    """`pdb_id,prediction[,affinity,error]` (atomic)."""
    from molfun_jax.reports import _write_bytes_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    labelled = true is not None and any(t is not None for t in true)
    w.writerow(["pdb_id", "prediction"] + (["affinity", "error"] if labelled else []))
    for i, pid in enumerate(ids):
        row = [pid, f"{float(pred[i]):.6g}"]
        if labelled:
            t = true[i]
            row += ["", ""] if t is None else [f"{float(t):.6g}", f"{float(pred[i]) - float(t):.6g}"]
        w.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(path, buf.getvalue().encode())
    return path


def run_training(a: argparse.Namespace) -> dict[str, Any]:
    """The whole `train.py` run; returns the report (also written to `<output>/report.json`)."""
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.reports import plot_losses, plot_scatter, write_metrics_csv, write_report

    t_start = time.time()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache()
    if a.precision is None:
        a.precision = default_precision()

    if a.demo:
        train, val = demo_data(a.seed)
        test: list[Example] = []
        say(f"Demo: synthetic data, {len(train)} train / {len(val)} val chains of {DEMO_LEN} residues "
            "(target = pKd-like function of the hydrophobic fraction)")
        data_info = {"source": "demo", "n_res": DEMO_LEN}
    else:
        train, val, test, data_info = load_splits(a)
        say(f"Data: {data_info['n_loaded']} examples from {a.data} ({data_info['n_bad']} skipped) -> "
            f"{len(train)} train / {len(val)} val / {len(test)} test ({a.split} split), "
            f"lengths {data_info['lengths']}")
    if a.weights is None:
        say(f"Weights: none given -> random initialisation (seed {a.seed}); pass --weights for a "
            "pretrained OpenFold model")
    model = MolfunStructureModel(a.preset, build_strategy(a), weights=a.weights, num_recycles=a.num_recycles,
                                 seed=a.seed, cache_dir=out / "weights_cache", log=say)
    model.data_info = data_info
    if a.weights is not None:
        say(f"Weights: {a.weights} ({model.base_weights['kind']})")
    say(f"Model: OpenFold ({model.num_params:,} params) | preset {a.preset} | "
        f"{model.config.globals.num_recycles} recycles | {model.config.model.evoformer_stack.no_blocks} "
        f"Evoformer blocks")
    say(strategy_line(model))
    if a.demo and model.strategy.name == "head_only":
        say("Demo settings: head_only (the head trains on trunk outputs computed once: back-propagating "
            "through 48 blocks takes ~45 s/epoch on a 2-core CPU; try --demo --strategy lora), recycling off")
    if a.resume:
        from molfun_jax.checkpoint import RunCheckpointer

        runs = RunCheckpointer(out, a.keep)
        last = runs.latest_epoch()
        runs.close()
        if last is None:
            say(f"Resuming {out}: no epoch was completed, starting from the beginning")
            a.resume = False
        else:
            say(f"Resuming {out} after epoch {last}")

    def on_epoch(row: dict, m: Any) -> None:
        say(epoch_line(row, a.epochs))
        write_metrics_csv(out / "metrics.csv", m.history)
        plot_losses(m.history, out / "loss.png")

    model.history = []
    history = model.fit(train, val, epochs=a.epochs, batch_size=a.batch_size, output=out, keep=a.keep,
                        resume=bool(a.resume), progress=False if a.quiet else None, on_epoch_end=on_epoch)
    write_metrics_csv(out / "metrics.csv", history)
    if history:
        plot_losses(history, out / "loss.png")
    stopped = len(history) < a.epochs
    report: dict[str, Any] = {
        "output": str(out.absolute()), "preset": a.preset, "strategy": model.strategy.to_dict(),
        "epochs_run": len(history), "early_stopped": stopped, "best_epoch": model.best_epoch,
        "best_checkpoint": str(out.absolute() / "best" / str(model.best_epoch)) if model.best_epoch else None,
        "num_params": model.num_params, "trainable": model.trainable_counts(), "data": data_info,
        "norm": model.norm.to_dict(), "history": history, "base_weights": model.base_weights,
    }
    for name, exs in (("val", val), ("test", test)):
        if not exs:
            continue
        ev = model.evaluate(exs, a.batch_size)
        ids = [str(e.get("pdb_id", i)) for i, e in enumerate(exs)]
        write_predictions_csv(out / f"{name}_predictions.csv", ids, ev["predictions"], ev["targets"])
        plot_scatter(ev["targets"], ev["predictions"], out / f"{name}_scatter.png", title=name)
        report[f"{name}_metrics"] = {k: ev[k] for k in ("n", "rmse", "mae", "pearson", "spearman")}
        say(f"{name.capitalize()} ({len(exs)} examples, best epoch {model.best_epoch}): {_fmt_metrics(ev)}")
    report["wall_time_s"] = time.time() - t_start
    write_report(out / "report.json", report)
    if stopped:
        say(f"Early stopping after epoch {len(history)} (no better val loss for {a.early_stopping} epochs)")
    say(f"Done in {report['wall_time_s']:.0f}s. Run folder: {out} (report.json, metrics.csv, loss.png, "
        f"best/, checkpoints/)")
    return report


# ------------------------------------------------------------------------------ real data
def buckets_for(max_len: int) -> tuple[int, ...]:
    """The default length buckets below `max_len`, and `max_len` itself (longer chains are cropped
    to it, around the ligand when there is one)."""
    from molfun_jax.data import DEFAULT_BUCKETS

    return tuple(b for b in DEFAULT_BUCKETS if b < max_len) + (max_len,)


def _examples(ds: Any) -> list[Example]:
    return [{**ds[i], "pdb_id": pid} for i, pid in enumerate(ds.ids)]


def load_splits(a: argparse.Namespace) -> tuple[list[Example], list[Example], list[Example], dict[str, Any]]:
    """(train, val, test, description) from `--data/--pdbs/--features`, `--split`, `--max-len`."""
    from molfun_jax.data import AffinityDataset, identity_split, random_split, temporal_split

    ds = AffinityDataset.from_csv(a.data, a.pdbs, a.features, buckets=buckets_for(a.max_len))
    fractions = (1.0 - a.val_frac - a.test_frac, a.val_frac, a.test_frac)
    if a.split == "random":
        parts = random_split(ds, fractions, seed=a.seed)
    elif a.split == "temporal":
        try:
            parts = temporal_split(ds, fractions)
        except ValueError as e:
            raise ValueError(f"--split temporal: {e} (add a `year` column to {a.data})") from None
    else:
        parts = identity_split(ds, fractions, seed=a.seed)
    train, val, test = (_examples(p) for p in parts)
    if not train:
        raise ValueError(f"the {a.split} split of {len(ds)} entries left no training example")
    info = {"source": str(Path(a.data).absolute()), "structures": str(Path(a.pdbs).absolute()),
            "features": None if a.features is None else str(Path(a.features).absolute()),
            "n_loaded": len(ds), "n_bad": len(ds.bad), "split": a.split, "max_len": a.max_len,
            "buckets": list(buckets_for(a.max_len)),
            "lengths": {int(b): len(ix) for b, ix in ds.buckets().items()},
            "n_cropped": int(sum(e.cropped for e in ds.entries)),
            "splits": {"train": [e["pdb_id"] for e in train], "val": [e["pdb_id"] for e in val],
                       "test": [e["pdb_id"] for e in test]}}
    return train, val, test, info


# ------------------------------------------------------------------------------ prediction
def _structure_id(path: Path) -> str:
    from molfun_jax.data.dataset import STRUCTURE_SUFFIXES

    name = path.name
    for s in sorted(STRUCTURE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[:-len(s)]
    return path.stem


def prediction_entries(csv_path: Optional[Path], structures: Path, features: Optional[Path]) -> tuple[list, list, list]:
    """(entries, labels (None when unknown), bad) for predict.py: the CSV's rows (`pdb_id`, and
    optional `affinity`, `chain`, `ligand`), or every structure file of the folder."""
    from molfun_jax.data import BadEntry, Entry
    from molfun_jax.data.dataset import STRUCTURE_SUFFIXES, _find, _index_dir, _names
    from molfun_jax.data.precomputed import FEATURE_SUFFIXES

    index = _index_dir(structures)
    feat_index = _index_dir(features) if features is not None else {}
    rows: list[dict[str, str]] = []
    if csv_path is not None:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [(c or "").strip().lower() for c in reader.fieldnames or []]
            if "pdb_id" not in cols:
                raise ValueError(f"{csv_path}: no 'pdb_id' column (columns: {cols})")
            rows = [{(k or "").strip().lower(): (v or "") for k, v in r.items()} for r in reader]
    else:
        names = sorted({_structure_id(p) for p in index.values() if p.name.lower().endswith(STRUCTURE_SUFFIXES)})
        if not names:
            raise ValueError(f"{structures}: no structure files (*.pdb, *.cif, optionally .gz)")
        rows = [{"pdb_id": n} for n in names]
    entries, labels, bad = [], [], []
    for i, r in enumerate(rows, start=2):
        pid = r.get("pdb_id", "").strip()
        label: Optional[float] = None
        text = r.get("affinity", "").strip()
        if text:
            try:
                label = float(text)
            except ValueError:
                bad.append(BadEntry(i, pid, None, f"affinity {text!r} is not a number (predicted without label)"))
            if label is not None and not np.isfinite(label):
                label = None
        path = _find(index, pid, STRUCTURE_SUFFIXES) if pid else None
        if path is None:
            bad.append(BadEntry(i, pid, None, f"no structure file {pid}{{.cif,.pdb}}[.gz] in {structures}"))
            continue
        feat = None
        if features is not None:
            feat = _find(feat_index, pid, FEATURE_SUFFIXES)
            if feat is None:
                bad.append(BadEntry(i, pid, str(path), f"no precomputed features {pid}.pkl|.npz in {features}"))
                continue
        entries.append(Entry(pdb_id=pid, target=0.0 if label is None else label, row=i, structure=path,
                             features=feat, chains=_names(r.get("chain")), ligands=_names(r.get("ligand"))))
        labels.append(label)
    return entries, labels, bad


def run_prediction(a: argparse.Namespace) -> dict[str, Any]:
    """predict.py: checkpoint + CSV or folder -> predictions CSV (+ metrics when labelled)."""
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.data import BadEntry, DatasetConfig, DataError, FeatureConfig, build_example, render_bad_entries
    from molfun_jax.reports import plot_scatter, regression_metrics, write_report

    enable_compilation_cache()
    model = MolfunStructureModel.load(a.checkpoint, weights=a.weights)
    max_len = a.max_len or model.data_info.get("max_len") or 512
    say(f"Model: {a.checkpoint} (preset {model.preset}, strategy {model.strategy.name}, "
        f"{model.num_params:,} trunk params); max length {max_len}")
    entries, labels, bad = prediction_entries(a.data, a.pdbs, a.features)
    cfg = DatasetConfig(buckets=buckets_for(max_len))
    fc: FeatureConfig = cfg.features
    # the depths AffinityDataset.from_csv pads to: precomputed MSAs / templates, else 1 row each
    depths = (fc.max_msa_clusters, max(fc.max_extra_msa, 1), fc.max_templates) if a.features else (1, 1, 1)
    examples, ids, kept_labels = [], [], []
    for e, lab in zip(entries, labels):
        try:
            examples.append(build_example(e, cfg, depths))
        except DataError as err:
            bad.append(BadEntry(e.row, e.pdb_id, str(e.structure), getattr(err, "reason", str(err))))
            continue
        ids.append(e.key)
        kept_labels.append(lab)
    if bad:
        print(render_bad_entries(bad, f"{len(bad)} entries left out or unlabelled"), file=sys.stderr)
    if not examples:
        raise ValueError("no structure could be featurised: nothing to predict")
    pred = model.predict(examples, a.batch_size)
    out = write_predictions_csv(Path(a.output), ids, pred, kept_labels)
    say(f"Predicted {len(ids)} structures -> {out}")
    result: dict[str, Any] = {"checkpoint": str(a.checkpoint), "n": len(ids), "output": str(out)}
    have = [i for i, t in enumerate(kept_labels) if t is not None]
    if have:
        m = regression_metrics([kept_labels[i] for i in have], pred[have])
        result["metrics"] = m
        write_report(out.with_suffix(".metrics.json"), result)
        plot_scatter([kept_labels[i] for i in have], pred[have], out.with_name(out.stem + "_scatter.png"),
                     title="predictions")
        say(f"Metrics ({len(have)} labelled): {_fmt_metrics(m)}")
    return result
