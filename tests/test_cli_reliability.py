"""The commands facing damaged checkpoints, on real checkpoints written by `scripts/train.py`
(test_cli's tiny LoRA run, copied): `predict.py` / `export.py` of a damaged checkpoint exit 2
with one `error:` line naming it (no traceback), and `--resume` past a damaged newest checkpoint
says which epoch it falls back to and then trains the later epochs exactly as the uninterrupted
run did."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.product_data import CHAINS, compile_cache, data_csv, tiny_weights  # noqa: F401 (fixtures)
from tests.test_cli import TRAIN, lora_cli_run, metrics_rows, run_script  # noqa: F401 (fixture)
from tests.test_corruption import truncate

PREDICT, EXPORT = ROOT / "scripts" / "predict.py", ROOT / "scripts" / "export.py"


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def best_checkpoint(run: Path) -> Path:
    return max((d for d in (run / "best").iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


@pytest.mark.parametrize("script", ["predict", "export"])
def test_damaged_checkpoint_is_one_error_line(script, lora_cli_run, tmp_path, compile_cache):
    run = copy_run(lora_cli_run, tmp_path)
    best = best_checkpoint(run)
    rel = truncate(best, "trainable")
    args = ([str(run), "--pdbs", str(CHAINS), "--output", str(tmp_path / "p.csv")] if script == "predict"
            else [str(run), str(tmp_path / "exported")])
    r = run_script(PREDICT if script == "predict" else EXPORT, args, compile_cache)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and str(best) in lines[0] and rel in lines[0], lines[0]


@pytest.mark.slow  # ~30 s; test_corruption's resume fall-back runs by default
def test_resume_falls_back_past_a_damaged_newest_checkpoint(lora_cli_run, tmp_path, compile_cache):
    """The run kept checkpoints/2 and 3 (--keep 2): with 3's arrays truncated, `--resume` says it
    falls back to epoch 2, moves 3 aside and retrains epoch 3 as the uninterrupted run did."""
    run = copy_run(lora_cli_run, tmp_path)
    newest = run / "checkpoints" / "3"
    rel = truncate(newest, "trainable")
    r = run_script(TRAIN, ["--resume", str(run)], compile_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    said = next(line for line in r.stdout.splitlines() if line.startswith("Resuming"))
    assert said.startswith(f"Resuming {run} after epoch 2: fell back") and f"{newest}: damaged: {rel}" in said, said
    assert [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("Epoch ")] == ["Epoch 3/3"]
    assert metrics_rows(run) == metrics_rows(lora_cli_run)
    assert (run / "damaged" / "checkpoints-3").is_dir()


def test_max_skipped_steps_flag(data_csv, tmp_path, capsys):
    from molfun_jax.cli.train import parse_args
    from molfun_jax.training import MAX_SKIPPED_STEPS

    ok = ["--data", str(data_csv), "--pdbs", str(CHAINS), "--preset", "tiny", "--output", str(tmp_path / "o")]
    assert parse_args(ok).max_skipped_steps == MAX_SKIPPED_STEPS == 5
    assert parse_args(ok + ["--max-skipped-steps", "2"]).max_skipped_steps == 2
    with pytest.raises(SystemExit):
        parse_args(ok + ["--max-skipped-steps", "0"])
    assert "--max-skipped-steps must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("error", ["CheckpointError", "NonFiniteInputError", "SkippedStepsError"])
def test_run_errors_are_one_line(error, capsys):
    """What the commands print for the reliability errors: `error: ...`, exit 2, no traceback."""
    from molfun_jax import checkpoint, training
    from molfun_jax.cli.common import run_reporting_errors

    cls = getattr(checkpoint, error, None) or getattr(training, error)

    def fail() -> None:
        raise cls("runs/x/checkpoints/2: damaged: trainable/d/abc has 5 bytes, 10 were written")

    assert run_reporting_errors(fail) == 2
    err = capsys.readouterr().err
    assert err == "error: runs/x/checkpoints/2: damaged: trainable/d/abc has 5 bytes, 10 were written\n"
