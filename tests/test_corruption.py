"""Damaged checkpoints on real files written by a tiny API run (head-only, EMA on, 3 epochs):
each kind of damage to the newest epoch makes `fit(resume=True)` fall back to the newest intact
one, saying so, and the resumed run's losses equal the uninterrupted run's; the same damage to an
explicitly named checkpoint, an export or a converted-weights folder is a one-line
CheckpointError naming the path."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molfun_jax import checkpoint as ckpt
from molfun_jax.api import MolfunStructureModel
from molfun_jax.pretrained import load_pretrained
from molfun_jax.training import HeadOnly
from tests.conftest import ROOT
from tests.product_data import chain_examples, compile_cache, data_csv, fast_config, fast_weights  # noqa: F401

EPOCHS = 3
STRATEGY = HeadOnly(lr=3e-3, ema_decay=0.5, amp=False)
FIT = dict(epochs=EPOCHS, batch_size=1, progress=False)


def largest(folder: Path, under: str) -> Path:
    """The largest array data file of an orbax item (the params' chunks)."""
    return max((folder / under).rglob("d/*"), key=lambda f: f.stat().st_size)


def truncate(folder: Path, under: str) -> str:
    f = largest(folder, under)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f.relative_to(folder).as_posix()


def delete(folder: Path, under: str) -> str:
    f = largest(folder, under)
    f.unlink()
    return f.relative_to(folder).as_posix()


def garble(folder: Path, rel: str) -> str:
    (folder / rel).write_text('{"format": "molfun_jax.chec')  # cut mid-write
    return rel


def flip(folder: Path, rel: str) -> str:
    """One byte changed in the middle: same size, other content."""
    data = bytearray((folder / rel).read_bytes())
    data[len(data) // 2] ^= 0x5A
    (folder / rel).write_bytes(bytes(data))
    return rel


DAMAGE = {  # name -> (damage(folder) -> what, the expected reason in the message)
    "truncated_array": (lambda d: truncate(d, "trainable"), r"has \d+ bytes, \d+ were written"),
    "deleted_file": (lambda d: delete(d, "opt_state"), "is missing"),
    "checkpoint_metadata": (lambda d: flip(d, "_CHECKPOINT_METADATA"), "differs from what was written"),
    "meta_json": (lambda d: garble(d, "meta/metadata"), "not readable JSON|cannot restore meta"),
}


def make_model(weights) -> MolfunStructureModel:
    return MolfunStructureModel("tiny", STRATEGY, weights=weights, config=fast_config())


def strip(history):
    """A history as JSON text without timings (NaN metrics compare equal)."""
    return json.dumps([{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history])


@pytest.fixture(scope="module")
def run(tmp_path_factory, fast_weights, chain_examples):
    """An uninterrupted run (checkpoints 1..3, best/, its history) and an export of it."""
    out = tmp_path_factory.mktemp("corruption") / "run"
    model = make_model(fast_weights)
    history = model.fit(chain_examples[:3], chain_examples[3:5], output=out, keep=EPOCHS, **FIT)
    export = model.export(out.parent / "export")
    return out, history, export


def one_line_error(fn, path: Path, reason: str) -> str:
    with pytest.raises(ckpt.CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert str(path) in msg, msg
    assert re.search(reason, msg), msg
    return msg


def damaged_copy(run, tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    """(run copy, its damaged newest epoch folder, the expected reason)."""
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    newest = out / "checkpoints" / str(EPOCHS)
    damage, reason = DAMAGE[kind]
    damage(newest)
    return out, newest, reason


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_named_explicitly_is_a_one_line_error(kind, run, tmp_path):
    _, newest, reason = damaged_copy(run, tmp_path, kind)
    one_line_error(lambda: MolfunStructureModel.load(newest), newest, reason)
    one_line_error(lambda: ckpt.read_meta(newest), newest, reason)


# one resume in the default suite (~20 s each); every kind of damage with -m slow
@pytest.mark.parametrize("kind", [k if k == "truncated_array" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in sorted(DAMAGE)])
def test_resume_falls_back_to_newest_intact_checkpoint(kind, run, tmp_path, fast_weights, chain_examples, caplog):
    src, ref_history, _ = run
    out, newest, _ = damaged_copy(run, tmp_path, kind)
    # --resume falls back to epoch 2, says so, and epoch 3 comes out as in the uninterrupted run
    with caplog.at_level(logging.WARNING, logger="molfun_jax.checkpoint"):
        resumed = make_model(fast_weights)
        history = resumed.fit(chain_examples[:3], chain_examples[3:5], output=out, resume=True, keep=EPOCHS, **FIT)
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(newest) in w and "falling back" in w for w in warned), warned
    assert any("resuming from" in w and w.endswith(f"checkpoints/{EPOCHS - 1} (the newest intact checkpoint)")
               for w in warned), warned
    assert strip(history) == strip(ref_history)
    assert (out / "damaged" / f"checkpoints-{EPOCHS}").is_dir() and newest.is_dir()
    ckpt.verify(newest)  # rewritten intact
    val = chain_examples[3:5]
    assert np.array_equal(resumed.predict(val), MolfunStructureModel.load(src).predict(val))


@pytest.mark.parametrize("kind", ["truncated_array", "deleted_file", "meta_json"])
def test_damaged_export_is_a_one_line_error(kind, run, tmp_path):
    _, _, export = run
    out = tmp_path / "export"
    shutil.copytree(export, out)
    if kind == "meta_json":
        garble(out, "meta.json")
        reason = "not readable JSON"
    else:  # an export holds `params` (the merged trunk) and `head`
        (truncate if kind == "truncated_array" else delete)(out, "params" if kind == "truncated_array" else "head")
        reason = DAMAGE[kind][1]
    one_line_error(lambda: MolfunStructureModel.load(out), out, reason)


@pytest.mark.parametrize("kind", ["truncated_array", "meta_json"])
def test_damaged_weights_folder_is_a_one_line_error(kind, tmp_path, fast_weights):
    out = tmp_path / "weights"
    shutil.copytree(fast_weights, out)
    if kind == "meta_json":
        garble(out, "meta.json")
        where, reason = out / "meta.json", "not readable JSON"
    else:
        truncate(out, "params")
        where, reason = out, DAMAGE[kind][1]
    one_line_error(lambda: load_pretrained(out, fast_config()), where, reason)


def test_without_manifest_the_restore_still_catches_damage(run, tmp_path):
    """A checkpoint written before manifests existed: a truncated array file fails the restore,
    reported in one line (no tensorstore dump)."""
    src, _, _ = run
    out = tmp_path / "ckpt"
    shutil.copytree(src / "checkpoints" / "1", out / "1")
    (out / "1" / ckpt.MANIFEST).unlink()
    truncate(out / "1", "trainable")
    one_line_error(lambda: ckpt.restore(out / "1", items=("trainable",)), out / "1", "cannot restore trainable")


def test_no_event_loop_noise_at_exit(run, tmp_path):
    """A process that opens a run folder (with an interrupted write to clean up) and exits at once
    prints nothing: orbax's background cleanup thread used to die at interpreter shutdown."""
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    tmp = out / "checkpoints" / "4.orbax-checkpoint-tmp-99"
    tmp.mkdir()
    code = "import sys; from molfun_jax import checkpoint as c; c.RunCheckpointer(sys.argv[1]); sys.exit(0)"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-2000:]
    assert not tmp.exists()
