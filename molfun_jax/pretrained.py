"""Converted (pretrained) AlphaFold weights on disk: an orbax params tree + meta.json.

Written by `convert/torch_to_flax.py IN.pt OUT_DIR`; read by `load_pretrained(OUT_DIR)`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from molfun_jax.config import model_config

FORMAT = "molfun_jax.pretrained/1"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temp file + rename, so readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def save_pretrained(out_dir: str | Path, params: Mapping, preset: str, source: str = "") -> Path:
    """Save a full AlphaFold params tree for `preset` (orbax writes atomically)."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", jax.tree_util.tree_map(np.asarray, params), force=True)
    write_json_atomic(out / "meta.json", {"format": FORMAT, "preset": preset, "source": str(source),
                                          "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))})
    from molfun_jax.checkpoint import write_manifest

    return write_manifest(out).parent


def load_pretrained(path: str | Path, config: mlc.ConfigDict | None = None) -> tuple[dict, mlc.ConfigDict]:
    """(params, config) from a `save_pretrained` folder. With `config` given, the weights must fit
    it (same preset); otherwise the preset's default config is used."""
    from molfun_jax.model import param_shapes
    from convert.torch_to_flax import check_tree

    path = Path(path).absolute()
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a converted weights folder (no meta.json)")
    from molfun_jax.checkpoint import read_arrays, read_json, verify

    verify(path)  # sizes / sha256 of the files (a one-line CheckpointError when damaged)
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    config = config or model_config(meta["preset"])
    params = read_arrays(path / "params")
    check_tree(params, param_shapes(config), what=f"{path} (preset {meta['preset']})")
    return params, config
