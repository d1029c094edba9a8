"""Strategies: trainable counts (by hand, full preset via eval_shape), label trees, the
Partial split on the block axis, per-label / per-block learning rates, schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from molfun_jax.config import model_config
from molfun_jax.heads import HeadConfig
from molfun_jax.model import param_shapes
from molfun_jax.training import (Full, HeadOnly, LoRA, Partial, AffinityModel, layer_decay_factors, make_schedule,
                                 strategy_from_dict)
from tests.finetune_common import random_trunk, tiny_config


def evoformer_block_params(c_m=256, c_z=128, c_att=32, h_msa=8, c_opm=32, c_mul=128, c_tri=32, h_pair=4, n=4):
    """One Evoformer block's parameter count from its widths (OpenFold's modules)."""
    ln = lambda c: 2 * c
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)
    mha = lambda c, h, ch: 3 * lin(c, h * ch, False) + lin(c, h * ch) + lin(h * ch, c)  # q k v, g, o
    msa_row = ln(c_m) + ln(c_z) + lin(c_z, h_msa, False) + mha(c_m, h_msa, c_att)
    msa_col = ln(c_m) + mha(c_m, h_msa, c_att)
    msa_trans = ln(c_m) + lin(c_m, n * c_m) + lin(n * c_m, c_m)
    opm = ln(c_m) + 2 * lin(c_m, c_opm) + lin(c_opm * c_opm, c_z)
    tri_mul = ln(c_z) + 4 * lin(c_z, c_mul) + lin(c_z, c_z) + lin(c_mul, c_z) + ln(c_mul)  # a/b p/g, g, z
    tri_att = ln(c_z) + lin(c_z, h_pair, False) + mha(c_z, h_pair, c_tri)
    pair_trans = ln(c_z) + lin(c_z, n * c_z) + lin(n * c_z, c_z)
    assert (msa_row, msa_col, msa_trans, opm, tri_mul, tri_att, pair_trans) == (
        329_984, 328_704, 526_080, 148_160, 99_584, 82_944, 131_968)
    return msa_row + msa_col + msa_trans + opm + 2 * tri_mul + 2 * tri_att + pair_trans


HEAD = 2 * 384 + (384 * 128 + 128) + (128 * 1 + 1)  # LayerNorm, linear_1, linear_2 at c_s=384
EVO_LINEAR = 256 * 384 + 384  # evoformer/linear: m[0] -> single
# pLDDT (LN, 3 Linears), distogram, TM, masked MSA, experimentally resolved heads
AUX = (2 * 384 + 384 * 128 + 128 + 128 * 128 + 128 + 128 * 50 + 50) + (128 * 64 + 64) + (128 * 64 + 64) \
    + (256 * 23 + 23) + (384 * 37 + 37)


@pytest.fixture(scope="module")
def full_variables():
    trunk = param_shapes(model_config("model_1_ptm"))

    def variables(strategy):
        model = AffinityModel(model_config("model_1_ptm"))
        return jax.eval_shape(lambda t, k: model.init_variables(t, strategy, k), trunk, jax.random.PRNGKey(0))
    return trunk, variables


def size(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def test_counts_model_1_ptm(full_variables):
    trunk, variables = full_variables
    assert size(trunk) == 93_237_338
    block = evoformer_block_params()
    assert block == 1_829_952
    assert size(trunk["evoformer"]["blocks"]) == 48 * block
    assert HEAD == 50_177
    assert AUX == size(trunk["aux_heads"]) == 109_678

    s = HeadOnly()
    assert s.plan(v := variables(s)).count(v) == {"head": HEAD, "total": HEAD}
    s = LoRA()
    assert s.plan(v := variables(s)).count(v) == {"lora": 1_179_648, "head": HEAD, "total": 1_179_648 + HEAD}
    s = LoRA(rank=4, target_modules=["linear_q", "linear_k", "linear_v"])
    assert s.plan(v := variables(s)).count(v)["lora"] == 48 * 3 * 4 * (2 * (256 + 256) + 2 * (128 + 128))
    s = Partial()
    c = s.plan(v := variables(s)).count(v)
    assert c == {"trunk": 4 * block + EVO_LINEAR, "head": HEAD, "total": 4 * block + EVO_LINEAR + HEAD}
    s = Partial(unfreeze_last_n=1, unfreeze_structure_module=True)
    c = s.plan(v := variables(s), head_source="structure_module").count(v)
    assert c["trunk"] == block + EVO_LINEAR + size(trunk["structure_module"])
    s = Full()
    c = s.plan(v := variables(s)).count(v)
    embedders = size(trunk) - size(trunk["evoformer"]) - size(trunk["structure_module"]) - AUX
    assert c == {"blocks": 48 * block, "trunk": EVO_LINEAR, "embedder": embedders, "head": HEAD,
                 "total": 93_237_338 - AUX - size(trunk["structure_module"]) + HEAD}
    c = s.plan(v, head_source="structure_module").count(v)
    assert c["total"] == 93_237_338 - AUX + HEAD


def tiny_variables(strategy):
    model = AffinityModel(tiny_config())
    return model.init_variables(random_trunk(), strategy, jax.random.PRNGKey(0))


def test_partial_split_combine_on_block_axis():
    s = Partial(unfreeze_last_n=1)
    v = tiny_variables(s)
    plan = s.plan(v)
    trainable, frozen = plan.split(v)
    q = ("trunk", "evoformer", "blocks", "msa_att_row", "mha", "linear_q", "kernel")
    ft, ff, fv = (traverse_util.flatten_dict(x) for x in (trainable, frozen, v))
    assert ft[q].shape[0] == 1 and ff[q].shape[0] == 1  # tiny: 2 blocks
    np.testing.assert_array_equal(ft[q][0], fv[q][1])
    assert set(ft) == {p for p in fv if p[:3] == ("trunk", "evoformer", "blocks")} \
        | {("trunk", "evoformer", "linear", "kernel"), ("trunk", "evoformer", "linear", "bias")} \
        | {p for p in fv if p[0] == "head"}
    back = traverse_util.flatten_dict(plan.combine(trainable, frozen))
    assert set(back) == set(fv)
    for p in fv:
        np.testing.assert_array_equal(back[p], fv[p])
    labels = traverse_util.flatten_dict(plan.labels())
    assert {labels[p] for p in labels if p[0] == "trunk"} == {"trunk"}
    with pytest.raises(ValueError, match="3 .*2 blocks|2 blocks"):
        Partial(unfreeze_last_n=3).plan(v)
    with pytest.raises(ValueError, match="structure_module"):
        Partial(unfreeze_last_n=1, unfreeze_structure_module=True).plan(v)


def test_label_trees():
    for s, labels in ((HeadOnly(), {"head"}), (LoRA(), {"lora", "head"}), (Partial(unfreeze_last_n=2), {"trunk", "head"}),
                      (Full(), {"blocks", "trunk", "embedder", "head"})):
        v = tiny_variables(s)
        plan = s.plan(v)
        flat = traverse_util.flatten_dict(plan.labels())
        assert set(flat.values()) == labels
        if isinstance(s, LoRA):  # only a and b train; scale is a frozen constant
            assert {p[-1] for p in flat if p[0] == "lora"} == {"a", "b"}
        if isinstance(s, Full):
            assert not any(p[1] in ("aux_heads", "structure_module") for p in flat if p[0] == "trunk")
            assert {p[1] for p, l in flat.items() if l == "embedder"} == {"input_embedder", "recycling_embedder"}


def first_update(strategy, grads_value=1.0):
    """The first optimizer update of every trainable leaf for a constant gradient."""
    v = tiny_variables(strategy)
    plan = strategy.plan(v)
    trainable, _ = plan.split(v)
    tx = plan.optimizer(total_steps=10)
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, grads_value), trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
    return plan, traverse_util.flatten_dict(updates)


def test_learning_rates_per_label_and_block():
    # Adam's first step is lr * g/|g| (bias-corrected; float32 rounding of 1 - b2 leaves a 1e-5
    # relative error, the same for every leaf), so with no weight decay, no clipping and a
    # constant schedule each update is -lr of its leaf: compare with the closed form (1e-4) and
    # the ratios to the last block's update (1e-6)
    s = Full(lr=1e-3, layer_lr_decay=0.5, weight_decay=0.0, grad_clip=0.0, scheduler="constant")
    plan, upd = first_update(s)
    n = plan.no_blocks
    np.testing.assert_allclose(layer_decay_factors(n, 0.5), [0.5 ** (n - 1 - i) for i in range(n)])
    unit = float(upd[("trunk", "evoformer", "linear", "bias")][0])  # -lr of the last block
    assert unit == pytest.approx(-1e-3, rel=1e-4)
    for p, u in upd.items():
        if p[:3] == ("trunk", "evoformer", "blocks"):
            lr = [0.5 ** (n - 1 - i) for i in range(n)]  # block i: lr * decay ** (n - 1 - i)
        elif p[0] == "head":
            lr = 10.0  # head LR = 10x
        elif p[1] == "evoformer":
            lr = 1.0
        else:  # embedders: lr * decay ** no_blocks
            lr = 0.5 ** n
        lr = np.reshape(lr, (-1,) + (1,) * (u.ndim - 1))
        np.testing.assert_allclose(u, unit * lr * np.ones_like(u), rtol=1e-6, err_msg=str(p))
        np.testing.assert_allclose(u, -1e-3 * lr * np.ones_like(u), rtol=1e-4, err_msg=str(p))
    for s, lrs in ((HeadOnly(), {"head": 1e-3}), (LoRA(), {"lora": 1e-4, "head": 1e-3}),
                   (Partial(unfreeze_last_n=1), {"trunk": 1e-5, "head": 1e-4}),
                   (Full(), {"blocks": 1e-5, "trunk": 1e-5, "embedder": 1e-5 * 0.95 ** 2, "head": 1e-4}),
                   (LoRA(lr_lora=2e-4, lr_head=5e-4), {"lora": 2e-4, "head": 5e-4})):
        assert s.plan(tiny_variables(s)).learning_rates == pytest.approx(lrs)


def test_weight_decay_mask():
    # zero gradients: Adam's step is 0, so the update is -lr * wd * param on decayed leaves only
    s = Partial(unfreeze_last_n=1, lr_trunk=1e-2, lr_head=1e-2, weight_decay=0.5, grad_clip=0.0,
                scheduler="constant")
    plan, upd = first_update(s, grads_value=0.0)
    trainable = traverse_util.flatten_dict(plan.split(tiny_variables(s))[0])
    for p, u in upd.items():
        expected = -1e-2 * 0.5 * trainable[p] if p[-1] == "kernel" else np.zeros_like(u)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-12, err_msg=str(p))


def test_schedules_closed_form():
    peak, w, t = 1e-3, 10, 110
    cos = make_schedule(peak, t, w, "cosine")
    lin = make_schedule(peak, t, w, "linear")
    const = make_schedule(peak, t, w, "constant")
    floor = make_schedule(peak, t, w, "cosine", min_lr_ratio=0.1)
    for step, c, l in ((0, 0.0, 0.0), (5, 0.5 * peak, 0.5 * peak), (10, peak, peak),
                       (35, peak * 0.5 * (1 + math.cos(math.pi * 0.25)), peak * 0.75),
                       (60, 0.5 * peak, 0.5 * peak), (110, 0.0, 0.0), (200, 0.0, 0.0)):
        assert float(cos(step)) == pytest.approx(c, abs=1e-10)
        assert float(lin(step)) == pytest.approx(l, abs=1e-10)
        assert float(const(step)) == pytest.approx(peak if step >= w else step / w * peak, abs=1e-10)
    assert float(floor(60)) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5)
    assert float(floor(110)) == pytest.approx(0.1 * peak)
    assert float(make_schedule(peak, 4, 0, "cosine")(0)) == pytest.approx(peak)  # no warmup
    with pytest.raises(ValueError):
        make_schedule(peak, 10, 0, "step")


def test_defaults_and_serialisation():
    assert (HeadOnly().lr, HeadOnly().scheduler, HeadOnly().amp, HeadOnly().grad_clip) == (1e-3, "cosine", True, 1.0)
    lora = LoRA()
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.lr_lora) == \
        (8, 16.0, 0.0, ("linear_q", "linear_v"), 1e-4)
    assert (Partial().unfreeze_last_n, Partial().unfreeze_structure_module, Partial().lr_trunk) == (4, False, 1e-5)
    assert (Full().lr, Full().layer_lr_decay, Full().lr_embedder, Full().lr_structure_module) == (1e-5, 0.95, None, None)
    common = dict(warmup_steps=0, ema_decay=0.0, accumulation_steps=1, early_stopping_patience=0, weight_decay=0.01)
    for s in (HeadOnly(), LoRA(), Partial(), Full()):
        assert {k: getattr(s, k) for k in common} == common
        assert strategy_from_dict(s.to_dict()) == s
    assert strategy_from_dict(LoRA(target_modules=["linear_k"], warmup_steps=3).to_dict()).target_modules == ("linear_k",)
    for bad in (lambda: LoRA(rank=0), lambda: HeadOnly(scheduler="step"), lambda: Full(layer_lr_decay=0.0),
                lambda: HeadOnly(ema_decay=1.0), lambda: Partial(lr_trunk=0.0), lambda: strategy_from_dict({"name": "x"}),
                lambda: HeadOnly(accumulation_steps=0), lambda: HeadOnly(min_lr_ratio=1.5)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        LoRA(4)  # keyword-only arguments
    assert HeadConfig().to_dict()["hidden_dim"] == 128
