"""Under CI=true a skipped test (a missing reference or fixture) fails the run (tests/conftest.py),
whether it skips in the test or at module level; without CI it stays a skip."""
import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

CASES = {
    "test_in_test.py": "import pytest\n\ndef test_x():\n    pytest.skip('fixture missing')\n",
    "test_module_level.py": ("import pytest\npytest.importorskip('no_such_reference_module')\n\n"
                             "def test_y():\n    pass\n"),
    "test_ok.py": "def test_z():\n    assert True\n",
}


def run(tmp_path, ci: bool, *args: str) -> subprocess.CompletedProcess:
    for name, text in CASES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(ROOT), **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *args, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_skips_fail_under_ci(tmp_path):
    # a module-level skip becomes a collection error (which stops a session unless told to go on)
    strict = run(tmp_path, True, "--continue-on-collection-errors")
    assert strict.returncode == 1, strict.stdout[-3000:]
    assert "1 failed, 1 passed, 1 error" in strict.stdout, strict.stdout[-3000:]
    assert "test_module_level.py skipped under CI=true" in strict.stdout
    assert "test_in_test.py::test_x skipped under CI=true" in strict.stdout
    lax = run(tmp_path, ci=False)
    assert lax.returncode == 0 and "1 passed, 2 skipped" in lax.stdout, lax.stdout[-3000:]
