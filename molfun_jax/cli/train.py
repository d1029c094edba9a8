"""`train.py`: fine-tune AlphaFold2 (OpenFold v1.0 weights, JAX/Flax) for binding affinity.

    python scripts/train.py --demo
    python scripts/train.py --data affinity.csv --pdbs structures/ --weights finetuning_ptm_2.pt \\
        --strategy lora --epochs 10 --output runs/lora1 [--tracker mlflow --tracker-uri file:./mlruns]
    python scripts/train.py --config run.yaml --epochs 3    # flags override the config's keys
    python scripts/train.py --resume runs/lora1             # continue a killed run

    python scripts/train.py --data pdbbind/INDEX_general_PL_data.2016 --pdbs pdbbind/ --strategy lora

`--data` is a CSV of `pdb_id,affinity` (and optional `year`, `chain`, `ligand`, `ligand_file`,
`smiles`, `resolution` columns) or a PDBbind index file; `--pdbs` holds `{pdb_id}.pdb|.cif[.gz]`
or the PDBbind layout `{pdb_id}/{pdb_id}_protein.pdb` + `_ligand.sdf|.mol2`. `--head` picks the
affinity head (`molfun_jax.heads.HEADS`; default ligand when every entry has a ligand).
`--config` (YAML or JSON) maps flag names (with `_`, e.g. `batch_size`) to values; the
`run_args.json` a run writes is such a config. Strategy flags (`--strategy`, `--lr`, each
strategy's own options) come from `molfun_jax.training.STRATEGIES`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from molfun_jax.cli.common import (Flag, apply_values, build_parser, buckets_for, check_ranges,
                                   default_precision, enable_compilation_cache, flag, fmt_metrics, given_dests,
                                   jsonable, read_config, run_reporting_errors, say, write_predictions_csv)
from molfun_jax.cli.launch import LAUNCH_DESTS, LAUNCH_FLAGS, join

Example = dict[str, Any]
SPLITS = ("random", "temporal", "identity")
RUN_ARGS = "run_args.json"
# flags a resumed run may change; every other flag must equal the saved one
RESUME_MUTABLE = ("epochs", "output", "resume", "keep", "quiet", "tracker", "tracker_uri", "config",
                  "max_skipped_steps", *LAUNCH_DESTS)
# the demo's own defaults (flags the user gives win): 6 train / 2 val synthetic chains of 32
# residues on the full model_1_ptm architecture. LoRA (the default strategy) back-propagates
# through 48 Evoformer blocks: about 45 s per epoch of 3 steps on a 2-core CPU, 8 min for 10
# epochs. So the demo trains the head on trunk outputs computed once (head_only), runs the trunk
# without recycling and takes one optimizer step per micro-batch (no accumulation): about 1.5 min.
DEMO_DEFAULTS = {"strategy": "head_only", "num_recycles": 0, "accum": 1, "preset": "model_1_ptm"}
GE0, GE1 = (lambda v: v >= 0, "must be >= 0"), (lambda v: v >= 1, "must be >= 1")
FRACTION = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
POSITIVE = (lambda v: v > 0, "must be > 0")


def _strategy_flags() -> list[Flag]:
    """`--strategy`, `--lr` and every registered strategy's own options."""
    from molfun_jax.training import STRATEGIES

    lrs = ", ".join(f"{n} {c.default_lr():g}" for n, c in STRATEGIES.items())
    out = [flag("--strategy", group="fine-tuning", choices=tuple(STRATEGIES), default="lora",
                help="; ".join(f"{n}: {(c.__doc__ or '').strip().splitlines()[0]}" for n, c in STRATEGIES.items())
                     + " (default lora)"),
           flag("--lr", group="fine-tuning", type=float, default=None,
                help="peak LR of what the strategy trains in the trunk (head_only: of the head); the head "
                     f"trains at 10x it. Default: the strategy's ({lrs})")]
    seen = set()
    for cls in STRATEGIES.values():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for o in cls.options:
            if o.dest not in seen:
                seen.add(o.dest)
                out.append(flag(f"--{o.flag}", group="fine-tuning", type=o.type, default=defaults[o.field],
                                help=o.help))
    return out


def train_flags() -> list[Flag]:
    """The flag table of train.py (read by the parser, `--config`, resume and the strategy)."""
    from molfun_jax.config import REMAT_CHOICES
    from molfun_jax.heads import HEADS
    from molfun_jax.tracking import TRACKERS
    from molfun_jax.training.guard import MAX_SKIPPED_STEPS
    from molfun_jax.training.schedules import SCHEDULERS

    d, m, t, o = "data", "model", "fine-tuning", "output"
    return [
        flag("--config", group=d, type=Path, default=None,
             help="run config (.yaml/.json) of flag names -> values; flags given here override it"),
        flag("--demo", group=d, action="store_true",
             help="synthetic data (6 train / 2 val chains of 32 residues) on the full model_1_ptm "
                  "architecture; demo defaults: --strategy head_only --num-recycles 0 --accum 1"),
        flag("--data", group=d, type=Path,
             help="CSV with pdb_id,affinity (+ optional year, chain, ligand, ligand_file, smiles), or a PDBbind "
                  "index file (INDEX_general_PL_data.2016; recognised by its content)"),
        flag("--pdbs", group=d, type=Path,
             help="folder of structures {pdb_id}.pdb|.cif[.gz] (ligand: the CSV's ligand residue, or "
                  "{pdb_id}_ligand.sdf|.mol2 next to it), or the PDBbind layout {pdb_id}/{pdb_id}_protein.pdb, "
                  "_ligand.sdf (falling back to .mol2), _pocket.pdb"),
        flag("--use-pocket-files", group=d, action="store_true",
             help="a PDBbind entry without {pdb_id}_protein.pdb uses its _pocket.pdb (default: a bad entry)"),
        flag("--max-resolution", group=d, type=float, default=None, valid=POSITIVE,
             help="leave out entries of a worse resolution, in Angstrom (and those without one, e.g. NMR)"),
        flag("--min-year", group=d, type=int, default=None, help="leave out entries released before this year"),
        flag("--max-year", group=d, type=int, default=None, help="leave out entries released after this year"),
        flag("--drop-ic50", group=d, action="store_true",
             help="leave out IC50 measurements (keep Kd / Ki; the index's measurement or a CSV `kind` column)"),
        flag("--features", group=d, type=Path,
             help="folder of precomputed OpenFold features {pdb_id}.pkl|.npz (pickles: your own files only)"),
        flag("--split", group=d, choices=SPLITS, default="random", help="train/val/test split (default random)"),
        flag("--val-frac", group=d, type=float, default=0.1, valid=FRACTION, help="validation fraction (default 0.1)"),
        flag("--test-frac", group=d, type=float, default=0.1, valid=FRACTION, help="test fraction (default 0.1)"),
        flag("--max-len", group=d, type=int, default=256, valid=(lambda v: v >= 8, "must be >= 8"),
             help="longest chain; longer ones are cropped around the ligand (default 256)"),
        flag("--weights", group=m, type=Path,
             help="OpenFold .pt (converted on the fly, cached in <output>/weights_cache) or a converted "
                  "folder (convert/torch_to_flax.py); default: random weights"),
        flag("--preset", group=m, default="model_1_ptm", help="model_1..5[_ptm] or tiny (default model_1_ptm)"),
        flag("--num-recycles", group=m, type=int, default=None, valid=GE0,
             help="recycling iterations (default: the preset's, 3)"),
        flag("--chunk-size", group=m, type=int, default=None, valid=GE1,
             help="run attention, outer product mean and transitions in chunks of this many rows, "
                  "recomputed in the backward pass: less memory for long crops, same numbers (default off)"),
        flag("--remat", group=m, choices=REMAT_CHOICES, default=None,
             help="what each block of the Evoformer, extra-MSA and template stacks keeps from its forward for "
                  "the backward, which recomputes the rest (default auto: matmul outputs for crops up to 64 "
                  "residues on a GPU/TPU, else LayerNorm statistics and ReLU masks); off: no recompute, faster, "
                  "several times the memory; same numbers"),
        flag("--precision", group=m, choices=("fp32", "bf16"), default=None,
             help="compute dtype (default bf16 on GPU/TPU, fp32 on CPU)"),
        flag("--no-amp", group=m, action="store_true", help="same as --precision fp32"),
        flag("--head", group=m, choices=tuple(HEADS), default=None,
             help="affinity head: " + "; ".join(f"{n}: {h.summary}" for n, h in HEADS.items())
                  + " (default: ligand when every entry has a ligand, else pocket)"),
        *_strategy_flags(),
        flag("--epochs", group=t, type=int, default=10, valid=GE1, help="(default 10)"),
        flag("--batch-size", group=t, type=int, default=2, valid=GE1, help="examples per micro-batch (default 2)"),
        flag("--accum", group=t, type=int, default=4, field="accumulation_steps",
             help="micro-batches per optimizer step (default 4)"),
        flag("--ema", group=t, type=float, default=0.0, field="ema_decay",
             help="EMA decay of the trained params, used for evaluation (default 0 = off; e.g. 0.999)"),
        flag("--warmup", group=t, type=int, default=0, field="warmup_steps", help="warmup optimizer steps (default 0)"),
        flag("--scheduler", group=t, choices=SCHEDULERS, default="cosine", field="scheduler",
             help="LR decay after warmup (default cosine)"),
        flag("--grad-clip", group=t, type=float, default=1.0, field="grad_clip",
             help="global-norm clip (default 1.0; 0 = off)"),
        flag("--weight-decay", group=t, type=float, default=0.01, field="weight_decay",
             help="AdamW decay of matrices (default 0.01)"),
        flag("--early-stopping", group=t, type=int, default=0, metavar="PATIENCE", field="early_stopping_patience",
             help="stop after PATIENCE epochs without a better val loss (default 0 = off)"),
        flag("--seed", group=t, type=int, default=0, help="init, split, data order, dropout (default 0)"),
        flag("--max-skipped-steps", group=t, type=int, default=MAX_SKIPPED_STEPS, valid=GE1, metavar="K",
             help="stop the run after K non-finite steps in a row (each is skipped: no update; "
                  f"default {MAX_SKIPPED_STEPS})"),
        flag("--output", group=o, type=Path, default=None, help="run folder (default runs/<timestamp>)"),
        flag("--resume", group=o, type=Path, nargs="?", const=True, default=None, metavar="RUN",
             help="continue a killed run from its last checkpoint, with its saved settings "
                  "(RUN, or --output RUN --resume); --epochs may be raised"),
        flag("--keep", group=o, type=int, default=3, valid=GE1, help="epoch checkpoints kept (default 3)"),
        flag("--quiet", group=o, action="store_true", help="no progress bar"),
        flag("--tracker", group=o, choices=TRACKERS, default="none",
             help="experiment tracker: per-step loss / LR / grad norm, per-epoch metrics, args, plots "
                  "(default none; extras: pip install 'molfun-jax[tensorboard|mlflow|wandb]')"),
        flag("--tracker-uri", group=o, default=None,
             help="tensorboard: log folder; mlflow: tracking URI (default file:<output>/mlruns); "
                  "wandb: folder (offline unless WANDB_MODE is set)"),
        *LAUNCH_FLAGS,
    ]


def build_train_parser(flags: Sequence[Flag]) -> argparse.ArgumentParser:
    return build_parser(flags, prog="train.py",
                        description="Fine-tune OpenFold (JAX) for protein-ligand binding affinity.",
                        epilog="Run folder: metrics.csv, loss.png, {val,test}_predictions.csv, "
                               "{val,test}_scatter.png, report.json, checkpoints/<epoch>, best/<epoch>, "
                               "run_args.json (a valid --config).")


# ------------------------------------------------------------------------------ the strategy
def build_strategy(a: argparse.Namespace, flags: Sequence[Flag] | None = None) -> Any:
    """The training.Strategy of the flags (`--lr` None = the strategy's default LR)."""
    from molfun_jax.training import STRATEGIES

    cls = STRATEGIES[a.strategy]
    kw = {f.field: getattr(a, f.dest) for f in (flags or train_flags()) if f.field}
    kw["amp"] = a.precision == "bf16"
    if a.lr is not None:
        kw[cls.lr_field] = a.lr
    kw.update({o.field: getattr(a, o.dest) for o in cls.options})
    return cls(**kw)


def _flag_of(field: str, strategy: Any, flags: Sequence[Flag]) -> str:
    """The flag that sets a strategy field (the field's name when no flag does)."""
    if field == strategy.lr_field:
        return "--lr"
    names = {f.field: f.option for f in flags if f.field} | {o.field: f"--{o.flag}" for o in strategy.options}
    return names.get(field, field)


def strategy_line(model: Any) -> str:
    s = model.strategy
    plan = s.plan(model.variables, model.head_config.source)
    lrs = plan.learning_rates
    detail = f" ({s.describe()})" if s.describe() else ""
    main = plan.primary_label
    lr = f"LR: {lrs[main]:.1e}" + (f" (head {lrs['head']:.1e})" if main != "head" else "")
    extras = [f"warmup {s.warmup_steps}"] if s.warmup_steps else []
    extras.append(s.scheduler)
    if s.ema_decay:
        extras.append(f"EMA {s.ema_decay}")
    if s.early_stopping_patience:
        extras.append(f"early stopping {s.early_stopping_patience}")
    return (f"Strategy: {s.name}{detail} | trainable: {plan.count(model.variables)['total']:,} params | {lr} | "
            f"{', '.join(extras)} | {s.compute_dtype}")


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    val = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "-"
    extra = f" | val_rmse: {row['val_rmse']:.3f}" if row.get("val_rmse") is not None else ""
    return (f"Epoch {row['epoch']}/{epochs} | train_loss: {row['train_loss']:.4f} | val_loss: {val}{extra} | "
            f"lr: {row['lr']:.2e} | {row['epoch_time_s']:.2f}s" + (" *" if row.get("best") else ""))


# ------------------------------------------------------------------------------ parsing
def _validate_paths(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if not a.demo:
        if a.data is None:
            ap.error("--data CSV is required (or --demo for synthetic data)")
        if not a.data.is_file():
            ap.error(f"--data {a.data}: no such file")
        if a.pdbs is None:
            ap.error("--pdbs DIR (the structures named in the CSV) is required with --data")
        if not a.pdbs.is_dir():
            ap.error(f"--pdbs {a.pdbs}: no such folder")
        if a.features is not None and not a.features.is_dir():
            ap.error(f"--features {a.features}: no such folder")
    if a.weights is not None:
        w = a.weights
        if not w.exists():
            ap.error(f"--weights {w}: no such file or folder")
        if w.is_file() and w.suffix not in (".pt", ".pth", ".ckpt"):
            ap.error(f"--weights {w}: expected an OpenFold .pt file or a converted folder")
        if w.is_dir() and not (w / "meta.json").is_file():
            ap.error(f"--weights {w}: not a converted weights folder (no meta.json); "
                     "convert a .pt with convert/torch_to_flax.py or pass the .pt itself")


def _validate_strategy(ap: argparse.ArgumentParser, a: argparse.Namespace, flags: Sequence[Flag]) -> None:
    """Build the strategy (its own __post_init__ checks the values) and check it fits the preset."""
    from molfun_jax.config import model_config
    from molfun_jax.training import STRATEGIES, StrategyError

    cls = STRATEGIES[a.strategy]
    try:
        strategy = build_strategy(a, flags)
    except StrategyError as e:
        ap.error(f"{_flag_of(e.field, cls, flags)} {e.why}")
    try:
        strategy.check_blocks(model_config(a.preset).model.evoformer_stack.no_blocks)
    except StrategyError as e:
        ap.error(f"{_flag_of(e.field, cls, flags)} {e.why} (preset {a.preset})")
    for other in STRATEGIES.values():
        for o in other.options:
            if o not in cls.options and getattr(a, o.dest) != _option_default(other, o.field):
                print(f"warning: --{o.flag} has no effect with --strategy {a.strategy}", file=sys.stderr)


def _option_default(cls: Any, field: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == field)


def validate(ap: argparse.ArgumentParser, a: argparse.Namespace, flags: Sequence[Flag],
             given: set[str]) -> argparse.Namespace:
    """Check values, paths and combinations; fill the demo's and the derived defaults."""
    from molfun_jax.config import PRESETS, TINY

    if a.demo:
        for k, v in DEMO_DEFAULTS.items():
            if k not in given:
                setattr(a, k, v)
        if any(getattr(a, k) is not None for k in ("data", "pdbs", "features")):
            ap.error("--demo makes its own synthetic data: drop --data/--pdbs/--features")
        if a.split == "temporal":
            ap.error("--split temporal needs a `year` column: not available with --demo")
    check_ranges(ap, flags, a)
    if a.val_frac + a.test_frac >= 1.0:
        ap.error("--val-frac + --test-frac must leave some training data")
    if a.preset not in PRESETS + (TINY,):
        ap.error(f"--preset {a.preset!r} is not one of {', '.join(PRESETS + (TINY,))}")
    if a.no_amp:
        if a.precision == "bf16":
            ap.error("--no-amp and --precision bf16 contradict each other")
        a.precision = "fp32"
    _validate_strategy(ap, a, flags)
    _validate_paths(ap, a)
    return a


def resolve_run(ap: argparse.ArgumentParser, a: argparse.Namespace, flags: Sequence[Flag],
                given: set[str]) -> argparse.Namespace:
    """Output folder; on --resume, the saved arguments (a flag that contradicts them is an error)."""
    if a.resume is not None:
        run = a.output if a.resume is True else a.resume
        if run is None:
            ap.error("--resume needs a run folder: --resume RUN (or --output RUN --resume)")
        saved_path = Path(run) / RUN_ARGS
        if not saved_path.is_file():
            ap.error(f"--resume {run}: not a run folder (no {RUN_ARGS})")
        saved = read_config(saved_path)
        clashes = [f"--{k.replace('_', '-')} {getattr(a, k)} (the run used {saved.get(k)})"
                   for k in sorted(given - set(RESUME_MUTABLE)) if jsonable(getattr(a, k)) != saved.get(k)]
        if clashes:
            ap.error("--resume continues a run with its own settings; these differ: " + "; ".join(clashes))
        apply_values(ap, a, flags, saved, given & set(RESUME_MUTABLE), f"--resume {saved_path}")
        given.update(saved)  # the saved values count as given (no demo defaults over them)
        a.output, a.resume = Path(run), True
        return a
    if a.output is None:
        a.output = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if a.output.exists() and any(a.output.iterdir()):
        ap.error(f"--output {a.output} exists and is not empty: choose another folder, or --resume {a.output}")
    return a


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """The arguments as `run_args.json` holds them: a valid `--config` (every flag but --config
    and the launch flags, which belong to one launch)."""
    d = {k: jsonable(v) for k, v in vars(a).items() if k != "config" and k not in LAUNCH_DESTS}
    d["resume"] = None
    return d


def save_run_args(a: argparse.Namespace) -> None:
    from molfun_jax.atomic import write_json_atomic

    a.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.output / RUN_ARGS, run_args(a))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = train_flags()
    ap = build_train_parser(flags)
    a = ap.parse_args(argv)
    given = given_dests(flags, argv)
    if a.config is not None:
        try:
            config = read_config(a.config)
        except ValueError as e:
            ap.error(str(e))
        apply_values(ap, a, flags, config, given, f"--config {a.config}")
        given.update(config)
    a = resolve_run(ap, a, flags, given)
    return validate(ap, a, flags, given)


# ------------------------------------------------------------------------------ the run
def load_splits(a: argparse.Namespace) -> tuple[list[Example], list[Example], list[Example], dict[str, Any]]:
    """(train, val, test, description) from `--data/--pdbs/--features`, `--split`, `--max-len`."""
    from molfun_jax.data import AffinityDataset, identity_split, random_split, temporal_split

    ds = AffinityDataset.from_csv(a.data, a.pdbs, a.features, buckets=buckets_for(a.max_len),
                                  use_pocket_files=a.use_pocket_files, filters=entry_filters(a))
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
    train, val, test = ([{**p[i], "pdb_id": pid} for i, pid in enumerate(p.ids)] for p in parts)
    if not train:
        raise ValueError(f"the {a.split} split of {len(ds)} entries left no training example")
    info = {"source": str(Path(a.data).absolute()), "structures": str(Path(a.pdbs).absolute()),
            "features": None if a.features is None else str(Path(a.features).absolute()),
            "n_loaded": len(ds), "n_bad": len(ds.bad), "split": a.split, "max_len": a.max_len,
            "buckets": list(buckets_for(a.max_len)),
            "lengths": _counts(e.bucket for e in ds.entries),
            "ligand_atoms": _counts(e.atom_bucket for e in ds.entries if e.has_ligand),
            "n_ligands": int(sum(e.has_ligand for e in ds.entries)), "has_ligands": ds.has_ligands,
            "ligand_sources": {e.key: e.ligand_source for e in ds.entries if e.has_ligand},
            "notes": [f"{k}: {w}" for k, w in ds.warnings()],
            "filtered": [f"{b.pdb_id}: {b.reason}" for b in ds.filtered],
            "n_cropped": int(sum(e.cropped for e in ds.entries)),
            "splits": {"train": [e["pdb_id"] for e in train], "val": [e["pdb_id"] for e in val],
                       "test": [e["pdb_id"] for e in test]}}
    return train, val, test, info


def _counts(values: Any) -> dict[int, int]:
    """{value: how many}, by value."""
    return dict(sorted(collections.Counter(int(v) for v in values).items()))


def entry_filters(a: argparse.Namespace) -> Any:
    """The `EntryFilters` of `--max-resolution`, `--min-year`, `--max-year`, `--drop-ic50`."""
    from molfun_jax.data import EntryFilters

    return EntryFilters(max_resolution=a.max_resolution, min_year=a.min_year, max_year=a.max_year,
                        drop_ic50=a.drop_ic50)


def choose_head(a: argparse.Namespace, info: Mapping[str, Any]) -> tuple[str, str]:
    """(head kind, why): `--head`, else ligand when every entry has a ligand, else pocket."""
    n, n_lig = info.get("n_loaded", 0), info.get("n_ligands", 0)
    if a.head == "ligand" and not info.get("has_ligands"):
        raise ValueError(f"--head ligand needs a ligand for every entry; {n - n_lig} of {n} have none (name it: "
                         "a `ligand` residue or `ligand_file` column, or the PDBbind layout's ligand file)")
    if a.head is not None:
        return a.head, "--head"
    if info.get("has_ligands"):
        return "ligand", f"every entry has a ligand ({n_lig} of {n}); --head pocket for the protein-only head"
    why = "synthetic data has no ligand" if a.demo else f"{n - n_lig} of {n} entries have no ligand file or named ligand"
    return "pocket", why


def load_data(a: argparse.Namespace) -> tuple[list[Example], list[Example], list[Example], dict[str, Any]]:
    """The demo's or the CSV's splits, announced."""
    from molfun_jax.data import DEMO_LEN, demo_data

    if a.demo:
        train, val = demo_data(a.seed)
        say(f"Demo: synthetic data, {len(train)} train / {len(val)} val chains of {DEMO_LEN} residues "
            "(target = pKd-like function of the hydrophobic fraction)")
        return train, val, [], {"source": "demo", "n_res": DEMO_LEN}
    train, val, test, info = load_splits(a)
    say(f"Data: {info['n_loaded']} examples from {a.data} ({info['n_bad']} skipped) -> "
        f"{len(train)} train / {len(val)} val / {len(test)} test ({a.split} split), lengths {info['lengths']}")
    if info["n_ligands"]:
        say(f"Ligands: {info['n_ligands']} of {info['n_loaded']} entries, atom buckets {info['ligand_atoms']}")
    if info["filtered"]:
        say(f"Filtered out: {len(info['filtered'])} ({'; '.join(info['filtered'])})")
    for note in info["notes"]:
        say(f"Note: {note}")
    return train, val, test, info


def build_model(a: argparse.Namespace, data_info: Mapping[str, Any]) -> Any:
    """The model of the flags, announced (weights, size, strategy)."""
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.config import remat_choice
    from molfun_jax.heads import HEADS

    kind, why = choose_head(a, data_info)
    if a.weights is None:
        say(f"Weights: none given -> random initialisation (seed {a.seed}); pass --weights for a "
            "pretrained OpenFold model")
    model = MolfunStructureModel(a.preset, build_strategy(a), weights=a.weights, num_recycles=a.num_recycles,
                                 chunk_size=a.chunk_size, remat=a.remat, head_config=HEADS[kind].config(), seed=a.seed,
                                 cache_dir=Path(a.output) / "weights_cache", log=say, data_info=data_info)
    if a.weights is not None:
        say(f"Weights: {a.weights} ({model.base_weights['kind']})")
    c = model.config
    say(f"Model: OpenFold ({model.num_params:,} params) | preset {a.preset} | {c.globals.num_recycles} recycles | "
        f"{c.model.evoformer_stack.no_blocks} Evoformer blocks | remat {remat_choice(c)}")
    say(f"Head: {kind} ({HEADS[kind].summary}; {model.trainable_counts().get('head', 0):,} params) -- {why}")
    say(strategy_line(model))
    if a.demo and model.strategy.name == "head_only":
        say("Demo settings: head_only (the head trains on trunk outputs computed once: back-propagating "
            "through 48 blocks takes ~45 s/epoch on a 2-core CPU; try --demo --strategy lora), recycling off")
    return model


def cache_line(model: Any, examples: Sequence[Example]) -> tuple[str, int]:
    """The head-only cache's memory ('' when the trunk trains, so nothing is cached) and the
    mean bytes per entry."""
    from molfun_jax.training import AffinityModel, cache_entry_bytes

    plan = model.strategy.plan(model.variables, model.head_config.source)
    if set(plan.learning_rates) != {"head"} or not examples:
        return "", 0
    inputs = AffinityModel(model.config, model.head_config).inputs  # what the cache keeps of an example
    per = [cache_entry_bytes(inputs(e), model.config.model.evoformer_stack.c_s) for e in examples]
    mean = int(round(sum(per) / len(per)))
    return (f"Head-only cache: trunk outputs computed once per entry (single representation + the head's inputs; "
            f"no pair representation): {mean / 2**10:,.0f} KiB per entry, {sum(per) / 2**20:,.1f} MiB for "
            f"{len(per)} entries"), mean


def resume_point(a: argparse.Namespace) -> bool:
    """Whether there is an epoch to resume from (announced)."""
    from molfun_jax.checkpoint import RunCheckpointer

    out = Path(a.output)
    runs = RunCheckpointer(out, a.keep)
    last = runs.latest_epoch()
    epoch, faults = runs.newest_intact()
    runs.close()
    if last is None:
        say(f"Resuming {out}: no epoch was completed, starting from the beginning")
    elif faults and epoch is not None:
        say(f"Resuming {out} after epoch {epoch}: fell back to it, the newest intact checkpoint "
            f"(newer ones are damaged and moved to {out / 'damaged'}: {'; '.join(faults)})")
    elif epoch is not None:
        say(f"Resuming {out} after epoch {epoch}")
    return last is not None


def evaluate_splits(a: argparse.Namespace, model: Any, splits: Mapping[str, list[Example]]) -> dict[str, Any]:
    """Predictions CSV, scatter plot and metrics of each non-empty split (best epoch's params)."""
    from molfun_jax.reports import plot_scatter
    from molfun_jax.training import is_primary

    out, metrics = Path(a.output), {}
    for name, exs in splits.items():
        if not exs:
            continue
        ev = model.evaluate(exs, a.batch_size)
        ids = [str(e.get("pdb_id", i)) for i, e in enumerate(exs)]
        if is_primary():
            write_predictions_csv(out / f"{name}_predictions.csv", ids, ev["predictions"], ev["targets"])
            plot_scatter(ev["targets"], ev["predictions"], out / f"{name}_scatter.png", title=name)
        metrics[f"{name}_metrics"] = {k: ev[k] for k in ("n", "rmse", "mae", "pearson", "spearman")}
        say(f"{name.capitalize()} ({len(exs)} examples, best epoch {model.best_epoch}): {fmt_metrics(ev)}")
    return metrics


def track_run(a: argparse.Namespace, model: Any) -> Any:
    """The run's tracker, with its args and config logged."""
    from molfun_jax.config import config_to_dict
    from molfun_jax.tracking import make_tracker
    from molfun_jax.training import is_primary

    kind = a.tracker if is_primary() else "none"  # process 0 alone reports
    tracker = make_tracker(kind, a.tracker_uri, a.output, run_name=Path(a.output).name)
    tracker.log_params({"args": run_args(a), "strategy": model.strategy.to_dict(),
                        "model_config": config_to_dict(model.config)})
    return tracker


def run_training(a: argparse.Namespace) -> dict[str, Any]:
    """The whole `train.py` run; returns the report (also written to `<output>/report.json`)."""
    from molfun_jax.reports import plot_losses, write_metrics_csv, write_report
    from molfun_jax.training import is_primary

    t_start, out, primary = time.time(), Path(a.output), is_primary()  # process 0 alone writes
    out.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache()
    if a.precision is None:
        a.precision = default_precision()
    train, val, test, data_info = load_data(a)
    model = build_model(a, data_info)
    cache_msg, cache_bytes = cache_line(model, train + val)
    if cache_msg:
        say(cache_msg)
    resume = bool(a.resume) and resume_point(a)
    tracker = track_run(a, model)

    def on_epoch(row: dict, m: Any) -> None:
        say(epoch_line(row, a.epochs))
        if primary:
            write_metrics_csv(out / "metrics.csv", m.history)
            plot_losses(m.history, out / "loss.png")

    try:
        history = model.fit(train, val, epochs=a.epochs, batch_size=a.batch_size, output=out, keep=a.keep,
                            resume=resume, progress=False if a.quiet or not primary else None,
                            on_epoch_end=on_epoch, tracker=tracker, max_skipped_steps=a.max_skipped_steps)
        if primary:
            write_metrics_csv(out / "metrics.csv", history)
            if history:
                plot_losses(history, out / "loss.png")
        stopped = len(history) < a.epochs
        report: dict[str, Any] = {
            "output": str(out.absolute()), "preset": a.preset, "strategy": model.strategy.to_dict(),
            "epochs_run": len(history), "early_stopped": stopped, "best_epoch": model.best_epoch,
            "best_checkpoint": str(out.absolute() / "best" / str(model.best_epoch)) if model.best_epoch else None,
            "num_params": model.num_params, "trainable": model.trainable_counts(), "data": data_info,
            "head": model.head_config.to_dict(), "cache_bytes_per_entry": cache_bytes or None,
            "norm": model.norm.to_dict(), "history": history, "base_weights": model.base_weights,
            **evaluate_splits(a, model, {"val": val, "test": test})}
        report["wall_time_s"] = time.time() - t_start
        if primary:
            write_report(out / "report.json", report)
        for f in ("report.json", "metrics.csv", "loss.png", "val_scatter.png", "test_scatter.png"):
            if (out / f).is_file():
                tracker.log_artifact(out / f)
    finally:
        tracker.close()
    if stopped:
        say(f"Early stopping after epoch {len(history)} (no better val loss for {a.early_stopping} epochs)")
    say(f"Done in {report['wall_time_s']:.0f}s. Run folder: {out} (report.json, metrics.csv, loss.png, "
        f"best/, checkpoints/)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    join(argv)  # before any other JAX use
    from molfun_jax.training import is_primary, sync

    a = parse_args(argv)
    sync("molfun_parsed")  # every process has checked that --output is new before process 0 fills it
    if not a.resume and is_primary():
        save_run_args(a)
    return run_reporting_errors(lambda: run_training(a))
