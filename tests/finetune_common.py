"""Shared setup of the fine-tuning tests (test_lora, test_strategies, test_train_step, test_fit):
tiny model configs, random non-zero trunk params and example features."""
from __future__ import annotations

import functools

import jax
import numpy as np

from molfun_jax.config import model_config
from molfun_jax.model import dummy_features, param_shapes


def tiny_config(fast: bool = True):
    """The `tiny` preset; `fast` turns off recycling, templates and the extra-MSA stack (the
    Evoformer, structure module and heads remain) to keep CPU compile times short."""
    cfg = model_config("tiny")
    if fast:
        cfg.globals.num_recycles = 0
        cfg.model.template.enabled = False
        cfg.model.extra_msa.enabled = False
    return cfg


def random_params(config, seed: int = 0) -> dict:
    """Params of `config` with non-zero random values everywhere (AlphaFold's init zeroes output
    projections and gates, which would block gradients to q / v and hide bugs); the same scheme
    as tests.reference.randomize_."""
    shapes = param_shapes(config)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":  # [*, in, out]
            return (rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])).astype(np.float32)
        if name == "scale":  # LayerNorm
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def random_trunk(fast: bool = True, seed: int = 0) -> dict:
    """`random_params` of the tiny config."""
    return random_params(tiny_config(fast), seed)


def synthetic_example(cfg, n_res: int, seed: int, n_valid: int | None = None) -> dict:
    """Features of a random single-sequence example (first `n_valid` residues real, the rest
    padding) with a random `target`."""
    r = np.random.default_rng(seed)
    n_valid = n_res if n_valid is None else n_valid
    f = {k: np.zeros(v.shape, v.dtype) for k, v in dummy_features(cfg, n_res).items()}
    aa = r.integers(0, 20, n_res)
    f["aatype"] = aa.astype(np.int32)
    f["residue_index"] = np.arange(n_res, dtype=np.int32)
    f["seq_mask"] = (np.arange(n_res) < n_valid).astype(np.float32)
    f["msa_mask"] = f["seq_mask"][None].copy()
    f["target_feat"][np.arange(n_res), aa + 1] = 1.0
    f["msa_feat"][0, np.arange(n_res), aa] = 1.0
    f["target"] = np.float32(r.standard_normal())
    return f
