"""bfloat16 compute on tiny, executed: a forward and one LoRA train step (amp) run and stay
finite, with the matmuls in bfloat16 while every LayerNorm (rsqrt of the variance) and every
softmax (exp after the max subtraction) computes in float32 -- read off the jaxprs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfun_jax.training import AffinityModel, LoRA, make_batches, shard_batch, with_dtype
from tests.finetune_common import random_trunk, tiny_config
from tests.test_train_step import examples, setup


def input_dtypes(jaxpr, names: set, out: dict | None = None) -> dict:
    """{primitive: set of its first input's dtypes} over `names`, recursively."""
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            out.setdefault(eqn.primitive.name, set()).add(str(eqn.invars[0].aval.dtype))
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    input_dtypes(sub.jaxpr, names, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    input_dtypes(sub, names, out)
    return out


def assert_norms_and_softmax_float32(jaxpr) -> None:
    got = input_dtypes(jaxpr, {"dot_general", "rsqrt", "exp", "reduce_max"})
    assert "bfloat16" in got["dot_general"], got  # the model does compute in bfloat16
    for prim in ("rsqrt", "exp", "reduce_max"):  # LayerNorm; softmax
        assert got[prim] == {"float32"}, (prim, got)


def test_bf16_forward_runs_finite_with_float32_norms_and_softmax():
    s = LoRA(rank=2, amp=True)
    model = AffinityModel(with_dtype(tiny_config(), s.compute_dtype))
    variables = model.init_variables(random_trunk(), s, jax.random.PRNGKey(0))
    ex = {k: jnp.asarray(v) for k, v in examples(1)[0].items() if k != "target"}
    assert_norms_and_softmax_float32(jax.make_jaxpr(model.predict)(variables, ex).jaxpr)
    p32 = jax.jit(AffinityModel(tiny_config()).predict)(variables, ex)
    p16 = jax.jit(model.predict)(variables, ex)
    assert p16.dtype == jnp.float32 and np.isfinite(float(p16))
    assert abs(float(p16) - float(p32)) <= 0.05 * max(abs(float(p32)), 1.0)  # bf16 rounding, not a bug


@pytest.mark.slow  # ~25 s; the bf16 forward check runs by default
def test_bf16_lora_step_runs_and_updates_float32_params():
    s = LoRA(rank=2, lr_lora=1e-2, amp=True)
    _, _, step, state, frozen, mesh = setup(s, config=with_dtype(tiny_config(), s.compute_dtype))
    (group,) = make_batches(examples(2), 2, 1)
    batch = shard_batch(group, mesh, 1)
    assert_norms_and_softmax_float32(jax.make_jaxpr(step)(state, frozen, batch).jaxpr)
    before = jax.tree_util.tree_map(np.array, state["trainable"])
    state, m = step(state, frozen, batch)
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    after = jax.tree_util.tree_map(np.array, state["trainable"])
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(after))  # master weights stay fp32
    assert not np.array_equal(after["lora"]["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_q"]["b"],
                              before["lora"]["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_q"]["b"])
