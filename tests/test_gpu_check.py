"""`scripts/gpu_check.py`, the one-GPU readiness check: its table keeps every row measured before a
part fails or the run is cut off, and its CPU smoke run prints every row of the GPU run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_check import Table

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_part_becomes_a_failed_row_and_later_parts_still_run(capsys):
    table = Table()
    table.add("device", "cpu x1")
    with table.part("LoRA bf16 N=384"):
        table.add("half done", "1")
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory\nwhile trying to allocate 80.00GiB.\n")
    with table.part("head-only"):
        table.add("head-only", "ok")
    assert table.failed
    assert table.rows == [("device", "cpu x1"), ("half done", "1"),
                          ("LoRA bf16 N=384", "FAILED: RuntimeError: while trying to allocate 80.00GiB."),
                          ("head-only", "ok")]
    out = capsys.readouterr().out.splitlines()  # each row printed when added, before the table
    assert out == ["device | cpu x1", "half done | 1",
                   "LoRA bf16 N=384 | FAILED: RuntimeError: while trying to allocate 80.00GiB.", "head-only | ok"]
    assert table.text().splitlines()[2] == "LoRA bf16 N=384 | FAILED: RuntimeError: while trying to allocate 80.00GiB."


def test_a_part_without_error_leaves_the_run_ok_and_interrupts_are_not_swallowed():
    table = Table()
    with table.part("parity"):
        table.add("parity: single", "1.0e-02 rel")
    assert not table.failed
    with pytest.raises(KeyboardInterrupt):
        with table.part("LoRA"):
            raise KeyboardInterrupt
    assert table.rows == [("parity: single", "1.0e-02 rel")]


@pytest.mark.slow
def test_smoke_run_prints_every_row():
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    table = p.stdout.split("\n\n")[-1]  # the aligned table after the streamed rows
    rows = dict(re.split(r"\s+\| ", line, maxsplit=1) for line in table.strip().splitlines())
    assert "FAILED" not in table
    for k in ("single", "pair", "final_atom_positions"):
        # bf16 keeps 8 significant bits: about 1e-2 after the tiny trunk; 1 would be a broken path
        assert 1e-4 < float(rows[f"bf16 vs fp32 N=16: {k}"].split()[0]) < 0.1
    for n in (16, 24):
        m = re.match(r"step ([\d.]+) s = ([\d.]+)x the forward's ([\d.]+) s \(matmul FLOPs ([\d.]+)x\)",
                     rows[f"LoRA bf16 N={n}"])
        assert m, rows[f"LoRA bf16 N={n}"]
        step, _, fwd, flop_ratio = map(float, m.groups())
        assert step > 0 and fwd > 0 and 1.0 < flop_ratio < 4.0  # backward + remat cost more than a forward
        assert re.search(r"loss [\d.e+-]+$", rows[f"LoRA bf16 N={n}"])
    assert re.match(r"uncached [\d.]+ s, cached [\d.]+ s", rows["head-only epoch, 2 x N=16"])
