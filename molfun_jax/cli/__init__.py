"""The command-line programs, as library modules (`scripts/*.py` are shims that call `main`):

* `molfun_jax.cli.train`   fine-tuning runs (`scripts/train.py`), `--config`, `--tracker`, `--resume`
* `molfun_jax.cli.predict` predictions from a checkpoint or export (`scripts/predict.py`)
* `molfun_jax.cli.export`  merged inference-only exports (`scripts/export.py`)
* `molfun_jax.cli.common`  flag tables, config files, exit codes, shared output helpers

Each `main(argv)` returns the exit code (2 with `error: ...` for a user error).
"""
