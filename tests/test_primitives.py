"""Primitives vs OpenFold: Linear/LayerNorm/Attention/GlobalAttention; chunking; converter table."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfun_jax.model.primitives import (Attention, GlobalAttention, LayerNorm, Linear, LinearWeights,
                                        broadcast_leading, chunk_layer, dense, relu_keeping_mask)
from convert.torch_to_flax import state_dict_to_tree
from tests.reference import assert_parity, flax_params, padded_mask, randomize_, to_torch, torch

from openfold.model import primitives as of  # noqa: E402


def test_linear_and_layernorm_match_openfold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 7)).astype(np.float32)
    lin = randomize_(of.Linear(7, 11))
    ours = Linear(11).apply({"params": flax_params(lin)}, x)
    assert_parity("Linear", ours, lin(to_torch(x)))
    ln = randomize_(of.LayerNorm(7))
    assert_parity("LayerNorm", LayerNorm().apply({"params": flax_params(ln)}, x), ln(to_torch(x)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_keeping_mask_equals_relu_values_and_gradient(dtype):
    """relu_keeping_mask is jax.nn.relu forward and backward (zero gradient at 0, as relu), on 12
    channels (not a whole number of bytes of mask), with zeros, negatives and positives."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3, 12)), dtype).at[0, 0, :4].set(0)
    ct = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), dtype)
    np.testing.assert_array_equal(relu_keeping_mask(x), jax.nn.relu(x))
    got, want = (jax.grad(lambda x: jnp.sum((f(x) * ct).astype(jnp.float32)))(x) for f in (relu_keeping_mask, jax.nn.relu))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, jnp.where(x > 0, ct, 0))  # by hand
    assert int(jnp.sum(x == 0)) >= 4 and int(jnp.sum(x < 0)) > 10


def test_layernorm_gradients_match_openfolds_autograd():
    """LayerNorm's gradients for x, scale and bias (its own backward, `layer_norm`) are torch
    autograd's of OpenFold's LayerNorm (a bf16 x: its gradient in bf16, within bf16's rounding);
    with scale and bias frozen (not differentiated, as in a LoRA step), x's gradient is the same,
    also under jit and vmap; with x not differentiated (a head on a frozen trunk), so are theirs."""
    rng = np.random.default_rng(1)
    x = (3 * rng.normal(size=(3, 5, 7)) + 1).astype(np.float32)
    ct = rng.normal(size=x.shape).astype(np.float32)
    ln = randomize_(of.LayerNorm(7))
    xt = to_torch(x).requires_grad_()
    (ln(xt) * to_torch(ct)).sum().backward()
    want = {"x": xt.grad, "scale": ln.weight.grad, "bias": ln.bias.grad}
    params = flax_params(ln)
    for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        def loss(p, x):
            return jnp.sum(LayerNorm().apply({"params": p}, x).astype(jnp.float32) * ct)
        gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x, dtype))
        assert gx.dtype == dtype
        assert_parity(f"LayerNorm dx ({jnp.dtype(dtype).name})", gx.astype(jnp.float32), want["x"], rtol)
        assert_parity(f"LayerNorm dscale ({jnp.dtype(dtype).name})", gp["scale"], want["scale"], rtol)
        assert_parity(f"LayerNorm dbias ({jnp.dtype(dtype).name})", gp["bias"], want["bias"], rtol)
        gp_only = jax.grad(loss)(params, jnp.asarray(x, dtype))
        assert_parity(f"LayerNorm dscale, x frozen ({jnp.dtype(dtype).name})", gp_only["scale"], want["scale"], rtol)
        assert_parity(f"LayerNorm dbias, x frozen ({jnp.dtype(dtype).name})", gp_only["bias"], want["bias"], rtol)
        one = lambda x_i, ct_i: jnp.sum(LayerNorm().apply({"params": params}, x_i).astype(jnp.float32) * ct_i)
        gx_frozen = jax.jit(jax.vmap(jax.grad(one)))(jnp.asarray(x, dtype), ct)  # per leading index
        assert_parity(f"LayerNorm dx, frozen ({jnp.dtype(dtype).name})", gx_frozen.astype(jnp.float32), want["x"], rtol)


def test_channel_first_linear_equals_the_openfold_checked_last_axis_one():
    """Linear(out_axis=-3) (the triangle updates' channel-first projections) equals the
    last-axis Linear (checked against OpenFold above) with the feature axis moved, LoRA adapter
    and bias included; LinearWeights creates Linear's params, same names and inits."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 5, 7)).astype(np.float32)  # [*, I, J, C]
    params = {"kernel": rng.normal(size=(7, 11)).astype(np.float32), "bias": rng.normal(size=(11,)).astype(np.float32)}
    lora = {"a": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.normal(size=(3, 11)).astype(np.float32),
            "scale": np.float32(0.5)}
    v = {"params": params, "lora": lora}
    last = Linear(11).apply(v, x)  # [*, I, J, 11]
    first = Linear(11, out_axis=-3).apply(v, x)  # [*, 11, I, J]
    np.testing.assert_allclose(first, np.moveaxis(np.asarray(last), -1, -3), rtol=1e-5, atol=1e-5)
    for init in ("default", "gating", "final"):
        key = jax.random.PRNGKey(4)
        # nn.Module.init: the Linear field `init` (the initialiser's name) shadows the method
        want = nn.Module.init(Linear(11, init=init), key, x)["params"]
        got = nn.Module.init(LinearWeights(11, init=init), key, 7)["params"]
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_channel_first_linear_gradients_equal_autodiffs_of_the_last_axis_one():
    """The channel-first projection's own backward (kernel dy, one transpose) gives the
    gradients jax.grad gives the last-axis Linear: for x, the kernel, the bias and the LoRA
    adapter, per example under vmap as the train step runs it, and for x alone with frozen weights."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 4, 5, 7)).astype(np.float32)  # [B, I, J, C]
    ct = rng.normal(size=(2, 11, 4, 5)).astype(np.float32)  # [B, 11, I, J]
    v = {"params": {"kernel": rng.normal(size=(7, 11)).astype(np.float32),
                    "bias": rng.normal(size=(11,)).astype(np.float32)},
         "lora": {"a": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.normal(size=(3, 11)).astype(np.float32),
                  "scale": np.float32(0.5)}}

    def loss(out_axis, v, x):
        y = jax.vmap(lambda xi: Linear(11, out_axis=out_axis).apply(v, xi))(x)  # [B, I, J, 11] | [B, 11, I, J]
        return jnp.sum(jnp.tanh(y if out_axis == -3 else jnp.moveaxis(y, -1, -3)) * ct)

    want = jax.grad(functools.partial(loss, -1), (0, 1))(v, x)
    got = jax.grad(functools.partial(loss, -3), (0, 1))(v, x)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)
    want_x = jax.grad(functools.partial(loss, -1, v))(x)
    np.testing.assert_allclose(jax.grad(functools.partial(loss, -3, v))(x), want_x, rtol=1e-5, atol=1e-5)
    assert float(np.abs(want[0]["params"]["kernel"]).max()) > 0.1  # a non-trivial gradient was compared


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot placement")
def test_channel_first_projection_is_a_dot_contracting_the_kernels_last_axis():
    """The triangle updates' channel-first projection (x [N, N, C_z] -> [4 C, N, N]) compiles to a
    dot whose lhs contracts its last axis: XLA:CPU runs that as a library GEMM (YNNPACK), but a dot
    contracting the kernel's leading axis, which XLA folds `kernel.T` back into unless a barrier
    stops it, on Eigen's transposed-lhs path, 2.6x slower at this shape."""
    x = jnp.zeros((64, 64, 128), jnp.float32)
    kernel = jnp.zeros((128, 512), jnp.float32)
    for fn in (lambda k, x: dense(x, k, out_axis=-3),  # forward, and the frozen-kernel backward
               lambda k, x: jax.grad(lambda x: jnp.sum(dense(x, k, out_axis=-3) ** 2))(x)):
        hlo = jax.jit(fn).lower(kernel, x).compile().as_text()
        shapes = dict(re.findall(r"%([\w.\-]+) = f32\[([\d,]*)\]", hlo))
        dots = re.findall(r"= f32\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*?lhs_contracting_dims=\{(\d+)\}", hlo)
        projections = [(out, shapes[lhs], int(c)) for out, lhs, c in dots if out in ("512,4096", "128,4096")]
        assert projections, hlo
        for out, lhs, c in projections:
            assert c == lhs.count(","), f"dot -> [{out}] contracts axis {c} of its lhs [{lhs}]"


def test_lora_linear_equals_autodiff_of_the_unfolded_update():
    """A LoRA Linear folds scale * a @ b into the kernel its matmul uses and has its own backward
    (`lora_dense`): its output and the gradients of x, kernel, bias, a, b and scale equal those of
    x @ kernel + scale * (x @ a) @ b + bias written out and differentiated by jax.grad, per example
    under vmap as the train step runs it; with the kernel and bias frozen (LoRA's case) too."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 4, 5, 7)).astype(np.float32)  # [B, I, J, C]
    ct = rng.normal(size=(2, 4, 5, 11)).astype(np.float32)  # [B, I, J, 11]
    params = {"kernel": rng.normal(size=(7, 11)).astype(np.float32), "bias": rng.normal(size=(11,)).astype(np.float32)}
    lora = {"a": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.normal(size=(3, 11)).astype(np.float32),
            "scale": np.float32(0.7)}

    def ours(params, lora, x):
        return jax.vmap(lambda xi: Linear(11).apply({"params": params, "lora": lora}, xi))(x)

    def unfolded(params, lora, x):
        return x @ params["kernel"] + lora["scale"] * ((x @ lora["a"]) @ lora["b"]) + params["bias"]

    np.testing.assert_allclose(ours(params, lora, x), unfolded(params, lora, x), rtol=1e-5, atol=1e-5)
    for argnums in ((0, 1, 2), (1, 2)):  # everything trained; kernel and bias frozen
        got, want = (jax.grad(lambda *v: jnp.sum(jnp.tanh(f(*v)) * ct), argnums)(params, lora, x)
                     for f in (ours, unfolded))
        jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)
    assert float(np.abs(want[0]["b"]).max()) > 0.1 and float(np.abs(want[0]["scale"])) > 0.1  # non-trivial


@pytest.mark.parametrize("gating", [True, False])
def test_attention_matches_openfold_with_masks_and_pair_bias(gating):
    rng = np.random.default_rng(1)
    s, n, c, h, ch = 4, 9, 12, 3, 5
    x = rng.normal(size=(s, n, c)).astype(np.float32)
    mask = padded_mask((s, n), 6)
    mask_bias = (1e9 * (mask - 1))[:, None, None, :]          # [S, 1, 1, N]
    pair_bias = rng.normal(size=(1, h, n, n)).astype(np.float32)  # [1, H, N, N]
    ref = randomize_(of.Attention(c, c, c, ch, h, gating=gating))
    want = ref(to_torch(x), to_torch(x), biases=[to_torch(mask_bias), to_torch(pair_bias)])
    mod = Attention(ch, h, gating=gating)
    got = mod.apply({"params": flax_params(ref)}, x, x, [mask_bias, pair_bias])
    assert_parity(f"Attention(gating={gating})", got, want)


def test_attention_gradients_match_openfolds_autograd():
    """Attention's gradients for its inputs, both biases and every param are torch autograd's of
    OpenFold's Attention, with masked keys (the closed-form softmax derivative's zero rows)."""
    rng = np.random.default_rng(7)
    s, n, c, h, ch = 3, 9, 12, 3, 5
    x = rng.normal(size=(s, n, c)).astype(np.float32)
    mask_bias = (1e9 * (padded_mask((s, n), 6) - 1))[:, None, None, :]  # [S, 1, 1, N]
    pair_bias = rng.normal(size=(1, h, n, n)).astype(np.float32)  # [1, H, N, N]
    ct = rng.normal(size=(s, n, c)).astype(np.float32)
    ref = randomize_(of.Attention(c, c, c, ch, h, gating=True), 7)
    xt, bt = to_torch(x).requires_grad_(), to_torch(pair_bias).requires_grad_()
    (ref(xt, xt, biases=[to_torch(mask_bias), bt]) * to_torch(ct)).sum().backward()

    def loss(p, x, b):
        return jnp.sum(Attention(ch, h).apply({"params": p}, x, x, [mask_bias, b]) * ct)

    gp, gx, gb = jax.grad(loss, argnums=(0, 1, 2))(flax_params(ref), x, pair_bias)
    assert_parity("Attention dx", gx, xt.grad)
    assert_parity("Attention dpair_bias", gb, bt.grad)
    want = dict(jax.tree_util.tree_flatten_with_path(
        state_dict_to_tree({k: p.grad for k, p in ref.named_parameters()}))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(gp)[0])
    assert got.keys() == want.keys() and len(got) == 7  # q, k, v, g, o kernels; g, o biases
    for path, g in got.items():
        assert_parity(f"Attention d{jax.tree_util.keystr(path)}", g, want[path])
    assert float(np.abs(np.asarray(gb)[..., 6:]).max()) == 0.0  # masked keys get no gradient


def test_chunked_attention_equals_unchunked():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 7, 9, 16)).astype(np.float32)  # two batch axes
    bias = rng.normal(size=(1, 1, 4, 9, 9)).astype(np.float32)
    mod = Attention(4, 4)
    params = mod.init(jax.random.PRNGKey(0), x, x, [bias])
    # non-zero output projection so the comparison is meaningful
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    full = mod.apply(params, x, x, [bias])
    for cs in (1, 3, 5, 14):
        chunked = mod.apply(params, x, x, [bias], chunk_size=cs)
        np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(full))) > 1e-2


def test_chunked_attention_gradients_equal_unchunked():
    """Training with chunking (the pair bias shared by every chunk, its gradient summed over the
    chunks and over each chunk's rows) gives the unchunked gradients for x and the pair bias."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 9, 16)).astype(np.float32)  # [S, N, C]
    bias = rng.normal(size=(1, 4, 9, 9)).astype(np.float32)  # [1, H, N, N]
    ct = rng.normal(size=(7, 9, 16)).astype(np.float32)
    mod = Attention(4, 4)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, mod.init(jax.random.PRNGKey(0), x, x, [bias]))
    grad = lambda cs: jax.grad(lambda x, b: jnp.sum(mod.apply(params, x, x, [b], chunk_size=cs) * ct), (0, 1))(x, bias)
    full = grad(None)
    for cs in (2, 3):
        for got, want in zip(grad(cs), full):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(np.abs(full[1]).max()) > 1e-2  # a non-trivial bias gradient


@pytest.mark.parametrize("lead", [(3,), (1, 5), (2, 3)])
def test_broadcast_leading_values_and_gradient(lead):
    """broadcast_leading is jnp.broadcast_to; its gradient is the cotangent summed over the leading
    axes (numpy, float64)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 6, 6)).astype(np.float32)
    ct = rng.normal(size=lead + x.shape).astype(np.float32)
    np.testing.assert_array_equal(broadcast_leading(jnp.asarray(x), lead), np.broadcast_to(x, lead + x.shape))
    got = jax.grad(lambda x: jnp.sum(broadcast_leading(x, lead) * ct))(x)
    want = ct.astype(np.float64).sum(axis=tuple(range(len(lead))))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's reduce placement")
def test_pair_bias_gradient_is_a_dot_not_a_reduce_over_rows():
    """The gradient of a triangle-attention bias [H, N, N], shared by the N query rows, compiles to
    a dot: a reduce over the logits' row axis runs on XLA:CPU as a YNNPACK reduce, which slows
    sharply past N=64 (timings in `broadcast_leading`'s docstring)."""
    n, h = 32, 4
    x = jnp.zeros((n, n, 8), jnp.float32)
    bias = jnp.zeros((1, h, n, n), jnp.float32)
    mod = Attention(2, h)
    params = mod.init(jax.random.PRNGKey(0), x, x, [bias])
    fn = jax.grad(lambda b: jnp.sum(mod.apply(params, x, x, [b]) ** 2))
    hlo = jax.jit(fn).lower(bias).compile().as_text()
    reduces = re.findall(r"= f32\[([\d,]*)\]\S* reduce\(%[\w.\-]+, %[\w.\-]+\), dimensions=\{([\d,]*)\}", hlo)
    assert reduces, hlo  # the softmax's own reductions are there
    rows = [(out, dims) for out, dims in reduces if out.endswith(f"{h},{n},{n}")]
    assert not rows, f"the bias gradient [{h}, {n}, {n}] is a reduce: {rows}"
    assert re.search(rf"= f32\[1,{h * n * n}\]\S* dot\(", hlo), hlo


def test_chunk_layer_passes_shared_args_whole():
    a = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
    b = jnp.ones((1, 3)) * 2.0
    out = chunk_layer(lambda x, y: x * y, [a, b], chunk_size=2, no_batch_dims=1)
    np.testing.assert_array_equal(out, a * 2.0)


def test_global_attention_matches_openfold():
    rng = np.random.default_rng(3)
    n_res, n_seq, c, h, ch = 6, 5, 10, 2, 4
    m = rng.normal(size=(n_res, n_seq, c)).astype(np.float32)
    mask = padded_mask((n_res, n_seq), 3)
    ref = randomize_(of.GlobalAttention(c, ch, h, inf=1e9, eps=1e-10))
    want = ref(to_torch(m), to_torch(mask))
    got = GlobalAttention(ch, h, inf=1e9, eps=1e-10).apply({"params": flax_params(ref)}, m, mask)
    assert_parity("GlobalAttention", got, want)
