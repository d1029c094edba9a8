"""Predict binding affinities with a fine-tuned checkpoint (or a merged export).

    python scripts/predict.py runs/lora1 --data test.csv --pdbs structures/ --output preds.csv
    python scripts/predict.py exported/lora1 --pdbs structures/ --output preds.csv

CHECKPOINT: a run folder (its best epoch), `checkpoints/<epoch>`, `best/<epoch>`, a folder written
by `MolfunStructureModel.save`, or a `scripts/export.py` folder. With `--data`, the CSV's
`pdb_id` rows are predicted (optional `chain`, `ligand` columns as in training); when it has an
`affinity` column, RMSE / MAE / Pearson / Spearman are printed and written to
`<output>.metrics.json` with a scatter plot. Without `--data`, every structure of `--pdbs` is.
Output CSV: `pdb_id,prediction[,affinity,error]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="run folder, checkpoint folder or export folder")
    ap.add_argument("--data", type=Path, help="CSV with pdb_id (+ optional affinity, chain, ligand)")
    ap.add_argument("--pdbs", type=Path, required=True, help="folder of structures {pdb_id}.pdb|.cif[.gz]")
    ap.add_argument("--features", type=Path, help="folder of precomputed features {pdb_id}.pkl|.npz")
    ap.add_argument("--output", type=Path, default=Path("predictions.csv"), help="predictions CSV (default predictions.csv)")
    ap.add_argument("--batch-size", type=int, default=2, help="examples per forward pass (default 2)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="longest chain (longer ones cropped); default: the training run's --max-len")
    ap.add_argument("--weights", type=Path, help="base weights (.pt or converted folder) if they moved")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
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
    from molfun_jax.cli import run_prediction, run_reporting_errors

    return run_reporting_errors(lambda: run_prediction(a))


if __name__ == "__main__":
    sys.exit(main())
