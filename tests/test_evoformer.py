"""MSA/pair modules, Evoformer and extra-MSA blocks and stacks vs OpenFold; gradients; chunking;
dropout; parameter counts at full size."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
import pytest

from molfun_jax.config import model_config
from molfun_jax.model.evoformer import (EvoformerBlock, EvoformerStack, ExtraMSABlock, ExtraMSAStack,
                                        MSATransition)
from molfun_jax.model.msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from molfun_jax.model.outer_product_mean import OuterProductMean
from molfun_jax.model.pair_transition import PairTransition
from molfun_jax.model.template import TemplatePairStack
from molfun_jax.model.triangular_attention import TriangleAttention
from molfun_jax.model.triangular_multiplicative_update import (TriangleMultiplicationIncoming,
                                                               TriangleMultiplicationOutgoing)
from tests.reference import assert_parity, flax_params, padded_mask, randomize_, rel_error, to_torch, torch

from openfold.model import evoformer as of_evo  # noqa: E402
from openfold.model import msa as of_msa  # noqa: E402
from openfold.model import outer_product_mean as of_opm  # noqa: E402
from openfold.model import pair_transition as of_pt  # noqa: E402
from openfold.model import triangular_attention as of_ta  # noqa: E402
from openfold.model import triangular_multiplicative_update as of_tm  # noqa: E402
from convert.torch_to_flax import state_dict_to_tree  # noqa: E402

N_SEQ, N_RES = 5, 10
C_M, C_Z = 16, 12


def inputs(seed: int = 0, n_seq: int = N_SEQ, n_res: int = N_RES, c_m: int = C_M, c_z: int = C_Z):
    """Random m, z and padded masks: the last 3 residues and the last sequence are padding."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n_seq, n_res, c_m)).astype(np.float32)
    z = rng.normal(size=(n_res, n_res, c_z)).astype(np.float32)
    seq_mask = padded_mask((n_res,), n_res - 3)
    msa_mask = padded_mask((n_seq, n_res), n_seq - 1, axis=0) * seq_mask[None]
    pair_mask = seq_mask[:, None] * seq_mask[None, :]
    return m, z, msa_mask, pair_mask


def tiny(stack: str) -> dict:
    c = model_config("tiny").model
    return {"evoformer": c.evoformer_stack, "extra": c.extra_msa.extra_msa_stack}[stack].to_dict()


BLOCK_KEYS = ("c_m", "c_z", "c_hidden_msa_att", "c_hidden_opm", "c_hidden_mul", "c_hidden_pair_att",
              "no_heads_msa", "no_heads_pair", "transition_n", "msa_dropout", "pair_dropout", "inf", "eps")


# ---------------------------------------------------------------------------------------------
# single modules


def test_msa_row_attention_with_pair_bias():
    m, z, msa_mask, _ = inputs(1)
    ref = randomize_(of_msa.MSARowAttentionWithPairBias(C_M, C_Z, 4, 3, inf=1e9), 1)
    want = ref(to_torch(m), z=to_torch(z), mask=to_torch(msa_mask))
    got = MSARowAttentionWithPairBias(C_M, 4, 3, c_z=C_Z, inf=1e9).apply(
        {"params": flax_params(ref)}, m, z=z, mask=msa_mask)
    assert_parity("MSARowAttentionWithPairBias", got, want, mask=msa_mask)


def test_msa_column_attention():
    m, _, msa_mask, _ = inputs(2)
    ref = randomize_(of_msa.MSAColumnAttention(C_M, 4, 3, inf=1e9), 2)
    want = ref(to_torch(m), mask=to_torch(msa_mask))
    got = MSAColumnAttention(C_M, 4, 3, inf=1e9).apply({"params": flax_params(ref)}, m, mask=msa_mask)
    assert_parity("MSAColumnAttention", got, want, mask=msa_mask)


def test_msa_column_global_attention():
    m, _, msa_mask, _ = inputs(3)
    ref = randomize_(of_msa.MSAColumnGlobalAttention(C_M, 4, 3, inf=1e9, eps=1e-8), 3)
    want = ref(to_torch(m), mask=to_torch(msa_mask))
    mod = MSAColumnGlobalAttention(C_M, 4, 3, inf=1e9, eps=1e-8)
    got = mod.apply({"params": flax_params(ref)}, m, mask=msa_mask)
    assert_parity("MSAColumnGlobalAttention", got, want, mask=msa_mask)
    chunked = mod.apply({"params": flax_params(ref)}, m, mask=msa_mask, chunk_size=3)
    np.testing.assert_allclose(chunked, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_msa_transition(masked):
    m, _, msa_mask, _ = inputs(4)
    mask = msa_mask if masked else None
    ref = randomize_(of_evo.MSATransition(C_M, 2), 4)
    want = ref(to_torch(m), mask=None if mask is None else to_torch(mask))
    mod = MSATransition(C_M, 2)
    got = mod.apply({"params": flax_params(ref)}, m, mask=mask)
    assert_parity(f"MSATransition(mask={masked})", got, want, mask=mask)
    chunked = mod.apply({"params": flax_params(ref)}, m, mask=mask, chunk_size=4)
    np.testing.assert_allclose(chunked, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_seq", [1, 5, 40])
def test_outer_product_mean(n_seq):
    """Shallow MSAs contract the projection first, deep ones form the outer product first
    (the einsum's FLOP-optimal order); both equal OpenFold."""
    m, _, msa_mask, pair_mask = inputs(5, n_seq=n_seq)
    if n_seq == 1:  # a single sequence: unmasked (the helper pads the last sequence)
        msa_mask = np.broadcast_to(pair_mask[:1, :], msa_mask.shape).copy()
    ref = randomize_(of_opm.OuterProductMean(C_M, C_Z, 5), 5)
    want = ref(to_torch(m), mask=to_torch(msa_mask))
    mod = OuterProductMean(C_M, C_Z, 5)
    got = mod.apply({"params": flax_params(ref)}, m, mask=msa_mask)
    assert_parity("OuterProductMean", got, want, mask=pair_mask)
    want_c = ref(to_torch(m), mask=to_torch(msa_mask), chunk_size=3)
    got_c = mod.apply({"params": flax_params(ref)}, m, mask=msa_mask, chunk_size=3)
    assert_parity("OuterProductMean(chunk_size=3)", got_c, want_c, mask=pair_mask)


def test_outer_product_mean_cases_cover_both_contraction_orders():
    """The cases above take different einsum paths: projection-first at 1 sequence,
    outer-product-first at 40."""
    c = 5
    path = lambda s: opt_einsum.contract_path("...sc,...jse,cez->...jz", np.ones((N_RES, s, c)),
                                              np.ones((1, N_RES, s, c)), np.ones((c, c, C_Z)), optimize="optimal")[0]
    assert path(1) != path(40)


@pytest.mark.parametrize("ours,theirs", [(TriangleMultiplicationOutgoing, of_tm.TriangleMultiplicationOutgoing),
                                         (TriangleMultiplicationIncoming, of_tm.TriangleMultiplicationIncoming)])
def test_triangle_multiplication(ours, theirs):
    _, z, _, pair_mask = inputs(6)
    ref = randomize_(theirs(C_Z, 7), 6)
    want = ref(to_torch(z), mask=to_torch(pair_mask), inplace_safe=False)
    got = ours(C_Z, 7).apply({"params": flax_params(ref)}, z, mask=pair_mask)
    assert_parity(ours.__name__, got, want, mask=pair_mask)


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention(starting):
    _, z, _, pair_mask = inputs(7)
    ref = randomize_(of_ta.TriangleAttention(C_Z, 4, 3, starting=starting, inf=1e9), 7)
    want = ref(to_torch(z), mask=to_torch(pair_mask))
    mod = TriangleAttention(C_Z, 4, 3, starting=starting, inf=1e9)
    got = mod.apply({"params": flax_params(ref)}, z, mask=pair_mask)
    assert_parity(f"TriangleAttention(starting={starting})", got, want, mask=pair_mask)
    # chunked, with a leading (template-like) axis: the triangle bias is then broadcast on one batch axis only
    z2 = np.stack([z, z[::-1]])
    full = mod.apply({"params": flax_params(ref)}, z2, mask=pair_mask[None])
    chunked = mod.apply({"params": flax_params(ref)}, z2, mask=pair_mask[None], chunk_size=3)
    np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(full[0], got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_pair_transition(masked):
    _, z, _, pair_mask = inputs(8)
    mask = pair_mask if masked else None
    ref = randomize_(of_pt.PairTransition(C_Z, 3), 8)
    want = ref(to_torch(z), mask=None if mask is None else to_torch(mask))
    got = PairTransition(C_Z, 3).apply({"params": flax_params(ref)}, z, mask=mask)
    assert_parity(f"PairTransition(mask={masked})", got, want, mask=mask)


# ---------------------------------------------------------------------------------------------
# blocks and stacks


def _block_cfg(stack: str) -> dict:
    cfg = tiny(stack)
    return {k: cfg[k] for k in BLOCK_KEYS}


def _run_torch_block(ref, m, z, msa_mask, pair_mask):
    return ref(to_torch(m), to_torch(z), msa_mask=to_torch(msa_mask), pair_mask=to_torch(pair_mask),
               chunk_size=None, use_lma=False, inplace_safe=False, _mask_trans=False)


@pytest.mark.parametrize("kind", ["evoformer", "extra"])
def test_blocks(kind):
    cfg = _block_cfg(kind)
    m, z, msa_mask, pair_mask = inputs(9, c_m=cfg["c_m"], c_z=cfg["c_z"])
    if kind == "evoformer":
        ref, mod = of_evo.EvoformerBlock(**cfg), EvoformerBlock(**cfg)
    else:
        ref, mod = of_evo.ExtraMSABlock(**cfg, ckpt=False), ExtraMSABlock(**cfg)
    randomize_(ref, 9)
    with torch.no_grad():
        want_m, want_z = _run_torch_block(ref, m, z, msa_mask, pair_mask)
    got_m, got_z = mod.apply({"params": flax_params(ref)}, m, z, msa_mask, pair_mask)
    name = type(mod).__name__
    assert_parity(f"{name} m", got_m, want_m, mask=msa_mask)
    assert_parity(f"{name} z", got_z, want_z, mask=pair_mask)


def _stack_inputs(cfg: dict, seed: int):
    return inputs(seed, c_m=cfg["c_m"], c_z=cfg["c_z"])


def test_evoformer_stack():
    cfg = dict(tiny("evoformer"), no_blocks=3)
    m, z, msa_mask, pair_mask = _stack_inputs(cfg, 10)
    ref = randomize_(of_evo.EvoformerStack(**cfg, blocks_per_ckpt=None), 10)
    with torch.no_grad():
        want = ref(to_torch(m), to_torch(z), msa_mask=to_torch(msa_mask), pair_mask=to_torch(pair_mask),
                   chunk_size=None, use_lma=False, inplace_safe=False, _mask_trans=False)
    got = EvoformerStack(**cfg).apply({"params": flax_params(ref)}, m, z, msa_mask, pair_mask)
    for what, g, w, mask in zip("mzs", got, want, (msa_mask, pair_mask, msa_mask[0])):
        assert_parity(f"EvoformerStack(3 blocks) {what}", g, w, mask=mask)


def test_extra_msa_stack():
    cfg = dict(tiny("extra"), no_blocks=2)
    m, z, msa_mask, pair_mask = _stack_inputs(cfg, 11)
    ref = randomize_(of_evo.ExtraMSAStack(**cfg, ckpt=False), 11)
    with torch.no_grad():
        want = ref(to_torch(m), to_torch(z), msa_mask=to_torch(msa_mask), pair_mask=to_torch(pair_mask),
                   chunk_size=None, use_lma=False, inplace_safe=False, _mask_trans=False)
    got = ExtraMSAStack(**cfg).apply({"params": flax_params(ref)}, m, z, msa_mask, pair_mask)
    assert_parity("ExtraMSAStack(2 blocks) z", got, want, mask=pair_mask)


def test_evoformer_block_gradients_match_torch_autograd():
    cfg = _block_cfg("evoformer")
    m, z, msa_mask, pair_mask = inputs(12, c_m=cfg["c_m"], c_z=cfg["c_z"])
    rng = np.random.default_rng(12)
    w_m = rng.normal(size=m.shape).astype(np.float32)
    w_z = rng.normal(size=z.shape).astype(np.float32)
    ref = randomize_(of_evo.EvoformerBlock(**cfg), 12)
    out_m, out_z = _run_torch_block(ref, m, z, msa_mask, pair_mask)
    loss = (out_m * to_torch(w_m)).sum() + (out_z * to_torch(w_z)).sum()
    loss.backward()
    want = state_dict_to_tree({k: p.grad for k, p in ref.named_parameters()})

    def f(params):
        om, oz = EvoformerBlock(**cfg).apply({"params": params}, m, z, msa_mask, pair_mask)
        return jnp.sum(om * w_m) + jnp.sum(oz * w_z)

    got = jax.grad(f)(flax_params(ref))
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert flat_got.keys() == flat_want.keys() and len(flat_got) == 93
    scale = max(float(np.abs(np.asarray(w)).max()) for w in flat_want.values())
    rows = []
    for k in flat_got:
        err, rel = rel_error(flat_got[k], flat_want[k])
        ref_max = float(np.abs(np.asarray(flat_want[k])).max())
        if ref_max <= 1e-6 * scale:
            # mathematically zero (layer_norm_z.bias: softmax ignores a per-row constant): both are noise
            assert err <= 1e-6 * scale, (jax.tree_util.keystr(k), err)
        else:
            rows.append((rel, jax.tree_util.keystr(k)))
    worst = max(rows)
    diff = math.sqrt(sum(float(np.sum((np.asarray(flat_got[k]) - np.asarray(flat_want[k])) ** 2)) for k in flat_got))
    norm = math.sqrt(sum(float(np.sum(np.asarray(flat_want[k]) ** 2)) for k in flat_want))
    print(f"EvoformerBlock grads: {len(rows)}/{len(flat_got)} params compared per param, worst rel "
          f"{worst[0]:.2e} ({worst[1]}); global |diff|/|ref| {diff / norm:.2e}")
    assert worst[0] <= 1e-4, worst
    assert diff / norm <= 1e-5


# ---------------------------------------------------------------------------------------------
# chunking and dropout


@pytest.fixture(scope="module")
def evo_stack():
    """Tiny EvoformerStack, perturbed params, inputs, and a jitted `run(chunk_size, deterministic, key)`."""
    cfg = tiny("evoformer")
    args = _stack_inputs(cfg, 13)
    mod = EvoformerStack(**cfg)
    params = jax.jit(mod.init)(jax.random.PRNGKey(0), *args)
    # default init zeroes output layers: perturb so every path contributes
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(chunk_size, deterministic, key):
        return mod.apply(params, *args, chunk_size=chunk_size, deterministic=deterministic, rngs={"dropout": key})

    return mod, params, args, run


def test_chunked_evoformer_stack_equals_unchunked(evo_stack):
    *_, run = evo_stack
    key = jax.random.PRNGKey(0)
    full = run(None, True, key)
    for cs in (1, 3, 7):
        chunked = run(cs, True, key)
        for a, b in zip(chunked, full):
            err, rel = rel_error(a, b)
            print(f"chunk_size={cs}: max abs {err:.2e}, rel {rel:.2e}")
            assert rel <= 1e-6  # max |chunked - full| / max |full|


def test_dropout(evo_stack):
    *_, run = evo_stack
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    det1, det2 = run(None, True, k1), run(None, True, k2)
    for a, b in zip(det1, det2):
        np.testing.assert_array_equal(a, b)
    drop1, drop1b, drop2 = run(None, False, k1), run(None, False, k1), run(None, False, k2)
    for a, b, b2, c in zip(det1, drop1, drop1b, drop2):
        np.testing.assert_array_equal(b, b2)  # seeded: reproducible
        assert not np.allclose(a, b) and not np.allclose(b, c)


def stack_loss_grads(evo_stack, mdl, chunk_size=None, frozen_blocks=0):
    """(loss, (d loss / d params, d loss / d z)) of the stack's outputs' sum of squares."""
    _, params, args, _ = evo_stack

    def loss(p_, z):
        m, z, s = mdl.apply(p_, args[0], z, *args[2:], chunk_size=chunk_size, frozen_blocks=frozen_blocks)
        return jnp.sum(m ** 2) + jnp.sum(z ** 2) + jnp.sum(s ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, args[1])


@pytest.fixture(scope="module")
def remat_grads(evo_stack):
    """The plain remat step's loss and gradients: the reference of the training variants."""
    return stack_loss_grads(evo_stack, evo_stack[0].clone(remat=True))


def assert_same_grads(g1, g0) -> None:
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree_util.tree_leaves(g0)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_remat_gives_same_values_and_grads(evo_stack, remat_grads):
    l0, (g0, dz0) = stack_loss_grads(evo_stack, evo_stack[0])
    l1, (g1, dz1) = remat_grads
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert rel_error(dz1, dz0)[1] <= 1e-5
    assert_same_grads(g1, g0)


@pytest.mark.parametrize("n_seq", [1, N_SEQ])
def test_remat_gives_same_input_grads_with_frozen_params(evo_stack, n_seq):
    """With the params not differentiated (a frozen trunk, as under LoRA) the remat'd scan's
    gradients w.r.t. the inputs m and z equal the unremat'd ones, for a single-sequence MSA (a
    chain read from a structure file) too: the train step's case under LoRA, which the test
    above, differentiating the params as well, does not cover."""
    mod, params, _, _ = evo_stack
    m, z, msa_mask, pair_mask = inputs(21, n_seq=n_seq, c_m=mod.c_m, c_z=mod.c_z)
    msa_mask = msa_mask if n_seq > 1 else np.ones_like(msa_mask) * pair_mask[0]  # the one sequence is real

    def input_grads(mdl):
        def loss(m, z):
            m, z, s = mdl.apply(params, m, z, msa_mask, pair_mask)
            return jnp.sum(m ** 2) + jnp.sum(z ** 2) + jnp.sum(s ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(m, z)

    for got, want in zip(input_grads(mod.clone(remat=True)), input_grads(mod)):
        assert rel_error(got, want)[1] <= 1e-5


@pytest.mark.parametrize("variant", ["chunk_size=3", "dots_saveable", "frozen_blocks=1"])
def test_training_variants_give_the_same_grads(evo_stack, remat_grads, variant):
    """Training with chunking (lax.map under remat), a remat policy that saves matmul outputs,
    or the first block run forward-only: the gradients w.r.t. the params (of the trained
    blocks) and the input z equal the plain remat step's."""
    mod = evo_stack[0].clone(remat=True)
    chunk, frozen = (3 if variant == "chunk_size=3" else None), (1 if variant == "frozen_blocks=1" else 0)
    other = mod.clone(remat_policy=jax.checkpoint_policies.dots_saveable) if variant == "dots_saveable" else mod
    _, (g0, dz0) = remat_grads
    _, (g1, dz1) = stack_loss_grads(evo_stack, other, chunk, frozen)
    if frozen:  # block 0 gets no gradient, nor does z (it enters below the trained block)
        assert all(float(jnp.abs(g[:frozen]).max()) == 0 for g in jax.tree_util.tree_leaves(g1["params"]["blocks"]))
        assert float(jnp.abs(dz1).max()) == 0
        g0 = {**g0, "params": {**g0["params"], "blocks": jax.tree_util.tree_map(lambda g: g[frozen:],
                                                                             g0["params"]["blocks"])}}
        g1["params"]["blocks"] = jax.tree_util.tree_map(lambda g: g[frozen:], g1["params"]["blocks"])
    else:
        assert rel_error(dz1, dz0)[1] <= 1e-5
    assert_same_grads(g1, g0)


def test_bfloat16_compute_keeps_carry_types_and_is_close(evo_stack):
    mod, params, args, run = evo_stack
    ref = run(None, True, jax.random.PRNGKey(0))
    b16 = mod.clone(dtype=jnp.bfloat16)
    for in_dtype in (jnp.float32, jnp.bfloat16):  # m, z carried in their own dtype through the scan
        m, z = (a.astype(in_dtype) for a in args[:2])
        out = jax.jit(b16.apply)(params, m, z, *args[2:])
        assert out[0].dtype == out[1].dtype == in_dtype
        for a, b in zip(out, ref):
            assert rel_error(np.asarray(a, np.float32), b)[1] <= 3e-2


# ---------------------------------------------------------------------------------------------
# parameter counts at full size (eval_shape: no computation)


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def full_shapes(mod, *args):
    return jax.eval_shape(lambda *a: mod.init(jax.random.PRNGKey(0), *a), *args)["params"]


def _abstract(*shapes):
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def test_parameter_counts_full_size():
    c = model_config("model_1_ptm").model
    ev, ex, tp = c.evoformer_stack, c.extra_msa.extra_msa_stack, c.template.template_pair_stack
    n, s = 8, 4
    g = model_config("model_1_ptm").globals
    evo = full_shapes(EvoformerStack.from_config(ev, g), *_abstract((s, n, ev.c_m), (n, n, ev.c_z), (s, n), (n, n)))
    extra = full_shapes(ExtraMSAStack.from_config(ex, g), *_abstract((s, n, ex.c_m), (n, n, ex.c_z), (s, n), (n, n)))
    templ = full_shapes(TemplatePairStack.from_config(tp, g), *_abstract((2, n, n, tp.c_t), (1, n, n)))
    block_cfg = {k: ev[k] for k in BLOCK_KEYS}
    block = full_shapes(EvoformerBlock(**block_cfg), *_abstract((s, n, ev.c_m), (n, n, ev.c_z), (s, n), (n, n)))
    assert n_params(evo) == 87_936_384
    assert n_params(extra) == 2_805_248
    assert n_params(templ) == 218_368
    assert n_params(block) == 1_829_952
    assert jax.tree_util.tree_leaves(evo["blocks"])[0].shape[0] == 48
    # OpenFold's own counts (the small modules: cheap to build)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert count(of_evo.EvoformerBlock(**block_cfg)) == 1_829_952
    assert count(of_evo.ExtraMSAStack(**ex.to_dict(), ckpt=False)) == 2_805_248
    from openfold.model.template import TemplatePairStack as OFTemplatePairStack
    assert count(OFTemplatePairStack(**tp.to_dict(), blocks_per_ckpt=None)) == 218_368


@pytest.mark.slow
def test_openfold_full_evoformer_stack_count():
    ev = model_config("model_1_ptm").model.evoformer_stack
    ref = of_evo.EvoformerStack(**ev.to_dict(), blocks_per_ckpt=None)
    assert sum(p.numel() for p in ref.parameters()) == 87_936_384
