"""`scripts.bench_train_step.run_rounds`: the benchmark's repeated, alternating side-by-side runs
(order, medians, per-round speed), checked with a stand-in worker and hand-computed values."""
from pathlib import Path

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
