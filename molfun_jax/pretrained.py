"""Base (pretrained) AlphaFold weights and their provenance.

* On disk: a converted folder = an orbax params tree + meta.json (`save_pretrained`,
  `load_pretrained`); `convert_file` turns an OpenFold `.pt` into one (the CLI is
  `convert/torch_to_flax.py`, the mapping `molfun_jax.openfold_weights`).
* Provenance: the frozen base trunk is never written to fine-tuning checkpoints. Its
  `base_weights` meta says where it comes from (a converted folder, an OpenFold .pt and its
  sha256, or random init from a seed) with the params' `fingerprint`; `load_base_weights` makes
  a trunk and its meta, `rebuild_base_weights` rebuilds the one a checkpoint names and refuses
  any other. `versions` records the libraries a checkpoint was written with.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from molfun_jax.atomic import write_json_atomic
from molfun_jax.checkpoint import CheckpointError
from molfun_jax.config import config_from_dict, config_to_dict, model_config
from molfun_jax.model import AlphaFold, dummy_features, param_shapes
from molfun_jax.openfold_weights import check_tree, load_torch_checkpoint, torch_to_flax, unwrap
from molfun_jax.training.memory import release_host_memory
from molfun_jax.training.step import with_dtype

FORMAT = "molfun_jax.pretrained/1"
_VERSIONED = ("molfun-jax", "jax", "flax", "optax", "orbax-checkpoint")


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


def convert_file(in_path: str | Path, out_dir: str | Path, preset: str = "model_1_ptm") -> Path:
    """Convert an OpenFold `.pt` into a `molfun_jax.pretrained` folder."""
    obj = load_torch_checkpoint(in_path)
    try:
        params = torch_to_flax(unwrap(obj, str(in_path)), model_config(preset))
    except ValueError as e:
        raise ValueError(f"{in_path}: {e}") from None
    return save_pretrained(out_dir, params, preset, source=str(in_path))


def versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def random_trunk(config: mlc.ConfigDict, seed: int) -> dict:
    """AlphaFold params with OpenFold's initialisers from `PRNGKey(seed)` (deterministic: the
    same seed gives bit-identical params, so checkpoints of random-weight runs can rebuild them)."""
    init = _init_fn(json.dumps(config_to_dict(config), sort_keys=True))
    return jax.tree_util.tree_map(np.asarray, init(jax.random.PRNGKey(seed)))


@functools.lru_cache(maxsize=4)
def _init_fn(config_json: str) -> Callable:
    """The jitted init of a config (compiled once per config and process)."""
    cfg = with_dtype(config_from_dict(json.loads(config_json)), "float32")
    cfg.globals.num_recycles = 0  # params do not depend on recycling; this compiles less
    feats = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy_features(cfg, n_res=4).items()}
    return jax.jit(lambda key: AlphaFold(cfg).init(key, feats)["params"])


def tree_fingerprint(tree: Any) -> str:
    """sha256 over a param tree's paths, shapes, dtypes and bytes (identifies base weights)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(dict(tree)).items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{'/'.join(path)}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_base_weights(weights: Optional[str | Path], config: mlc.ConfigDict, preset: str, seed: int,
                      cache_dir: Optional[str | Path] = None,
                      log: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """(trunk params, base_weights meta). `weights`: None (random init from `seed`), an OpenFold
    `.pt` (converted once into `cache_dir/<sha256>/`, default next to the file) or a converted
    folder (`convert/torch_to_flax.py`). The meta holds the params' `fingerprint`."""
    if weights is None:
        params, meta = random_trunk(config, seed), {"kind": "random", "seed": int(seed)}
    else:
        w = Path(weights).absolute()
        if not w.exists():
            raise FileNotFoundError(f"weights {w}: no such file or folder")
        if w.is_file():
            sha = sha256_file(w)
            folder = Path(cache_dir or w.parent / "weights_cache").absolute() / sha[:16]
            if not (folder / "meta.json").is_file():
                if log:
                    log(f"Converting {w.name} to Flax weights (cached in {folder})")
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                convert_file(w, tmp, preset)
                tmp.rename(folder)
                release_host_memory()  # the state dict and its conversion, freed: not held through training
            params, _ = load_pretrained(folder, config)
            meta = {"kind": "pt", "path": str(w), "sha256": sha, "converted": str(folder)}
        else:
            params, _ = load_pretrained(w, config)
            meta = {"kind": "converted", "path": str(w)}
    return params, {**meta, "fingerprint": tree_fingerprint(params)}


def rebuild_base_weights(base: Mapping[str, Any], config: mlc.ConfigDict, preset: str,
                         weights: Optional[str | Path] = None) -> tuple[dict, dict]:
    """The base trunk that a checkpoint's `meta.base_weights` describes, from where it was
    (`weights` overrides the recorded path); other weights than the ones trained on are refused."""
    kind = base.get("kind")
    given = weights is not None
    if kind == "random":
        if weights is not None:
            raise CheckpointError("this checkpoint was trained on random base weights (seed "
                                       f"{base['seed']}); do not pass weights")
        params, meta = load_base_weights(None, config, preset, base["seed"])
    elif kind in ("pt", "converted"):
        if not given:
            recorded = [Path(base["path"])] + ([Path(base["converted"])] if kind == "pt" else [])
            found = [p for p in recorded[::-1] if p.is_file() or (p / "meta.json").is_file()]
            if not found:
                raise CheckpointError(f"the base weights of this checkpoint ({base['path']}) are gone: "
                                           "pass weights=/--weights with them")
            weights = found[0]
        cache = Path(base["converted"]).parent if kind == "pt" else None
        params, meta = load_base_weights(weights, config, preset, 0, cache_dir=cache)
    else:
        raise CheckpointError(f"unknown base_weights kind {kind!r} in the checkpoint meta")
    if base.get("fingerprint") not in (None, meta["fingerprint"]):
        raise CheckpointError(f"the base weights {meta.get('path', '(random init)')} are not the ones this "
                                   f"checkpoint was trained on (fingerprint {meta['fingerprint'][:12]}, "
                                   f"expected {base['fingerprint'][:12]})")
    return params, (meta if kind != "random" and given else dict(base))
