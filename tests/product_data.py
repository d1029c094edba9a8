"""Shared data of the product tests (test_cli, test_checkpoint, test_predict): a CSV over real
fixture chains with a label derived from each structure, since the fixtures carry no affinity:
label = radius of gyration of the CA atoms (Angstrom) / N_res^0.4 (Rg of a compact chain grows
as ~N^0.4, so the label is a size-free compactness score; about 2-3 here)."""
from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from filelock import FileLock

from tests.conftest import FIXTURES, need_fixtures

CHAINS = FIXTURES / "chains"
IDS = ("1ahsA", "1dx5I", "1h4aX", "1lpbA", "1or4A", "1v7mV", "2a2lA", "2cviA")


def compactness(pdb_id: str) -> float:
    from molfun_jax.data import parse_structure
    from molfun_jax.np import residue_constants as rc

    p = parse_structure(CHAINS / f"{pdb_id}.pdb.gz")
    ca = p["atom_positions"][:, rc.atom_order["CA"]][p["atom_mask"][:, rc.atom_order["CA"]] > 0]
    rg = float(np.sqrt(np.mean(np.sum((ca - ca.mean(0)) ** 2, -1))))
    return rg / len(p["aatype"]) ** 0.4


def write_csv(path: Path, ids=IDS, years: bool = True, labels: bool = True) -> Path:
    """`pdb_id,affinity,year` over `ids` (years 2001, 2002, ... for the temporal split)."""
    need_fixtures()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pdb_id"] + (["affinity"] if labels else []) + (["year"] if years else []))
        for i, pid in enumerate(ids):
            w.writerow([pid] + ([f"{compactness(pid):.5f}"] if labels else []) + ([2001 + i] if years else []))
    return path


SEED = 0
N_RES = 16  # chains are cropped to their first 16 residues (--max-len 16; no ligand)


def _session_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this worker's session (pytest's base temp)."""
    return tmp_path_factory.getbasetemp() / name


@contextlib.contextmanager
def shared_path(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A path shared by every test of the run, across pytest-xdist workers too (their base temps
    are folders of one run folder), held under its lock while the caller builds it or finds it
    built: one worker builds it, the others reuse it, and none reads it half-written."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XLA's persistent compilation cache for the session, for in-process runs and the CLI
    subprocesses alike (identical programs compile once)."""
    import os

    from molfun_jax.cli.common import enable_compilation_cache

    d = _session_dir(tmp_path_factory, "xla_cache")
    d.mkdir(exist_ok=True)
    os.environ["MOLFUN_JAX_CACHE"] = str(d)
    enable_compilation_cache()
    return d


def fast_config():
    """`tiny` without templates and extra-MSA stack (what the API tests train: cheaper to
    compile; the CLI tests run the whole `tiny` preset)."""
    from molfun_jax.config import model_config

    cfg = model_config("tiny", train=True)
    cfg.globals.num_recycles = 0
    cfg.model.template.enabled = False
    cfg.model.extra_msa.enabled = False
    return cfg


def write_weights(out: Path, config, seed: int = SEED) -> Path:
    """A converted-weights folder (as convert/torch_to_flax.py writes) for `config` with random,
    all non-zero values (cheap: no model init to compile)."""
    import jax

    from molfun_jax.model import param_shapes
    from molfun_jax.pretrained import save_pretrained

    if (out / "meta.json").is_file():
        return out
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, param_shapes(config))
    return save_pretrained(out, params, "tiny", source="tests/product_data.py random")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory, compile_cache: Path) -> Path:
    """Random weights of the whole `tiny` preset (for `--preset tiny --weights`)."""
    from molfun_jax.config import model_config

    with shared_path(tmp_path_factory, "tiny_weights") as out:
        return write_weights(out, model_config("tiny"))


@pytest.fixture(scope="session")
def fast_weights(tmp_path_factory: pytest.TempPathFactory, compile_cache: Path) -> Path:
    """Random weights of `fast_config()`."""
    with shared_path(tmp_path_factory, "fast_weights") as out:
        return write_weights(out, fast_config())


@pytest.fixture(scope="session")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with shared_path(tmp_path_factory, "data/affinity.csv") as path:
        return path if path.is_file() else write_csv(path)


@pytest.fixture(scope="session")
def chain_examples(data_csv: Path) -> list[dict]:
    """The 8 chains' examples (cropped to N_RES) with their `pdb_id`."""
    from molfun_jax.data import AffinityDataset

    ds = AffinityDataset.from_csv(data_csv, CHAINS, buckets=(N_RES,))
    return [{**ds[i], "pdb_id": pid} for i, pid in enumerate(ds.ids)]


TINY_RUN = ["--preset", "tiny", "--strategy", "head_only", "--epochs", "2", "--batch-size", "2", "--accum", "1",
            "--max-len", "16", "--num-recycles", "0", "--precision", "fp32", "--val-frac", "0.25",
            "--test-frac", "0.25", "--quiet"]


def tiny_run(out: Path, data: Path, weights: Path, *extra: str) -> list[dict]:
    """A `train.py` run in-process (`main`): 4 train / 2 val / 2 test chains of 16 residues,
    head_only, 2 epochs of 2 steps (`extra` flags win); its metrics.csv rows."""
    from molfun_jax.cli.train import main

    args = ["--data", str(data), "--pdbs", str(CHAINS), "--weights", str(weights), *TINY_RUN,
            "--output", str(out), *extra]
    assert main(args) == 0
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))
