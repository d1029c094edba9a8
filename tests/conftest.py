import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures" / "structures"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def need_fixtures() -> None:
    """Skip the calling test when the shared structure fixtures are not beside the checkout."""
    if not (FIXTURES / "chains").is_dir():
        pytest.skip(f"fixture structures not found at {FIXTURES / 'chains'}")


def _strict() -> bool:
    """Under CI=true every skip is a failure: the suite's skips all stand for a missing OpenFold
    reference, torch or fixture, which a CI run must have (a green run must have run them)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skip(report, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true (a reference or fixture is missing): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped:  # a module-level skip (pytest.importorskip)
        _fail_skip(report, collector.nodeid)


def _parity_rows() -> list:
    ref = sys.modules.get("tests.reference") or sys.modules.get("reference")
    return getattr(ref, "PARITY", [])


_WORKER_PARITY: list = []  # rows sent back by pytest-xdist workers (each runs its own tests.reference)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the rows to the controller
        session.config.workeroutput["parity"] = [list(r) for r in _parity_rows()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKER_PARITY.extend(tuple(r) for r in getattr(node, "workeroutput", {}).get("parity", []))


def pytest_terminal_summary(terminalreporter):
    """Print (and save) the parity table collected by tests.reference.assert_parity."""
    rows = sorted(_parity_rows() + _WORKER_PARITY)
    if not rows:
        return
    lines = ["| module | max abs error (valid) | rel. error (valid) | rel. error (all positions) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {w} | {e:.2e} | {r:.2e} | {r_all:.2e} |" for w, e, r, r_all in rows]
    terminalreporter.write_sep("-", "OpenFold parity")
    terminalreporter.write_line("\n".join(lines))
    out = os.environ.get("MOLFUN_PARITY_REPORT")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
