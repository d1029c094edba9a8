import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures" / "structures"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_terminal_summary(terminalreporter):
    """Print (and save) the parity table collected by tests.reference.assert_parity."""
    ref = sys.modules.get("tests.reference") or sys.modules.get("reference")
    rows = getattr(ref, "PARITY", [])
    if not rows:
        return
    lines = ["| module | max abs error | rel. error |", "| --- | --- | --- |"]
    lines += [f"| {w} | {e:.2e} | {r:.2e} |" for w, e, r in rows]
    terminalreporter.write_sep("-", "OpenFold parity")
    terminalreporter.write_line("\n".join(lines))
    out = os.environ.get("MOLFUN_PARITY_REPORT")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
