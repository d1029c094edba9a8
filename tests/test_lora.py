"""LoRA adapters: counts, targets, step-0 identity, merge / unmerge, LoRA dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from molfun_jax.config import model_config
from molfun_jax.lora import LoRAConfig, count_lora_params, init_lora, merge, target_kernels, unmerge
from molfun_jax.model import AlphaFold, param_shapes
from molfun_jax.model.primitives import Linear
from tests.finetune_common import random_trunk, synthetic_example, tiny_config


def test_lora_count_model_1_ptm():
    shapes = param_shapes(model_config("model_1_ptm"))
    lora = jax.eval_shape(lambda: init_lora(shapes, LoRAConfig(), jax.random.PRNGKey(0)))
    r, blocks, c_m, c_z, h_msa, c_msa, h_pair, c_pair = 8, 48, 256, 128, 8, 32, 4, 32
    # q and v of the MSA row / column attention: [c_m, h*c] = [256, 256]; of the triangle
    # attentions: [c_z, h*c] = [128, 128]; each adapter has r*(in + out) params
    msa = 2 * 2 * r * (c_m + h_msa * c_msa)  # 2 attentions x (q, v)
    tri = 2 * 2 * r * (c_z + h_pair * c_pair)
    assert msa + tri == 24_576
    assert count_lora_params(lora) == blocks * (msa + tri) == 1_179_648
    flat = traverse_util.flatten_dict(lora)
    assert flat[("evoformer", "blocks", "msa_att_row", "mha", "linear_q", "a")].shape == (48, 256, 8)
    assert flat[("evoformer", "blocks", "msa_att_col", "_msa_att", "mha", "linear_v", "b")].shape == (48, 8, 256)
    assert flat[("evoformer", "blocks", "core", "tri_att_end", "mha", "linear_q", "scale")].shape == (48,)
    assert len(flat) == 8 * 3  # 8 adapted Dense x (a, b, scale)


def test_lora_targets():
    shapes = param_shapes(tiny_config(fast=False))
    paths = lambda **kw: {"/".join(p) for p in target_kernels(shapes, LoRAConfig(**kw))}
    assert paths() == {f"evoformer/blocks/{m}/mha/linear_{x}" for x in "qv"
                       for m in ("msa_att_row", "msa_att_col/_msa_att", "core/tri_att_start", "core/tri_att_end")}
    trans = paths(target_modules=["msa_transition", "pair_transition"])
    assert trans == {f"evoformer/blocks/core/{t}/linear_{i}" for t in ("msa_transition", "pair_transition")
                     for i in (1, 2)}
    extra = paths(target_modules=["linear_k"], stacks=["extra_msa_stack", "template_pair_stack"])
    assert "extra_msa_stack/blocks/msa_att_col/global_attention/linear_k" in extra
    assert "template_pair_stack/blocks/tri_att_start/mha/linear_k" in extra
    assert not any(p.startswith("evoformer") for p in extra)
    # the gates of the triangle multiplications are not attention projections
    assert all("tri_mul" not in p for p in paths(target_modules=["linear_g"]))
    for bad in ({"target_modules": ["linear_x"]}, {"stacks": ["structure_module"]}, {"rank": 0},
                {"dropout": 1.0}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)


@pytest.fixture(scope="module")
def full_tiny():
    """The tiny preset with templates and the extra-MSA stack (no recycling, for compile time),
    LoRA on every stack and attention projection plus the transitions, a jitted forward."""
    cfg = tiny_config(fast=False)
    cfg.globals.num_recycles = 0
    params = random_trunk(fast=False)
    feats = synthetic_example(cfg, 12, seed=3, n_valid=10)
    feats.pop("target")
    feats["template_mask"][:] = 1.0
    lcfg = LoRAConfig(rank=4, alpha=8, target_modules=["linear_q", "linear_k", "linear_v", "linear_o", "linear_g",
                                                       "msa_transition", "pair_transition"],
                      stacks=["evoformer", "extra_msa_stack", "template_pair_stack"])
    lora = init_lora(params, lcfg, jax.random.PRNGKey(1))
    def outputs(v, f):
        out = AlphaFold(cfg).apply(v, f)
        return {"single": out["single"], "pair": out["pair"], "positions": out["sm"]["positions"][-1]}
    fwd = jax.jit(outputs)
    return params, lora, feats, fwd


def test_step0_equals_base(full_tiny):
    params, lora, feats, fwd = full_tiny
    base = fwd({"params": params}, feats)
    adapted = fwd({"params": params, "lora": lora}, feats)
    for k in base:  # b = 0: the adapters add exactly zero
        np.testing.assert_array_equal(np.asarray(adapted[k]), np.asarray(base[k]), err_msg=k)


def test_merge_matches_adapted_model(full_tiny):
    params, lora, feats, fwd = full_tiny
    rng = np.random.default_rng(0)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * rng.standard_normal(x.shape).astype(np.float32) if p[-1].key == "b" else x, lora)
    adapted = fwd({"params": params, "lora": lora}, feats)
    merged_out = fwd({"params": merge(params, lora)}, feats)
    base = fwd({"params": params}, feats)
    for k in adapted:
        a, m, b = (np.asarray(x[k], np.float64) for x in (adapted, merged_out, base))
        assert np.max(np.abs(a - b)) > 1e-3 * np.max(np.abs(b)), f"{k}: adapters had no effect"
        rel = np.max(np.abs(m - a)) / np.max(np.abs(a))
        assert rel <= 1e-5, f"{k}: merged vs adapted rel. error {rel:.2e}"


def test_unmerge():
    params = random_trunk(fast=True)
    lora = init_lora(params, LoRAConfig(target_modules=["linear_q", "linear_v", "pair_transition"]),
                     jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.standard_normal(x.shape).astype(np.float32) if p[-1].key == "b" else x, lora)
    merged, base = merge(params, lora, return_base=True)
    assert set(traverse_util.flatten_dict(base)) == {p + ("kernel",) for p in target_kernels(params, LoRAConfig(
        target_modules=["linear_q", "linear_v", "pair_transition"]))}
    # with the kept base kernels: bit-exact, the whole tree
    restored = unmerge(merged, lora, base)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=jax.tree_util.keystr(p))
    # without them: W' - scale*a@b, equal up to float32 rounding (the documented property) ...
    approx = traverse_util.flatten_dict(unmerge(merged, lora))
    mismatched = 0
    for p, w in traverse_util.flatten_dict(params).items():
        diff = np.abs(np.asarray(approx[p], np.float64) - np.asarray(w, np.float64))
        wm = np.abs(np.asarray(traverse_util.flatten_dict(merged)[p], np.float64))
        assert np.all(diff <= 2 * np.spacing(np.maximum(wm, np.abs(w)).astype(np.float32))), p
        mismatched += int(np.count_nonzero(diff))
    # ... and not bit-exact in general (why `base` exists)
    assert mismatched > 0
    with pytest.raises(ValueError):
        unmerge(merged, lora, {"evoformer": {}})


def test_lora_dropout():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    lin = Linear(16)  # (its `init` field shadows Module.init: build the params by hand)
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(3), (16, 16)), "bias": jnp.ones(16)}
    # a = b = identity (rank 16): the adapter adds scale * dropout(x)
    lora = {"a": jnp.eye(16), "b": jnp.eye(16), "scale": jnp.float32(2.0)}
    base = x @ params["kernel"] + params["bias"]
    plain = lin.apply({"params": params, "lora": lora}, x)
    np.testing.assert_allclose(plain - base, 2.0 * x, rtol=1e-5, atol=1e-5)
    lora_d = {**lora, "dropout": jnp.float32(0.25)}
    # no 'dropout' RNG (evaluation): inactive
    np.testing.assert_array_equal(lin.apply({"params": params, "lora": lora_d}, x), plain)
    extra = np.asarray(lin.apply({"params": params, "lora": lora_d}, x, rngs={"dropout": jax.random.PRNGKey(4)})
                       - base) / 2.0
    kept = np.isclose(extra, np.asarray(x) / 0.75, rtol=1e-4, atol=1e-5)
    dropped = np.abs(extra) < 1e-5
    assert np.all(kept | dropped)  # each input element is dropped or scaled by 1 / (1 - rate)
    assert 0.6 < kept.mean() < 0.9  # 128 elements at keep probability 0.75


@pytest.mark.parametrize("kind", ["pocket", "ligand"])
def test_init_variables_equals_the_eager_init(kind):
    """`AffinityModel.init_variables` makes head and adapters in one jitted program; they equal,
    bit for bit, Flax's eager `init` of the head and `init_lora` on the concrete trunk."""
    from molfun_jax.heads import HeadConfig, LigandHeadConfig, dummy_head_inputs
    from molfun_jax.training import AffinityModel, LoRA

    cfg, trunk, rng = tiny_config(), random_trunk(), jax.random.PRNGKey(3)
    head_cfg = HeadConfig() if kind == "pocket" else LigandHeadConfig(c_atom=8)
    model = AffinityModel(cfg, head_cfg)
    got = model.init_variables(trunk, LoRA(), rng)
    k_head, k_lora = jax.random.split(rng)
    c_s = cfg.model.evoformer_stack.c_s
    want = {"head": model.head.init(k_head, jnp.zeros((1, c_s)), jnp.ones((1,)), **dummy_head_inputs(head_cfg))["params"],
            "lora": init_lora(trunk, LoRA().lora_config(), k_lora)}
    for part in ("head", "lora"):
        g, w = traverse_util.flatten_dict(got[part]), traverse_util.flatten_dict(want[part])
        assert g.keys() == w.keys() and g
        for k in w:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=f"{part} {k}")
    assert got["trunk"] is trunk
