"""Template pair stack block and stack [Algorithm 16] vs OpenFold; chunking; dropout."""
import jax
import numpy as np

from molfun_jax.config import model_config
from molfun_jax.model.template import TemplatePairStack, TemplatePairStackBlock
from tests.reference import assert_parity, flax_params, padded_mask, randomize_, rel_error, to_torch, torch

from openfold.model import template as of_t  # noqa: E402

N_TEMPL, N_RES = 2, 9


def tiny_cfg(no_blocks: int = 2) -> dict:
    return dict(model_config("tiny").model.template.template_pair_stack.to_dict(), no_blocks=no_blocks)


def inputs(c_t: int, seed: int):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(N_TEMPL, N_RES, N_RES, c_t)).astype(np.float32)
    seq_mask = padded_mask((N_RES,), N_RES - 2)
    mask = (seq_mask[:, None] * seq_mask[None, :])[None]  # [1, N_res, N_res], as the model passes it
    return t, mask


def test_template_pair_stack_block():
    cfg = tiny_cfg()
    blk = {k: v for k, v in cfg.items() if k != "no_blocks"}
    t, mask = inputs(cfg["c_t"], 0)
    mask_t = np.broadcast_to(mask, t.shape[:-1]).copy()
    ref = randomize_(of_t.TemplatePairStackBlock(**blk), 0)
    with torch.no_grad():
        want = ref(to_torch(t), to_torch(mask_t), chunk_size=None, use_lma=False, inplace_safe=False,
                   _mask_trans=False)
    got = TemplatePairStackBlock(**blk).apply({"params": flax_params(ref)}, t, mask_t)
    assert_parity("TemplatePairStackBlock", got, want)


def test_template_pair_stack():
    cfg = tiny_cfg()
    t, mask = inputs(cfg["c_t"], 1)
    ref = randomize_(of_t.TemplatePairStack(**cfg, blocks_per_ckpt=None), 1)
    with torch.no_grad():
        want = ref(to_torch(t), to_torch(mask), chunk_size=None, use_lma=False, inplace_safe=False,
                   _mask_trans=False)
    mod = TemplatePairStack(**cfg)
    params = {"params": flax_params(ref)}
    got = mod.apply(params, t, mask)
    assert_parity("TemplatePairStack(2 blocks)", got, want)
    chunked = mod.apply(params, t, mask, chunk_size=4)
    err, rel = rel_error(chunked, got)
    assert rel <= 1e-6, (err, rel)


def test_template_pair_stack_dropout():
    cfg = tiny_cfg()
    t, mask = inputs(cfg["c_t"], 2)
    mod = TemplatePairStack(**cfg)
    params = jax.jit(mod.init)(jax.random.PRNGKey(0), t, mask)
    # default init zeroes output layers (dropout would act on zeros): perturb every param
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    run = jax.jit(lambda det, key: mod.apply(params, t, mask, deterministic=det, rngs={"dropout": key}),
                  static_argnums=0)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    det = run(True, k1)
    np.testing.assert_array_equal(det, run(True, k2))
    d1 = run(False, k1)
    np.testing.assert_array_equal(d1, run(False, k1))  # seeded: reproducible
    assert not np.allclose(d1, det) and not np.allclose(d1, run(False, k2))
