"""Shim: `python scripts/predict.py ...` runs `molfun_jax.cli.predict.main` (see its docstring, or --help)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from molfun_jax.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
