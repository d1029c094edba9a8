"""`export.py`: a fine-tuned checkpoint as a merged, inference-only model: the whole AlphaFold
trunk with the LoRA adapters folded into its kernels (W + scale * A @ B), the head and meta.json.

    python scripts/export.py runs/lora1 exported/lora1          # the run's best checkpoint
    python scripts/export.py runs/lora1/checkpoints/7 exported/e7
    python scripts/predict.py exported/lora1 --pdbs structures/ --output preds.csv

The export needs no base weights to load (they are inside); a checkpoint does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from molfun_jax.cli.common import build_parser, enable_compilation_cache, flag, run_reporting_errors, say

FLAGS = [
    flag("checkpoint", type=Path, help="run folder (best epoch), checkpoints/<epoch> or best/<epoch>"),
    flag("output", type=Path, help="folder for the merged model"),
    flag("--weights", type=Path, help="the base weights (.pt or converted folder) if they moved"),
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser(FLAGS, prog="export.py", description=__doc__.split("\n\n")[0].strip('"'))
    a = ap.parse_args(argv)
    if not a.checkpoint.exists():
        ap.error(f"{a.checkpoint}: no such checkpoint or run folder")
    if a.output.exists() and any(a.output.iterdir()):
        ap.error(f"{a.output} exists and is not empty")
    from molfun_jax.api import export_checkpoint

    enable_compilation_cache()

    def export() -> None:
        say(f"Exported a merged inference-only model to {export_checkpoint(a.checkpoint, a.output, weights=a.weights)}")

    return run_reporting_errors(export)
