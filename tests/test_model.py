"""The whole AlphaFold model vs OpenFold end to end, on real structures' features padded to a
bucket (residues, MSA and extra-MSA rows) with a multi-row MSA and extra MSA; padding invariance."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.torch_to_flax import torch_to_flax
from molfun_jax.config import model_config
from molfun_jax.model import AlphaFold
from tests.conftest import FIXTURES
from tests.reference import assert_parity, randomize_, rel_error

import openfold.config as of_config  # noqa: E402
from openfold.model.model import AlphaFold as OFAlphaFold  # noqa: E402

HEAD_KEYS = ("lddt_logits", "plddt", "distogram_logits", "masked_msa_logits",
             "experimentally_resolved_logits")
PTM_KEYS = ("tm_logits", "predicted_tm_score", "predicted_aligned_error")


def openfold_config(cfg):
    """An OpenFold ConfigDict with our config's model hyper-parameters."""
    oc = of_config.model_config("model_1_ptm")

    def copy(dst, src):
        for k, v in src.items():
            if isinstance(v, dict):
                copy(dst[k], v)
            elif k in dst:
                dst[k] = v

    copy(oc.model, cfg.model.to_dict())
    for k in ("c_z", "c_m", "c_t", "c_e", "c_s", "eps"):
        oc.globals[k] = cfg.globals[k]
    oc.globals.chunk_size = None
    return oc


def structure_features(name: str, **kw) -> dict:
    from molfun_jax.data import make_features, parse_structure
    path = FIXTURES / "chains" / name
    if not path.exists():
        pytest.skip(f"fixture {path} missing")
    return {k: np.asarray(v) for k, v in make_features(parse_structure(path), **kw).items()}


def padded_features(name: str, n_pad: int = 5, n_rows: int = 12, n_msa: int = 6, n_extra: int = 12,
                    **kw) -> dict:
    """A fixture chain's features with a synthetic MSA (the query + `n_rows - 1` rows with 30%
    substitutions, gaps and X included, and random deletions): 4 cluster rows and the rest extra
    MSA, then padded by `n_pad` residues and to `n_msa` / `n_extra` rows (masked rows)."""
    from molfun_jax.data import pad_features
    from molfun_jax.data.features import msa_features

    feats = structure_features(name, **kw)
    aatype = feats["aatype"]
    rng = np.random.default_rng(0)
    msa = np.repeat(aatype[None], n_rows, 0)
    sub = rng.random(msa.shape) < 0.3
    sub[0] = False
    msa[sub] = rng.integers(0, 22, int(sub.sum()))
    dele = np.where(rng.random(msa.shape) < 0.1, rng.integers(1, 5, msa.shape), 0).astype(np.float32)
    dele[0] = 0.0
    feats.update(msa_features(msa, dele, aatype, max_msa_clusters=4, max_extra_msa=n_rows))
    return pad_features(feats, len(aatype) + n_pad, n_msa=n_msa, n_extra=n_extra)


def valid_masks(feats: dict) -> dict:
    """The valid positions of each compared output (padded residues / rows out)."""
    seq = feats["seq_mask"]
    pair = seq[:, None] * seq[None, :]
    return {"single": seq, "pair": pair, "final_atom_positions": seq, "lddt_logits": seq, "plddt": seq,
            "distogram_logits": pair, "masked_msa_logits": feats["msa_mask"],
            "experimentally_resolved_logits": seq, "tm_logits": pair, "predicted_tm_score": None,
            "predicted_aligned_error": pair}


def to_openfold_batch(feats: dict, num_iters: int) -> dict:
    out = {}
    for k, v in feats.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        t = t.long() if np.issubdtype(v.dtype, np.integer) else t.float()
        out[k] = t[..., None].expand(*t.shape, num_iters).contiguous()
    return out


def compare(cfg, feats, tag, rtol=1e-3, seed=0):
    oc = openfold_config(cfg)
    torch.manual_seed(seed)
    ref_model = randomize_(OFAlphaFold(oc), seed)
    params = torch_to_flax(ref_model.state_dict(), cfg)
    with torch.no_grad():
        ref = ref_model(to_openfold_batch(feats, cfg.globals.num_recycles + 1))
    ours = jax.jit(lambda p, f: AlphaFold(cfg).apply({"params": p}, f))(params, feats)
    keys = ["single", "pair", "final_atom_positions", *HEAD_KEYS]
    if cfg.model.heads.tm.enabled:
        keys += PTM_KEYS
    masks = valid_masks(feats)
    for k in keys:
        assert_parity(f"AlphaFold[{tag}] {k}", ours[k], ref[k], rtol=rtol, mask=masks[k])
    return ours, ref


SLOW = pytest.mark.slow


@pytest.mark.parametrize("num_recycles,templates,extra_msa", [
    (1, True, True), (3, False, True),
    pytest.param(3, True, True, marks=SLOW), pytest.param(1, False, True, marks=SLOW),
    pytest.param(1, True, False, marks=SLOW), pytest.param(3, True, False, marks=SLOW)])
def test_tiny_model_matches_openfold(num_recycles, templates, extra_msa):
    cfg = model_config("tiny")
    cfg.globals.num_recycles = num_recycles
    cfg.model.template.enabled = templates
    cfg.model.extra_msa.enabled = extra_msa
    feats = padded_features("3a4rA.pdb.gz")
    compare(cfg, feats, f"tiny r{num_recycles} templ={templates} extra={extra_msa}")


@pytest.mark.slow  # ~2 min (3 compiles); the padded OpenFold parity above runs by default
def test_padding_to_a_larger_bucket_changes_nothing():
    """The same example (templates, MSA, extra MSA, 1 recycle) in a larger bucket: more padded
    residues, MSA and extra-MSA rows give the same outputs at the valid positions (<= 1e-5)."""
    cfg = model_config("tiny")
    cfg.globals.num_recycles = 1
    small = padded_features("3a4rA.pdb.gz", n_pad=0, n_msa=4, n_extra=8)
    n = len(small["aatype"])
    big = padded_features("3a4rA.pdb.gz", n_pad=11, n_msa=7, n_extra=15)
    params = jax.jit(AlphaFold(cfg).init)(jax.random.PRNGKey(0), small)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    run = jax.jit(lambda f: AlphaFold(cfg).apply({"params": params}, f))
    a, b = run(small), run(big)
    masks = valid_masks(small)
    for k in ("single", "pair", "final_atom_positions", "plddt", "distogram_logits", "masked_msa_logits"):
        got = np.asarray(b[k])
        got = got[:4, :n] if k == "masked_msa_logits" else got[:n, :n] if k in ("pair", "distogram_logits") \
            else got[:n]
        err, rel = rel_error(got, np.asarray(a[k]), masks[k])
        print(f"padding invariance {k}: max abs {err:.2e}, rel {rel:.2e}")
        assert rel <= 1e-5, (k, err, rel)


def test_recycling_compiles_once_whatever_the_count():
    cfg = model_config("tiny")
    feats = structure_features("3a4rA.pdb.gz")
    # shapes are all lowering needs; the params do not depend on the recycling count
    params = jax.eval_shape(AlphaFold(cfg).init, jax.random.PRNGKey(0), feats)
    sizes = {}
    for r in (1, 4):
        cfg.globals.num_recycles = r
        text = jax.jit(lambda p, f: AlphaFold(cfg).apply(p, f)).lower(params, feats).as_text()
        sizes[r] = len(text)
    # the recycled iteration is one scan body: program size does not grow with the count
    assert sizes[1] == sizes[4], sizes


@pytest.mark.slow  # ~1 min; tests/test_bf16.py checks the bf16 prediction against fp32 by default
def test_bfloat16_compute_close_to_float32():
    cfg = model_config("tiny")
    feats = structure_features("3a4rA.pdb.gz")
    params = jax.jit(AlphaFold(cfg).init)(jax.random.PRNGKey(0), feats)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    f32 = jax.jit(AlphaFold(cfg).apply)({"params": params}, feats)
    cfg16 = model_config("tiny")
    cfg16.globals.dtype = "bfloat16"
    b16 = jax.jit(AlphaFold(cfg16).apply)({"params": params}, feats)
    err, rel = rel_error(np.asarray(b16["single"], np.float32), np.asarray(f32["single"]))
    print(f"bf16 vs fp32 single: max abs {err:.3e}, rel {rel:.3e}")
    assert rel <= 2e-2
    assert b16["final_atom_positions"].dtype == jnp.float32  # geometry stays float32


@pytest.mark.slow
@pytest.mark.parametrize("num_recycles", [1, 3])
def test_full_model_1_ptm_matches_openfold(num_recycles):
    cfg = model_config("model_1_ptm")
    cfg.globals.num_recycles = num_recycles
    feats = padded_features("3a4rA.pdb.gz")
    compare(cfg, feats, f"model_1_ptm r{num_recycles}")


@pytest.mark.slow
def test_full_model_1_ptm_without_templates_and_extra_msa():
    cfg = model_config("model_1_ptm")
    cfg.globals.num_recycles = 1
    cfg.model.template.enabled = False
    cfg.model.extra_msa.enabled = False
    feats = padded_features("3a4rA.pdb.gz")
    compare(cfg, feats, "model_1_ptm r1 no templ/extra")
