"""`scripts.bench_train_step.run_rounds`: the benchmark's repeated, alternating side-by-side runs
(order, medians, per-round speed), checked with a stand-in worker and hand-computed values; the
error a failed worker reports; the inputs folder's reuse check."""
import json
from pathlib import Path

import pytest

import scripts.bench_train_step as bench

# per side, per round: step time, peak RSS; OpenFold's round 2 failed
FAKE = {"ours": [{"step_s": 8.0, "rss_gib": 1.3, "loss": 0.5}, {"step_s": 9.0, "rss_gib": 1.4, "loss": 0.5},
                 {"step_s": 7.0, "rss_gib": 1.2, "loss": 0.5}],
        "openfold": [{"step_s": 14.0, "rss_gib": 4.0}, {"error": ["killed"]}, {"step_s": 15.0, "rss_gib": 4.1}]}


def test_rounds_alternate_sides_and_report_medians_and_each_rounds_speed(monkeypatch):
    calls = []

    def worker(side, job, folder):
        calls.append(side)
        return FAKE[side][sum(c == side for c in calls) - 1]

    monkeypatch.setattr(bench, "worker", worker)
    ours, of, speeds = bench.run_rounds({}, Path("."), ["ours", "openfold"], 3)
    assert calls == ["ours", "openfold"] * 3
    assert ours["step_s"] == 8.0 and ours["rss_gib"] == 1.3 and ours["loss"] == 0.5  # medians of 3
    assert of["step_s"] == 14.5 and of["rss_gib"] == 4.05  # medians of the 2 good runs
    assert speeds == [14.0 / 8.0, 15.0 / 7.0]  # rounds with both sides good


def test_one_side_only_runs_that_side(monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "worker", lambda side, job, folder: ran.append(side) or {"step_s": 1.0})
    ours, of, speeds = bench.run_rounds({}, Path("."), ["ours"], 2)
    assert ran == ["ours", "ours"] and ours["step_s"] == 1.0 and of == {} and speeds == []


def test_a_failed_worker_reports_its_exception_not_jaxs_traceback_note():
    stderr = """Traceback (most recent call last):
  File "scripts/bench_train_step.py", line 188, in run_ours
    lowered = step.lower(state, frozen, batch)
ValueError: scan got `length` argument of 4 which disagrees with leading axis sizes [48, 48].
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off to include these.
"""
    assert bench.error_line(stderr) == ("ValueError: scan got `length` argument of 4 which disagrees with "
                                        "leading axis sizes [48, 48].")
    assert bench.error_line("Killed\n") == "Killed"
    assert bench.error_line("") == "no output"


def test_inputs_written_for_other_blocks_are_refused(tmp_path):
    (tmp_path / "variables.npz").write_bytes(b"")
    with pytest.raises(SystemExit, match="no inputs.json"):
        bench.check_inputs(tmp_path, "model_1_ptm", 0, None)
    (tmp_path / "inputs.json").write_text(json.dumps({"preset": "model_1_ptm", "seed": 0, "blocks": None}))
    bench.check_inputs(tmp_path, "model_1_ptm", 0, None)  # the same: reused
    with pytest.raises(SystemExit, match=rf"{tmp_path}: inputs written for blocks=None \(asked 4\)"):
        bench.check_inputs(tmp_path, "model_1_ptm", 0, 4)
    with pytest.raises(SystemExit, match=r"seed=0 \(asked 1\)"):
        bench.check_inputs(tmp_path, "model_1_ptm", 1, None)
