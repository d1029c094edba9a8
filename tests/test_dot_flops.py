"""`scripts.bench_train_step.dot_flops`: the matmul FLOPs an optimised XLA module executes,
checked against hand-derived counts (2 m n k per matmul) and XLA's own count of a loop-free
module. The benchmark's step/forward FLOP ratio and gpu_check's utilisation read it. And
`matmul_ops`, the ops the profile's matmul shares count, `op_names`, which names the profile's
rows, and the profile's step-against-forward table (`against_forward`, `profile_step`)."""
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_train_step import against_forward, dot_flops, matmul_ops, op_names, profile_step

M, K, N = 48, 40, 24
X = jnp.asarray(np.random.default_rng(0).normal(size=(M, K)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).normal(size=(K, N)), jnp.float32)
V = jnp.asarray(np.random.default_rng(2).normal(size=(N, K)), jnp.float32)


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile()


def test_loop_free_module_matches_xla_cost_analysis():
    c = _compiled(lambda x, w: jnp.tanh(x @ w) + 1.0, X, W)
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert dot_flops(c.as_text()) == 2 * M * K * N
    # XLA's count adds the elementwise ops (tanh, add) to the same matmul FLOPs
    assert 2 * M * K * N <= cost["flops"] < 2 * M * K * N * 1.1


def test_scan_body_counts_once_per_iteration_and_batched_dots_count_their_batch():
    def f(x, w, v):
        def body(h, _):
            return jnp.tanh((h @ w) @ v), None  # [M, K] -> [M, N] -> [M, K]
        h, _ = jax.lax.scan(body, x, None, length=7)
        batched = jnp.einsum("bmk,bkn->bmn", jnp.stack([h, h, h]), jnp.stack([w, w, w]))  # 3 x [M, N]
        return h, batched
    assert dot_flops(_compiled(f, X, W, V).as_text()) == 7 * 2 * (2 * M * K * N) + 3 * 2 * M * K * N


def test_matmul_ops_are_the_matmul_and_not_the_elementwise_work():
    """The profile's matmul share: of the module's top-level ops, exactly the one that reads
    both matmul operands counts as a matmul (XLA:CPU fuses it with the tanh, or not), the
    elementwise ops on its output and on the other input do not."""
    text = _compiled(lambda x, w, v: (jnp.tanh(x @ w) + 1.0, jnp.sin(v) * 2.0), X, W, V).as_text()
    entry = text[text.index("ENTRY"):].splitlines()[1:]
    defined = {m.group(1): line for line in entry if (m := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line))}
    computing = {n for n, line in defined.items() if not re.search(r" (parameter|tuple)\(", line)}
    reads_x_and_w = {n for n in computing if re.search(r"\(%x[.\d]*, %w[.\d]*[,)]", defined[n])}
    assert len(reads_x_and_w) == 1 and len(computing) >= 2
    ops = matmul_ops(text)
    assert ops.keys() & computing == reads_x_and_w
    assert ops[reads_x_and_w.pop()] == ("gemm", 2 * M * K * N)


def test_matmul_ops_tell_batched_products_from_gemms_with_the_flops_of_one_execution():
    """The scan body's two GEMMs count once each (an op's FLOPs per execution: the trace has an
    event per iteration), the einsum over a batch of 3 as one batched op of 3 products."""
    def f(x, w, v):
        def body(h, _):
            return jnp.tanh((h @ w) @ v), None  # [M, K] -> [M, N] -> [M, K]
        h, _ = jax.lax.scan(body, x, None, length=7)
        return jnp.einsum("bmk,bkn->bmn", jnp.stack([h, h, h]), jnp.stack([w, w, w]))  # 3 x [M, N]
    ops = matmul_ops(_compiled(f, X, W, V).as_text()).values()
    assert [f for kind, f in ops if kind == "batched"] == [3 * 2 * M * K * N]
    assert sum(f for kind, f in ops if kind == "gemm") == 2 * (2 * M * K * N)


NAMED_HLO = """HloModule m

ENTRY %main (p: f32[8,8]) -> f32[8,8] {
  %p = f32[8,8]{1,0} parameter(0)
  %a = f32[8,8]{1,0} multiply(%p, %p), metadata={op_name="jit(step)/jvp(AlphaFold)/evoformer/blocks/core/tri_mul_out/mul"}
  %g = f32[8,8]{1,0} add(%p, %p), metadata={op_name="jit(step)/transpose(jvp(AlphaFold))/evoformer/blocks/core/tri_mul_out/add"}
  %c = f32[8,8]{1,0} copy(%g)
  %d = f32[8,8]{1,0} dot(%a, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={stack_frame_id=3}
  %e = f32[8,8]{1,0} negate(%p)
  ROOT %r = f32[8,8]{1,0} add(%d, %e), metadata={op_name="jit(step)/head/add"}
}
"""


def test_op_names_read_op_name_and_name_an_unnamed_dot_from_its_operands():
    """`a` is the forward of tri_mul_out, `g` its backward; the dot (no op_name, as XLA:CPU leaves
    some) reads `a` directly and `g` through an unnamed copy, so it is tri_mul_out's, in the
    backward; `e`'s only operand is a parameter, so it gets no name; `r` is outside the stacks."""
    names = op_names(NAMED_HLO)
    assert names["a"] == ("evoformer", "tri_mul_out", "fwd", "tri_mul_out/mul")
    assert names["g"][:3] == ("evoformer", "tri_mul_out", "bwd")
    assert names["d"] == ("evoformer", "tri_mul_out", "bwd", "tri_mul_out bwd, from its operands")
    assert names["c"][:3] == ("evoformer", "tri_mul_out", "bwd")
    assert "e" not in names and "p" not in names
    assert names["r"] == ("other", "-", "fwd", "head/add")


def test_conditional_counts_its_costliest_branch():
    def f(p, x, w, v):
        return jax.lax.cond(p, lambda x: (x @ w) @ v, lambda x: x * 2.0, x)
    assert dot_flops(_compiled(f, True, X, W, V).as_text()) == 2 * (2 * M * K * N)


GPU_HLO = """HloModule jit_f, entry_computation_layout={(f32[64,32]{1,0})->f32[64,32]{1,0}}

%cond (p.1: (s32[], f32[64,32])) -> pred[] {
  %p.1 = (s32[], f32[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[64,32]{1,0}) %p.1), index=0
  %c3 = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %c3), direction=LT
}

%body (p.2: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p.2 = (s32[], f32[64,32]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element((s32[], f32[64,32]{1,0}) %p.2), index=0
  %x = f32[64,32]{1,0} get-tuple-element((s32[], f32[64,32]{1,0}) %p.2), index=1
  %w = f32[32,32]{1,0} constant({...})
  %custom-call.1 = (f32[64,32]{1,0}, s8[4194304]{0}) custom-call(f32[64,32]{1,0} %x, f32[32,32]{1,0} %w), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","wait_on_operation_queues":[],"gemm_backend_config":{"alpha_real":1,"alpha_imag":0,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %y = f32[64,32]{1,0} get-tuple-element((f32[64,32]{1,0}, s8[4194304]{0}) %custom-call.1), index=0
  %one = s32[] constant(1)
  %next = s32[] add(s32[] %i.1, s32[] %one)
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(s32[] %next, f32[64,32]{1,0} %y)
}

ENTRY %main.9 (a.1: f32[64,32]) -> f32[64,32] {
  %a.1 = f32[64,32]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,32]{1,0}) tuple(s32[] %zero, f32[64,32]{1,0} %a.1)
  %while = (s32[], f32[64,32]{1,0}) while((s32[], f32[64,32]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[64,32]{1,0} get-tuple-element((s32[], f32[64,32]{1,0}) %while), index=1
}
"""


def test_gpu_library_gemm_in_a_loop():
    # XLA:GPU rewrites dots into cuBLAS custom-calls whose dimension numbers sit in backend_config
    assert dot_flops(GPU_HLO) == 3 * 2 * 64 * 32 * 32


def test_against_forward_sets_each_modules_step_phases_against_its_forward_time():
    step = Counter({("evoformer", "tri_mul_out", "fwd"): 2000.0, ("evoformer", "tri_mul_out", "remat"): 1500.0,
                    ("evoformer", "tri_mul_out", "bwd"): 3500.0, ("evoformer", "tri_att_start", "fwd"): 1000.0,
                    ("other", "-", "fwd"): 500.0})  # microseconds, as traced
    forward = Counter({("evoformer", "tri_mul_out"): 2000.0, ("evoformer", "tri_att_start"): 1000.0,
                       ("extra_msa_stack", "pair_transition"): 500.0})
    head, mul, att, other = against_forward(step, forward)
    # the step's 8.5 ms against the forward program's 3.5: 2.43x
    assert head[1:] == [8.5, 1.0] and "forward program 3.5 ms; step 2.43x" in head[0]
    assert mul == ["evoformer tri_mul_out: fwd 2.0, remat 1.5, bwd 3.5 ms; forward program 2.0 ms, step 3.50x that",
                   7.0, round(7.0 / 8.5, 3)]
    assert att[0].endswith("fwd 1.0 ms; forward program 1.0 ms, step 1.00x that")
    assert other[0].endswith("forward program 0.0 ms, step - that")  # nothing to compare with


def test_profile_step_traces_the_forward_beside_the_step(tmp_path):
    """The step (state donated, as the train step's) and the forward each traced into their own
    folder with their own HLO; the module table's step total is the op-kind table's."""
    state, frozen = {"trainable": {"w": W}}, {"v": V}
    step = jax.jit(lambda s, f, b: ({"trainable": {"w": s["trainable"]["w"] * 0.5}},
                                    jnp.sum(jnp.tanh(b @ s["trainable"]["w"]) @ f["v"])), donate_argnums=0)
    step = step.lower(state, frozen, X).compile()
    fwd = jax.jit(lambda t, f, x: jnp.tanh(x @ t["w"]) @ f["v"]).lower(state["trainable"], frozen, X).compile()
    rows = profile_step(step, state, frozen, X, str(tmp_path), forward=(fwd, X))
    assert (tmp_path / "hlo.txt").read_text() == step.as_text()
    assert (tmp_path / "forward" / "hlo.txt").read_text() == fwd.as_text()
    kinds = next(r for r in rows if r[0] == "--- by op kind")
    modules = next(r for r in rows if r[0].startswith("--- by module"))
    assert modules[1] == kinds[1] > 0
    assert rows[-1][0].startswith("other -: fwd ") and "forward program " in rows[-1][0]
