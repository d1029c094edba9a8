"""Frozen parameters get no gradient computation, read off the train step's jaxpr (nothing is
compiled): a kernel's gradient dW = x^T g is a dot_general whose output has the kernel's shape
(the activations' cotangents keep a residue axis), so the trip-count-weighted number of such dots
equals the number of trained kernels that reach the loss (the kernels of one fused matmul share
a dW): HeadOnly and LoRA none of the trunk's, Partial(1 of 2 blocks) one block's, Full every
block's."""
import itertools
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from molfun_jax.training import Full, HeadOnly, LoRA, Partial, make_batches, shard_batch
from tests.finetune_common import synthetic_example, tiny_config
from tests.test_train_step import setup

N_RES = 11  # a size no channel width has: no activation is kernel-shaped
# a triangle multiplication's edge projections: one matmul (and one dW) for the four kernels
TRI_MUL_EDGE = ("linear_a_g", "linear_a_p", "linear_b_g", "linear_b_p")


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jax.extend.core.Jaxpr):
                yield sub


def kernel_shaped_dots(jaxpr, shapes: set, times: int = 1, rank: int = 0) -> int:
    """dot_general eqns with an output in `shapes` (2-D ones in either orientation or after a
    leading example axis), each counted as often as it runs: scan bodies times their length, the
    costliest branch of a cond. A dot contracting `rank` elements is a LoRA adapter's a @ b (the
    update folded into its kernel), not a dW: a dW contracts positions."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            s = tuple(eqn.outvars[0].aval.shape)
            (contracting, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
            # 3-D: a per-example dW, from a custom_vjp backward that runs under the step's vmap
            shaped = s in shapes or (len(s) == 2 and s[::-1] in shapes) or (len(s) == 3 and s[1:] in shapes)
            n += times * (shaped and k != rank)
        elif eqn.primitive.name == "cond":
            n += max(kernel_shaped_dots(b, shapes, times, rank) for b in _subjaxprs(eqn))
        else:
            k = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            n += sum(kernel_shaped_dots(sub, shapes, k, rank) for sub in _subjaxprs(eqn))
    return n


def trunk_kernel_shapes(trunk) -> set:
    """Shapes of the trunk's kernels, per block for the scanned Evoformer stack; the outer product
    mean's [C*C, C_z] projection also as [C, C, C_z] in any axis order: its einsum contracts that
    form, and its dW is a dot with that output; a triangle multiplication's fused edge kernel
    [C_z, 4 * C_hidden]."""
    flat = traverse_util.flatten_dict(trunk)
    shapes = {tuple(np.shape(v)[-2:]) for p, v in flat.items() if p[-1] == "kernel"}
    for p, v in flat.items():
        if p[-3:] == ("outer_product_mean", "linear_out", "kernel"):
            cc, c_z = np.shape(v)[-2:]
            shapes.update(itertools.permutations((math.isqrt(cc), math.isqrt(cc), c_z)))
        if p[-2:] == (TRI_MUL_EDGE[0], "kernel"):
            c_z, c_hidden = np.shape(v)[-2:]
            shapes.add((c_z, len(TRI_MUL_EDGE) * c_hidden))
    return shapes


def evoformer_block_dws(trunk, shapes: set) -> int:
    """The dW dots of one trained Evoformer block: one a kernel, one for each triangle
    multiplication's four edge kernels."""
    return sum(1 for p, v in traverse_util.flatten_dict(trunk).items()
               if p[:2] == ("evoformer", "blocks") and p[-1] == "kernel" and p[-2] not in TRI_MUL_EDGE[1:]
               and tuple(np.shape(v)[-2:]) in shapes)


@pytest.mark.parametrize("strategy", [HeadOnly(amp=False), LoRA(rank=3, amp=False),
                                      Partial(unfreeze_last_n=1, amp=False),
                                      Full(amp=False)], ids=lambda s: s.name)
def test_frozen_params_get_no_gradient_dots(strategy):
    cfg = tiny_config()
    exs = [synthetic_example(cfg, N_RES, seed=i, n_valid=N_RES - i) for i in range(2)]
    (group,) = make_batches(exs, 2, 1)
    model, plan, step, state, frozen, mesh = setup(strategy)
    trunk = plan.combine(state["trainable"], frozen)["trunk"]
    shapes = trunk_kernel_shapes(trunk)
    head_like = sum(1 for p, v in traverse_util.flatten_dict(state["trainable"]).items()
                    if p[0] in ("head", "lora") and p[-1] in ("kernel", "a", "b")
                    and (tuple(np.shape(v)[-2:]) in shapes or tuple(np.shape(v)[-2:])[::-1] in shapes))
    jaxpr = jax.make_jaxpr(step)(state, frozen, shard_batch(group, mesh, 1)).jaxpr
    rank = getattr(strategy, "rank", 0)
    got = kernel_shaped_dots(jaxpr, shapes, rank=rank)
    # the forward never produces kernel-shaped outputs (those dots are the trained kernels' dW)
    fwd = kernel_shaped_dots(jax.make_jaxpr(lambda t: model.predict(plan.combine(t, frozen), exs[0]))(
        state["trainable"]).jaxpr, shapes, rank=rank)
    assert fwd == 0
    block_dw = got - head_like
    n_block = evoformer_block_dws(trunk, shapes)
    if strategy.name in ("head_only", "lora"):
        assert block_dw == 0, (strategy.name, got, head_like)
    elif strategy.name == "partial":
        # one trained block of two, plus evoformer/linear
        assert block_dw == n_block * 1 + 1, (got, head_like, n_block)
    else:  # full: every block's kernels (and the other trunk kernels) get their dW
        assert block_dw >= n_block * cfg.model.evoformer_stack.no_blocks, (got, head_like, n_block)
