"""`predict.py`: binding affinities from a fine-tuned checkpoint (or a merged export).

    python scripts/predict.py runs/lora1 --data test.csv --pdbs structures/ --output preds.csv
    python scripts/predict.py exported/lora1 --pdbs structures/ --output preds.csv
    python scripts/predict.py runs/lig1 --data pdbbind/INDEX_general_PL_data.2016 --pdbs pdbbind/

CHECKPOINT: a run folder (its best epoch), `checkpoints/<epoch>`, `best/<epoch>`, a folder written
by `MolfunStructureModel.save`, or a `scripts/export.py` folder. With `--data`, the CSV's
`pdb_id` rows are predicted (optional `chain`, `ligand`, `ligand_file`, `smiles` columns as in
training; or a PDBbind index file); when it has affinities, RMSE / MAE / Pearson / Spearman are
printed and written to `<output>.metrics.json` with a scatter plot. Without `--data`, every
structure (or PDBbind entry folder) of `--pdbs` is. A model with the ligand head needs a ligand
for each entry (an entry without one is listed as left out); its ligand featurisation (atom
buckets, feature layout) is the checkpoint's.
Output CSV: `pdb_id,prediction[,affinity,error]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from molfun_jax.cli.common import (build_parser, buckets_for, enable_compilation_cache, flag, fmt_metrics,
                                   run_reporting_errors, say, write_predictions_csv)
from molfun_jax.cli.launch import LAUNCH_FLAGS, join

FLAGS = [
    flag("checkpoint", type=Path, help="run folder, checkpoint folder or export folder"),
    flag("--data", type=Path,
         help="CSV with pdb_id (+ optional affinity, chain, ligand, ligand_file, smiles), or a PDBbind index file"),
    flag("--pdbs", type=Path, required=True,
         help="folder of structures {pdb_id}.pdb|.cif[.gz], or the PDBbind layout {pdb_id}/{pdb_id}_protein.pdb"),
    flag("--use-pocket-files", action="store_true",
         help="a PDBbind entry without {pdb_id}_protein.pdb uses its _pocket.pdb"),
    flag("--features", type=Path, help="folder of precomputed features {pdb_id}.pkl|.npz"),
    flag("--output", type=Path, default=Path("predictions.csv"), help="predictions CSV (default predictions.csv)"),
    flag("--batch-size", type=int, default=2, help="examples per forward pass (default 2)"),
    flag("--max-len", type=int, default=None,
         help="longest chain (longer ones cropped); default: the training run's --max-len"),
    flag("--weights", type=Path, help="base weights (.pt or converted folder) if they moved"),
    *LAUNCH_FLAGS,
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = build_parser(FLAGS, prog="predict.py", description=__doc__.split("\n\n")[0].strip('"'))
    a = ap.parse_args(argv)
    if not a.checkpoint.exists():
        ap.error(f"{a.checkpoint}: no such checkpoint, run or export folder")
    if a.data is not None and not a.data.is_file():
        ap.error(f"--data {a.data}: no such file")
    if not a.pdbs.is_dir():
        ap.error(f"--pdbs {a.pdbs}: no such folder")
    if a.features is not None and not a.features.is_dir():
        ap.error(f"--features {a.features}: no such folder")
    if a.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if a.max_len is not None and a.max_len < 8:
        ap.error("--max-len must be >= 8")
    if a.output.is_dir():
        ap.error(f"--output {a.output} is a folder: give a CSV file name")
    return a


def run_prediction(a: argparse.Namespace) -> dict[str, Any]:
    """Checkpoint + CSV or folder -> predictions CSV (+ metrics when labelled)."""
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.data import BadEntry, DatasetConfig, build_examples, example_depths, read_entries, render_bad_entries
    from molfun_jax.heads import head_kind
    from molfun_jax.reports import plot_scatter, regression_metrics, write_report
    from molfun_jax.training import is_primary

    enable_compilation_cache()
    model = MolfunStructureModel.load(a.checkpoint, weights=a.weights)
    max_len = a.max_len or model.data_info.get("max_len") or 512
    head = model.head_config.kind
    say(f"Model: {a.checkpoint} (preset {model.preset}, strategy {model.strategy.name}, {head} head, "
        f"{model.num_params:,} trunk params); max length {max_len}")
    entries, bad = read_entries(a.data, a.pdbs, a.features, labelled=False, use_pocket_files=a.use_pocket_files)
    cfg = DatasetConfig(buckets=buckets_for(max_len), ligand=model.ligand_config)
    entries, examples, failed = build_examples(entries, cfg, example_depths(cfg, a.features is not None))
    if head_kind(model.head_config).input_keys:  # the ligand head reads a ligand
        lig = [i for i, e in enumerate(entries) if e.has_ligand]
        failed += [BadEntry(e.row, e.pdb_id, str(e.structure), f"no ligand: the {head} head needs one")
                   for e in entries if not e.has_ligand]
        entries, examples = [entries[i] for i in lig], [examples[i] for i in lig]
    for e in entries:
        for w in e.warnings:
            say(f"Note: {e.key}: {w}")
    bad = sorted(bad + failed, key=lambda b: b.row or 0)
    if bad:
        print(render_bad_entries(bad, f"{len(bad)} entries left out or unlabelled"), file=sys.stderr)
    if not examples:
        raise ValueError("no structure could be featurised: nothing to predict")
    ids, labels = [e.key for e in entries], [e.target for e in entries]
    pred = model.predict(examples, a.batch_size)  # every process takes part; process 0 writes
    out, primary = Path(a.output), is_primary()
    if primary:
        write_predictions_csv(out, ids, pred, labels)
    say(f"Predicted {len(ids)} structures -> {out}")
    result: dict[str, Any] = {"checkpoint": str(a.checkpoint), "n": len(ids), "output": str(out)}
    have = [i for i, t in enumerate(labels) if t is not None]
    if have:
        truth = [labels[i] for i in have]
        result["metrics"] = m = regression_metrics(truth, pred[have])
        if primary:
            write_report(out.with_suffix(".metrics.json"), result)
            plot_scatter(truth, pred[have], out.with_name(out.stem + "_scatter.png"), title="predictions")
        say(f"Metrics ({len(have)} labelled): {fmt_metrics(m)}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    join(argv)  # before any other JAX use
    a = parse_args(argv)
    return run_reporting_errors(lambda: run_prediction(a))
