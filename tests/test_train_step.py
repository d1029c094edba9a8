"""The jitted train step: micro-batch accumulation, data parallelism (2 forced host devices in a
subprocess), no trunk backward for head-only, EMA recurrence, bf16 compute under amp."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from molfun_jax.heads import HeadConfig
from molfun_jax.training import (AffinityModel, Full, HeadOnly, LoRA, Partial, data_mesh, init_state, make_batches,
                                 make_predict_step, make_train_step, replicate, shard_batch, with_dtype)
from tests.conftest import ROOT
from tests.finetune_common import random_trunk, synthetic_example, tiny_config

N_RES = 8


def examples(n, n_res=N_RES):
    cfg = tiny_config()
    return [synthetic_example(cfg, n_res, seed=10 + i, n_valid=n_res - i % 3) for i in range(n)]


def setup(strategy, head=HeadConfig(), wrap_tx=None, mesh=None, config=None):
    """(model, plan, jitted step, state, frozen, mesh) on `config` (default: the fast tiny model);
    `wrap_tx` maps the plan's optimizer to the one used."""
    model = AffinityModel(config or tiny_config(), head)
    variables = model.init_variables(random_trunk(), strategy, jax.random.PRNGKey(0))
    plan = strategy.plan(variables)
    tx = plan.optimizer(total_steps=10)
    tx = wrap_tx(tx) if wrap_tx is not None else tx
    mesh = mesh or data_mesh()
    state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(1), strategy.ema_decay)
    step = make_train_step(model, plan, tx, mesh, strategy.ema_decay)
    return model, plan, step, replicate(state, mesh), replicate(frozen, mesh), mesh


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def record_grads(inner: optax.GradientTransformation = optax.set_to_zero()) -> optax.GradientTransformation:
    """`inner`, whose state also keeps the last gradient received: state = (grads, inner state)."""
    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params), inner.init(params)

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state[1], params)
        return updates, (grads, inner_state)

    return optax.GradientTransformation(init, update)


def assert_same_tree(a, b, rtol=1e-6):
    """max |a - b| over the whole tree <= rtol * max |b| (not per leaf: float32 sums taken in
    another order through a deep backward differ by ~1e-7 of the gradient's scale, which is a
    large relative error on a leaf whose terms cancel, e.g. a bias gradient of 3e-5 from O(1) terms)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    scale = max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in lb)
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))
    assert worst <= rtol * scale, (worst, scale)


def test_accumulation_equals_one_batch():
    """k micro-batches (the last partly, one wholly padding) = one batch of their union, with
    head dropout on (dropout keys follow the example's position in the group)."""
    exs = examples(5)
    out = []
    for batch_size, k in ((2, 4), (5, 1)):
        _, _, step, state, frozen, mesh = setup(LoRA(accumulation_steps=k), HeadConfig(dropout=0.5),
                                                wrap_tx=lambda _: record_grads())
        (group,) = make_batches(exs, batch_size, k)
        assert group["weight"].shape == (k, batch_size) and group["weight"].sum() == 5
        state, metrics = step(state, frozen, shard_batch(group, mesh, 1))
        out.append((state["opt_state"][0], metrics))
    (g_acc, m_acc), (g_one, m_one) = out
    assert float(m_acc["weight"]) == float(m_one["weight"]) == 5
    assert rel_diff(m_acc["loss"], m_one["loss"]) <= 1e-6
    assert_same_tree(g_acc, g_one)
    # the adapters got a gradient (b, as a's is 0 while b = 0)
    assert np.abs(g_one["lora"]["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_v"]["b"]).max() > 0


DP_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from molfun_jax.heads import HeadConfig
    from molfun_jax.training import LoRA, data_mesh, make_batches, shard_batch
    from tests.test_train_step import examples, record_grads, setup
    assert jax.device_count() == 2, jax.devices()
    group, = make_batches(examples(6), 4, 2)  # 2 micro-batches of 4 (the second: 2 real + 2 padding)
    out = {}
    for n in (1, 2):
        _, _, step, state, frozen, mesh = setup(LoRA(ema_decay=0.5, accumulation_steps=2), HeadConfig(dropout=0.5),
                                                wrap_tx=record_grads, mesh=data_mesh(jax.devices()[:n]))
        state, m = step(state, frozen, shard_batch(group, mesh, 1))
        leaves = lambda t: [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(t)]
        out[n] = {"grads": leaves(state["opt_state"][0]), "update": leaves((state["trainable"], state["ema"])),
                  "loss": float(m["loss"])}
    print("RESULT" + json.dumps(out))
""")


def run_result(script: str, env: dict) -> dict:
    """Run `script` in a fresh Python process (cwd ROOT); the JSON it prints after "RESULT"."""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow  # ~1 min; tests/test_multiprocess.py checks 2 processes x 2 devices too
def test_data_parallel_two_devices_equal_one():
    """The same global batch on 2 forced host devices and on 1: same gradient, loss and AdamW +
    EMA update."""
    res = run_result(DP_SCRIPT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    one, two = res["1"], res["2"]
    assert rel_diff(two["loss"], one["loss"]) <= 1e-6
    assert_same_tree(two["grads"], one["grads"])
    assert_same_tree(two["update"], one["update"])


def walk(jaxpr):
    """Every equation of a jaxpr, recursively through sub-jaxprs (each body visited once)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from walk(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from walk(sub)


def count_dots(jaxpr) -> int:
    """dot_general equations, recursively through sub-jaxprs (each body counted once)."""
    return sum(eqn.primitive.name == "dot_general" for eqn in walk(jaxpr))


def dtypes_of_dots(jaxpr) -> set:
    return {str(eqn.invars[0].aval.dtype) for eqn in walk(jaxpr) if eqn.primitive.name == "dot_general"}


def test_head_only_step_has_no_trunk_backward():
    """The head-only step (uncached: the trunk runs inside it) has the forward's matmuls plus
    the head's backward, 4: d linear_2 kernel and input, d linear_1 kernel and input (for the
    head's LayerNorm) -- none for the trunk; LoRA's step adds a backward through the trunk.
    Checked on the traced jaxprs (nothing compiled)."""
    (group,) = make_batches(examples(2), 2, 1)
    extra = {}
    for strategy in (HeadOnly(amp=False), LoRA(amp=False)):
        model, plan, step, state, frozen, mesh = setup(strategy)
        train = count_dots(jax.make_jaxpr(step)(state, frozen, shard_batch(group, mesh, 1)).jaxpr)
        trainable = state["trainable"]
        fwd = count_dots(jax.make_jaxpr(make_predict_step(model, plan, mesh))(
            trainable, frozen, shard_batch({k: v[0] for k, v in group.items()}, mesh, 0)).jaxpr)
        extra[strategy.name] = (train - fwd, fwd)
    assert extra["head_only"][0] == 4, extra
    assert extra["lora"][0] > extra["lora"][1] // 2, extra  # the trunk's backward


@pytest.mark.parametrize("strategy", [pytest.param(LoRA(amp=False), marks=pytest.mark.slow, id="lora"),
                                      pytest.param(Full(amp=False), id="full")])
def test_remat_changes_no_gradient(strategy):
    """The step's gradients with every block rematerialised (what the remat policy saves, the
    ReLU masks and LayerNorm statistics, and what it recomputes) equal those of the plain
    backward, for Full (every kernel, LayerNorm scale and bias, and so every activation gradient)
    and, slow, LoRA (through its adapters' own backward)."""
    exs = examples(2)
    out = []
    for remat in (False, True):
        cfg = tiny_config()
        cfg.globals.update(remat=remat, remat_policy="auto")  # as in training
        _, _, step, state, frozen, mesh = setup(strategy, config=cfg, wrap_tx=lambda _: record_grads())
        (group,) = make_batches(exs, 2, 1)
        state, metrics = step(state, frozen, shard_batch(group, mesh, 1))
        out.append((state["opt_state"][0], float(metrics["loss"])))
    (g_plain, loss_plain), (g_remat, loss_remat) = out
    assert rel_diff(loss_remat, loss_plain) <= 1e-6
    assert_same_tree(g_remat, g_plain, rtol=1e-5)
    if isinstance(strategy, Full):  # a LayerNorm scale's gradient, compared above, is not zero
        scales = [v for k, v in traverse_util.flatten_dict(g_remat).items()
                  if k[-1] == "scale" and "pair_transition" in k]
        assert scales and float(np.abs(scales[0]).max()) > 0


def test_remat_recomputes_no_pair_transition_matmul_for_its_relu():
    """Rematerialised, a block's backward recomputes its forward, but not the pair transition's
    first Linear: its ReLU keeps a bit mask for the backward (`relu_keeping_mask`, saved by the
    training default 'auto'), and the transition ends the block, so nothing else needs that
    matmul. The MSA transition's output feeds the outer product mean, so its first Linear is
    recomputed. Counted on the compiled LoRA step's matmuls (the recompute's op names hold
    `rematted_computation`)."""
    cfg = tiny_config()
    cfg.globals.update(remat=True, remat_policy="auto")  # as in training
    model, plan, step, state, frozen, mesh = setup(LoRA(amp=False), config=cfg)
    (group,) = make_batches(examples(1), 1, 1)
    dots = [line for line in step.lower(state, frozen, shard_batch(group, mesh, 1)).compile().as_text().splitlines()
            if " dot(" in line]
    runs = lambda module, recompute: sum(f"/{module}/linear_1/" in line and ("rematted_computation" in line) == recompute
                                         for line in dots)
    assert runs("pair_transition", recompute=False) >= 1  # the forward
    assert runs("pair_transition", recompute=True) == 0
    assert runs("msa_transition", recompute=True) >= 1


@pytest.mark.parametrize("choice,recomputed", [("off", 0), ("nothing_saveable", 1)])
def test_remat_choice_reaches_the_compiled_step(choice, recomputed):
    """`with_remat`: 'off' compiles a step with no rematerialised block (no op of the backward's
    recompute, `rematted_computation`); 'nothing_saveable' keeps no ReLU mask, so the pair
    transition's first Linear is recomputed, which the default ('auto', above) avoids."""
    from molfun_jax.config import with_remat
    cfg = tiny_config()
    cfg.globals.update(remat=True, remat_policy="auto")  # as in training
    model, plan, step, state, frozen, mesh = setup(LoRA(amp=False), config=with_remat(cfg, choice))
    (group,) = make_batches(examples(1), 1, 1)
    hlo = step.lower(state, frozen, shard_batch(group, mesh, 1)).compile().as_text()
    assert ("rematted_computation" in hlo) == (choice != "off")
    assert min(1, sum(" dot(" in line and "/pair_transition/linear_1/" in line and "rematted_computation" in line
                      for line in hlo.splitlines())) == recomputed


def test_amp_computes_in_bfloat16():
    (group,) = make_batches(examples(2), 2, 1)
    for amp, dtypes in ((True, {"bfloat16", "float32"}), (False, {"float32"})):
        s = LoRA(amp=amp)
        model = AffinityModel(with_dtype(tiny_config(), s.compute_dtype))
        variables = model.init_variables(random_trunk(), s, jax.random.PRNGKey(0))
        plan = s.plan(variables)
        tx = plan.optimizer(10)
        mesh = data_mesh()
        state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(1))
        jaxpr = jax.make_jaxpr(make_train_step(model, plan, tx, mesh))(state, frozen, shard_batch(group, mesh, 1))
        assert dtypes_of_dots(jaxpr.jaxpr) == dtypes, amp


def test_ema_closed_form():
    """EMA after 3 steps = d^3 p0 + (1-d)(d^2 p1 + d p2 + p3), p_t the params after step t
    (cached trunk outputs: the head-only fast path)."""
    d = 0.9
    model, plan, step, state, frozen, mesh = setup(HeadOnly(ema_decay=d, lr=1e-2))
    rng = np.random.default_rng(0)
    cached = [{"single": rng.standard_normal((N_RES, 32)).astype(np.float32), "seq_mask": np.ones(N_RES, np.float32),
               "target": np.float32(rng.standard_normal())} for _ in range(4)]
    (group,) = make_batches(cached, 4, 1)
    params = [jax.tree_util.tree_map(np.asarray, state["trainable"])]
    for _ in range(3):
        state, _ = step(state, frozen, shard_batch(group, mesh, 1))
        params.append(jax.tree_util.tree_map(np.asarray, state["trainable"]))
    expected = jax.tree_util.tree_map(
        lambda p0, p1, p2, p3: d ** 3 * p0 + (1 - d) * (d ** 2 * p1 + d * p2 + p3), *params)
    for a, b in zip(jax.tree_util.tree_leaves(state["ema"]), jax.tree_util.tree_leaves(expected)):
        assert rel_diff(a, b) <= 1e-6
    assert rel_diff(params[3]["head"]["linear_1"]["kernel"], params[0]["head"]["linear_1"]["kernel"]) > 1e-3


def test_partial_frozen_blocks_bit_identical():
    """Partial(1) on the 2-block tiny stack: after 3 AdamW steps with weight decay, block 0 of
    every stacked Evoformer leaf and all other frozen params are bit-identical; block 1 moved."""
    s = Partial(unfreeze_last_n=1, lr_trunk=1e-2, weight_decay=0.1, amp=False)
    model, plan, step, state, frozen, mesh = setup(s)
    variables = model.init_variables(random_trunk(), s, jax.random.PRNGKey(0))
    (group,) = make_batches(examples(4), 4, 1)
    for _ in range(3):
        state, _ = step(state, frozen, shard_batch(group, mesh, 1))
    before = traverse_util.flatten_dict(variables)
    after = traverse_util.flatten_dict(plan.combine(state["trainable"], frozen))
    q = ("trunk", "evoformer", "blocks", "msa_att_row", "mha", "linear_q", "kernel")
    assert plan.rules[q].start == 1
    for p, w in before.items():
        w, a = np.asarray(w), np.asarray(after[p])
        if p[:3] == ("trunk", "evoformer", "blocks"):
            np.testing.assert_array_equal(a[0], w[0], err_msg=str(p))
        elif p not in plan.rules:
            np.testing.assert_array_equal(a, w, err_msg=str(p))
    assert not np.array_equal(np.asarray(after[q][1]), np.asarray(before[q][1]))


@pytest.mark.slow
def test_model_1_ptm_lora_step():
    """One LoRA step of the full-size model_1_ptm (remat, bf16 compute) on 2 random 16-residue
    examples: finite loss and gradient, adapters updated, trunk untouched."""
    from molfun_jax.config import model_config
    from molfun_jax.model import param_shapes

    cfg = model_config("model_1_ptm", train=True)
    cfg.globals.num_recycles = 0
    rng = np.random.default_rng(0)
    trunk = jax.tree_util.tree_map(
        lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(cfg))
    s = LoRA()
    model = AffinityModel(with_dtype(cfg, s.compute_dtype))
    variables = model.init_variables(trunk, s, jax.random.PRNGKey(0))
    plan = s.plan(variables)
    assert plan.count(variables) == {"lora": 1_179_648, "head": 50_177, "total": 1_229_825}
    tx = plan.optimizer(10)
    mesh = data_mesh()
    state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(1))
    step = make_train_step(model, plan, tx, mesh)
    exs = [synthetic_example(cfg, 16, seed=i) for i in range(2)]
    (group,) = make_batches(exs, 2, 1)
    state, m = step(replicate(state, mesh), replicate(frozen, mesh), shard_batch(group, mesh, 1))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    b = state["trainable"]["lora"]["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_v"]["b"]
    assert b.shape == (48, 8, 256) and float(jnp.abs(b).max()) > 0


def reverse_scan_lengths(jaxpr) -> list:
    """Lengths of the reverse-order scans (the backward of a forward scan), recursively."""
    return [eqn.params["length"] for eqn in walk(jaxpr) if eqn.primitive.name == "scan" and eqn.params["reverse"]]


@pytest.mark.slow  # ~40 s; test_evoformer's frozen_blocks variant checks the split's gradients by default
def test_partial_split_same_update_without_frozen_backward():
    """Partial(1) on the 2-block tiny stack: the step that runs block 0 forward-only (taken
    from the plan) gives the gradient and updated params of the step that back-propagates
    through both blocks (AffinityModel(frozen_blocks=0)), and its backward scans 1 block, not 2.
    Updated params compared under SGD: Adam's first update is ~lr * sign(g), which turns the
    float32 noise of a gradient that cancels to ~0 (a LayerNorm bias feeding a softmax) into
    +-lr on either path alike."""
    s = Partial(unfreeze_last_n=1, lr_trunk=1e-2, weight_decay=0.1, amp=False)
    (group,) = make_batches(examples(4), 2, 2)
    results, lengths = [], []
    for split in ({}, {"frozen_blocks": 0}):
        model = AffinityModel(tiny_config(), HeadConfig(), **split)
        variables = model.init_variables(random_trunk(), s, jax.random.PRNGKey(0))
        plan = s.plan(variables)
        tx = record_grads(optax.sgd(0.1))
        mesh = data_mesh()
        state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(1))
        state, frozen = replicate(state, mesh), replicate(frozen, mesh)
        step = make_train_step(model, plan, tx, mesh)
        batch = shard_batch(group, mesh, 1)
        lengths.append(reverse_scan_lengths(jax.make_jaxpr(step)(state, frozen, batch).jaxpr))
        state, metrics = step(state, frozen, batch)
        results.append((state["opt_state"][0], state["trainable"], metrics["loss"]))
    (g_new, p_new, l_new), (g_old, p_old, l_old) = results
    assert_same_tree(g_new, g_old, rtol=1e-6)
    assert_same_tree(p_new, p_old, rtol=1e-6)
    assert rel_diff(l_new, l_old) <= 1e-6
    # block backward: scans of 1 block only (the split); the old path scans both blocks
    assert 2 not in lengths[0] and 1 in lengths[0], lengths
    assert 2 in lengths[1], lengths


CACHE_SCRIPT = textwrap.dedent("""
    import hashlib, json, jax, numpy as np
    from molfun_jax.cli.common import enable_compilation_cache
    from molfun_jax.training import LoRA, make_batches, shard_batch
    from tests.test_train_step import examples, setup
    assert enable_compilation_cache()  # as train.py does (MOLFUN_JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny model: cache every compile
    hits = []
    jax.monitoring.register_event_listener(lambda e, **_: hits.append(e) if e.endswith("/cache_hits") else None)
    _, _, step, state, frozen, mesh = setup(LoRA(ema_decay=0.5))
    batch = shard_batch(make_batches(examples(2), 2, 1)[0], mesh, 1)
    before = len(hits)  # init_state's own small programs hit the cache too
    compiled = step.lower(state, frozen, batch).compile()
    step_hit = len(hits) > before
    state, m = compiled(state, frozen, batch)
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(state))).hexdigest()
    print("RESULT" + json.dumps({"step_hit": step_hit, "loss": float(m["loss"]), "state": digest}))
""")


def test_step_loaded_from_the_compilation_cache_is_the_same_program(tmp_path):
    """A rerun (`train.py` keeps XLA's persistent cache by default) loads the compiled train step
    instead of compiling it, and that step gives the first run's loss and updated state bit for bit."""
    env = {"MOLFUN_JAX_CACHE": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
    first, rerun = (run_result(CACHE_SCRIPT, env) for _ in range(2))
    assert not first["step_hit"] and rerun["step_hit"]
    assert np.isfinite(first["loss"]) and (rerun["loss"], rerun["state"]) == (first["loss"], first["state"])
