"""Fine-tune AlphaFold2 (OpenFold v1.0 weights, JAX/Flax) for binding affinity.

    python scripts/train.py --demo
    python scripts/train.py --data affinity.csv --pdbs structures/ --weights finetuning_ptm_2.pt \
        --strategy lora --epochs 10 --output runs/lora1
    python scripts/train.py --resume runs/lora1            # continue a killed run
    python scripts/export.py runs/lora1 exported/           # merged, inference-only model
    python scripts/predict.py runs/lora1 --data test.csv --pdbs structures/ --output preds.csv

The CSV has `pdb_id,affinity` (and optional `year`, `chain`, `ligand`, `resolution` columns);
`--pdbs` holds `{pdb_id}.pdb|.cif[.gz]`. See `molfun_jax.api` for the Python API.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STRATEGIES = ("head_only", "lora", "partial", "full")
SPLITS = ("random", "temporal", "identity")
SCHEDULERS = ("cosine", "linear", "constant")
RUN_ARGS = "run_args.json"
# flags a resumed run may change; every other flag must equal the saved one
RESUME_MUTABLE = ("epochs", "output", "resume", "keep", "quiet")
# the demo's own defaults (flags the user gives win): 6 train / 2 val synthetic chains of 32
# residues on the full model_1_ptm architecture. LoRA (the default strategy) back-propagates
# through 48 Evoformer blocks: about 45 s per epoch of 3 steps on a 2-core CPU, 8 min for 10
# epochs. So the demo trains the head on trunk outputs computed once (head_only), runs the trunk
# without recycling and takes one optimizer step per micro-batch (no accumulation): about 1.5 min.
DEMO_DEFAULTS = {"strategy": "head_only", "num_recycles": 0, "accum": 1, "preset": "model_1_ptm"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py", description="Fine-tune OpenFold (JAX) for protein-ligand binding affinity.",
        epilog="Run folder: metrics.csv, loss.png, {val,test}_predictions.csv, {val,test}_scatter.png, "
               "report.json, checkpoints/<epoch>, best/<epoch>, run_args.json.")
    d = ap.add_argument_group("data")
    d.add_argument("--demo", action="store_true",
                   help="synthetic data (6 train / 2 val chains of 32 residues) on the full model_1_ptm "
                        "architecture; demo defaults: --strategy head_only --num-recycles 0 --accum 1")
    d.add_argument("--data", type=Path, help="CSV with pdb_id,affinity (+ optional year, chain, ligand)")
    d.add_argument("--pdbs", type=Path, help="folder of structures {pdb_id}.pdb|.cif[.gz]")
    d.add_argument("--features", type=Path,
                   help="folder of precomputed OpenFold features {pdb_id}.pkl|.npz (pickles: your own files only)")
    d.add_argument("--split", choices=SPLITS, default="random", help="train/val/test split (default random)")
    d.add_argument("--val-frac", type=float, default=0.1, help="validation fraction (default 0.1)")
    d.add_argument("--test-frac", type=float, default=0.1, help="test fraction (default 0.1)")
    d.add_argument("--max-len", type=int, default=256,
                   help="longest chain; longer ones are cropped around the ligand (default 256)")
    m = ap.add_argument_group("model")
    m.add_argument("--weights", type=Path,
                   help="OpenFold .pt (converted on the fly, cached in <output>/weights_cache) or a converted "
                        "folder (convert/torch_to_flax.py); default: random weights")
    m.add_argument("--preset", default="model_1_ptm", help="model_1..5[_ptm] or tiny (default model_1_ptm)")
    m.add_argument("--num-recycles", type=int, default=None, help="recycling iterations (default: the preset's, 3)")
    m.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="compute dtype (default bf16 on GPU/TPU, fp32 on CPU)")
    m.add_argument("--no-amp", action="store_true", help="same as --precision fp32")
    t = ap.add_argument_group("fine-tuning")
    t.add_argument("--strategy", choices=STRATEGIES, default="lora", help="(default lora)")
    t.add_argument("--lora-rank", type=int, default=8, help="LoRA rank, on q and v of the Evoformer (default 8)")
    t.add_argument("--unfreeze-blocks", type=int, default=4,
                   help="partial: the last N Evoformer blocks are trained (default 4)")
    t.add_argument("--lr", type=float, default=None,
                   help="peak LR of what the strategy trains in the trunk (head_only: of the head); the head "
                        "trains at 10x it. Default: the strategy's (lora 1e-4, partial/full 1e-5, head_only 1e-3)")
    t.add_argument("--epochs", type=int, default=10, help="(default 10)")
    t.add_argument("--batch-size", type=int, default=2, help="examples per micro-batch (default 2)")
    t.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    t.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the trained params, used for evaluation (default 0 = off; e.g. 0.999)")
    t.add_argument("--warmup", type=int, default=0, help="warmup optimizer steps (default 0)")
    t.add_argument("--scheduler", choices=SCHEDULERS, default="cosine", help="LR decay after warmup (default cosine)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (default 1.0; 0 = off)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of matrices (default 0.01)")
    t.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better val loss (default 0 = off)")
    t.add_argument("--seed", type=int, default=0, help="init, split, data order, dropout (default 0)")
    o = ap.add_argument_group("output")
    o.add_argument("--output", type=Path, default=None, help="run folder (default runs/<timestamp>)")
    o.add_argument("--resume", type=Path, nargs="?", const=True, default=None, metavar="RUN",
                   help="continue a killed run from its last checkpoint, with its saved settings "
                        "(RUN, or --output RUN --resume); --epochs may be raised")
    o.add_argument("--keep", type=int, default=3, help="epoch checkpoints kept (default 3)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def explicit_flags(ap: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags that appear on the command line."""
    probe = argparse.ArgumentParser(add_help=False)
    for a in ap._actions:
        if a.option_strings and a.dest != "help":
            kw = {"nargs": a.nargs} if a.nargs is not None else {}
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                probe.add_argument(*a.option_strings, dest=a.dest, action="store_const", const=True,
                                   default=argparse.SUPPRESS)
            else:
                probe.add_argument(*a.option_strings, dest=a.dest, default=argparse.SUPPRESS,
                                   const=a.const, **kw)
    ns, _ = probe.parse_known_args(list(argv))
    return set(vars(ns))


def _ranges(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    checks = [
        ("--lora-rank", a.lora_rank >= 1, "must be >= 1"),
        ("--unfreeze-blocks", a.unfreeze_blocks >= 1, "must be >= 1"),
        ("--lr", a.lr is None or a.lr > 0, "must be > 0"),
        ("--epochs", a.epochs >= 1, "must be >= 1"),
        ("--batch-size", a.batch_size >= 1, "must be >= 1"),
        ("--accum", a.accum >= 1, "must be >= 1"),
        ("--ema", 0.0 <= a.ema < 1.0, "is an EMA decay in [0, 1) (0 = off, e.g. 0.999)"),
        ("--warmup", a.warmup >= 0, "must be >= 0"),
        ("--grad-clip", a.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("--weight-decay", a.weight_decay >= 0, "must be >= 0"),
        ("--early-stopping", a.early_stopping >= 0, "must be >= 0 (0 = off)"),
        ("--max-len", a.max_len >= 8, "must be >= 8"),
        ("--num-recycles", a.num_recycles is None or a.num_recycles >= 0, "must be >= 0"),
        ("--val-frac", 0.0 <= a.val_frac < 1.0, "must be in [0, 1)"),
        ("--test-frac", 0.0 <= a.test_frac < 1.0, "must be in [0, 1)"),
        ("--val-frac + --test-frac", a.val_frac + a.test_frac < 1.0, "must leave some training data"),
        ("--keep", a.keep >= 1, "must be >= 1"),
    ]
    for flag, ok, why in checks:
        if not ok:
            ap.error(f"{flag} {why}")


def validate(ap: argparse.ArgumentParser, a: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """Check values, paths and combinations; fill the demo's and the derived defaults."""
    from molfun_jax.config import PRESETS, TINY, model_config

    if a.demo:
        for k, v in DEMO_DEFAULTS.items():
            if k not in given:
                setattr(a, k, v)
        if {"data", "pdbs", "features"} & given:
            ap.error("--demo makes its own synthetic data: drop --data/--pdbs/--features")
    _ranges(ap, a)
    if a.preset not in PRESETS + (TINY,):
        ap.error(f"--preset {a.preset!r} is not one of {', '.join(PRESETS + (TINY,))}")
    no_blocks = model_config(a.preset).model.evoformer_stack.no_blocks
    if a.strategy == "partial" and a.unfreeze_blocks > no_blocks:
        ap.error(f"--unfreeze-blocks {a.unfreeze_blocks}: preset {a.preset} has {no_blocks} Evoformer blocks")
    if a.no_amp:
        if a.precision == "bf16":
            ap.error("--no-amp and --precision bf16 contradict each other")
        a.precision = "fp32"
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
    if a.strategy != "lora" and "lora_rank" in given:
        print(f"warning: --lora-rank has no effect with --strategy {a.strategy}", file=sys.stderr)
    if a.strategy != "partial" and "unfreeze_blocks" in given:
        print(f"warning: --unfreeze-blocks has no effect with --strategy {a.strategy}", file=sys.stderr)
    if a.split == "temporal" and a.demo:
        ap.error("--split temporal needs a `year` column: not available with --demo")
    return a


def resolve_run(ap: argparse.ArgumentParser, a: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """Output folder; on --resume, the saved arguments (a flag that contradicts them is an error)."""
    if a.resume is not None:
        run = a.output if a.resume is True else a.resume
        if run is None:
            ap.error("--resume needs a run folder: --resume RUN (or --output RUN --resume)")
        saved_path = Path(run) / RUN_ARGS
        if not saved_path.is_file():
            ap.error(f"--resume {run}: not a run folder (no {RUN_ARGS})")
        saved = json.loads(saved_path.read_text())
        clashes = []
        for k in sorted(given - set(RESUME_MUTABLE)):
            if _jsonable(getattr(a, k)) != saved.get(k):
                clashes.append(f"--{k.replace('_', '-')} {getattr(a, k)} (the run used {saved.get(k)})")
        if clashes:
            ap.error("--resume continues a run with its own settings; these differ: " + "; ".join(clashes))
        for k, v in saved.items():
            if k not in RESUME_MUTABLE or k not in given:
                setattr(a, k, Path(v) if k in _PATHS and v is not None else v)
        given.update(saved)  # the saved values count as given (no demo defaults over them)
        a.output = Path(run)
        a.resume = True
        return a
    if a.output is None:
        a.output = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if a.output.exists() and any(a.output.iterdir()):
        ap.error(f"--output {a.output} exists and is not empty: choose another folder, or --resume {a.output}")
    return a


_PATHS = ("data", "pdbs", "features", "weights", "output")


def _jsonable(v: Any) -> Any:
    return str(Path(v).absolute()) if isinstance(v, Path) else v


def save_run_args(a: argparse.Namespace) -> None:
    from molfun_jax.pretrained import write_json_atomic

    a.output.mkdir(parents=True, exist_ok=True)
    d = {k: _jsonable(v) for k, v in vars(a).items()}
    d["resume"] = None
    write_json_atomic(a.output / RUN_ARGS, d)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    a = ap.parse_args(argv)
    given = explicit_flags(ap, argv)
    a = resolve_run(ap, a, given)
    return validate(ap, a, given)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    from molfun_jax.cli import run_reporting_errors, run_training

    if not a.resume:
        save_run_args(a)
    return run_reporting_errors(lambda: run_training(a))


if __name__ == "__main__":
    sys.exit(main())
