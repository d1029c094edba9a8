"""Primitives shared by every module: Linear (AlphaFold inits, optional LoRA), LayerNorm,
Attention and GlobalAttention (AF2 Suppl. 1.11.4 inits; Algorithms 7, 13, 19), chunking.

Param names follow OpenFold's state dict: Linear -> `kernel` [in, out] (`weight` transposed) and
`bias`; LayerNorm -> `scale` (`weight`) and `bias`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from molfun_jax.config import LAYER_NORM_STATISTICS, RELU_MASK
from molfun_jax.lora import delta

Array = jax.Array

# OpenFold's init names -> Flax initialisers. variance_scaling('truncated_normal') uses the same
# [-2, 2] truncation and std correction as OpenFold's trunc_normal_init_.
_KERNEL_INITS: dict[str, Callable] = {
    "default": nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
    "relu": nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
    "glorot": nn.initializers.xavier_uniform(),
    "gating": nn.initializers.zeros,
    "normal": nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
    "final": nn.initializers.zeros,
}


def compute_dtype(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' -> dtype (config.globals.dtype)."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Linear(nn.Module):
    """Dense layer with AlphaFold's initialisers (`init` as in OpenFold's Linear).

    When the `lora` collection holds `{a: [in, r], b: [r, out], scale: []}` for this layer, the
    low-rank update `scale * (x @ a) @ b` is added (docs/architecture.md); the base kernel param is
    untouched. The update is folded into the kernel the matmul uses (`lora_dense`), as `lora.merge`
    folds it for export. An optional `dropout: []` leaf (the LoRA dropout rate) drops elements of
    the adapter's input x when the apply has a 'dropout' RNG; the update is then added apart.

    `out_axis`: where the output features go (counted from the end; default the last). A
    channel-first pair layout (`out_axis=-3`: [*, C, N_res, N_res]) lets a triangle update
    contract residues without transposing each projection (see `dense`).
    """
    features: int
    use_bias: bool = True
    init: str = "default"
    dtype: jnp.dtype = jnp.float32
    out_axis: int = -1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [*, in] -> [*, features] (out_axis=-3: x [*, A, B, in] -> [*, features, A, B])
        kernel, bias = _linear_params(self, x.shape[-1])
        x = x.astype(self.dtype)
        lora = self.has_variable("lora", "a")
        # LoRA dropout on the adapter's input, active only when a 'dropout' RNG is given
        lora_dropout = lora and self.has_variable("lora", "dropout") and self.has_rng("dropout")
        if lora and not lora_dropout:
            adapter = {k: self.get_variable("lora", k) for k in ("a", "b", "scale")}
            y = jnp.moveaxis(lora_dense(x, kernel, adapter), -1, self.out_axis)  # [*, features] at out_axis
        else:
            y = dense(x, kernel.astype(self.dtype), self.out_axis)
        if lora_dropout:
            a, b = (self.get_variable("lora", k).astype(self.dtype) for k in ("a", "b"))
            rate = self.get_variable("lora", "dropout")
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
            x_lora = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
            y = y + self.get_variable("lora", "scale").astype(self.dtype) * dense(x_lora @ a, b, self.out_axis)
        if bias is not None:
            bias = bias.astype(self.dtype)
            y = y + bias.reshape(bias.shape + (1,) * (-1 - self.out_axis))
        return y


def _folded_kernel(kernel: Array, adapter: dict[str, Array], dtype: jnp.dtype) -> Array:
    """kernel + scale * a @ b (`lora.delta`, in float32), cast to the matmul's dtype: [in, out]."""
    return (kernel + delta(adapter)).astype(dtype)


@jax.custom_vjp
def lora_dense(x: Array, kernel: Array, adapter: dict[str, Array]) -> Array:
    """x [*, in] @ (kernel + scale * a @ b) -> [*, out]: a Linear with its LoRA adapter
    `{a: [in, r], b: [r, out], scale: []}` folded into the kernel (`_folded_kernel`; the matmul in
    x's dtype). Equal to x @ kernel + scale * (x @ a) @ b up to rounding, and exactly x @ kernel
    while b is zero; one matmul instead of three."""
    return jnp.matmul(x, _folded_kernel(kernel, adapter, x.dtype))


def _lora_dense_fwd(x, kernel, adapter) -> tuple[Array, tuple]:
    # `x`, `kernel`, `adapter`: CustomVJPPrimal (symbolic_zeros); as in `dense`, a trailing () in
    # the residuals asks the backward for the (frozen, usually) kernel's gradient
    adapter = {k: p.value for k, p in adapter.items()}
    x, w = x.value, _folded_kernel(kernel.value, adapter, x.value.dtype)  # [*, in], [in, out]
    res = (x, w, adapter["a"], adapter["b"], adapter["scale"]) + (((),) if kernel.perturbed else ())
    return jnp.matmul(x, w), res


def _lora_dense_bwd(res: tuple, dy: Array) -> tuple[Array, Optional[Array], dict[str, Array]]:
    """Autodiff's gradients of x @ kernel + scale * (x @ a) @ b, with the adapter's as [r, P] @ [P, *]
    matmuls over the P positions: autodiff contracts P on the major axis of both operands, which
    XLA:CPU runs in its own emitter at ~10 GFLOP/s (0.8 ms where this takes 0.2, N=64)."""
    x, w, a, b, scale, *trained = res  # [*, in], [in, out] (folded), [in, r], [r, out], []
    f32 = jnp.float32
    xf, dyf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [P, in], [P, out]
    u = jnp.matmul(xf, a.astype(x.dtype))  # [P, r]
    du = jax.lax.dot_general(dyf, b.astype(dy.dtype), (((1,), (1,)), ((), ())))  # [P, r]
    da = scale * jnp.matmul(du.T, xf, preferred_element_type=f32).T  # [in, r]
    db = scale * jnp.matmul(u.T, dyf, preferred_element_type=f32)  # [r, out]
    dscale = jnp.sum(du.astype(f32) * u.astype(f32))  # []
    dkernel = jnp.matmul(xf.T, dyf, preferred_element_type=f32) if trained else None  # [in, out]
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))  # [*, in]
    return dx, dkernel, {"a": da.astype(a.dtype), "b": db.astype(b.dtype), "scale": dscale.astype(scale.dtype)}


lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd, symbolic_zeros=True)


def _linear_params(m: nn.Module, c_in: int) -> tuple[Array, Optional[Array]]:
    """The kernel [in, out] (AlphaFold's `init`) and bias (None without) of a Linear-like module."""
    kernel = m.param("kernel", _KERNEL_INITS[m.init], (c_in, m.features), jnp.float32)
    if not m.use_bias:
        return kernel, None
    bias_init = nn.initializers.ones if m.init == "gating" else nn.initializers.zeros
    return kernel, m.param("bias", bias_init, (m.features,), jnp.float32)


class LinearWeights(nn.Module):
    """The params of a `Linear` with the same name and fields, returned for a caller that
    contracts them itself (a projection fused into a larger einsum); no LoRA adapter."""
    features: int
    use_bias: bool = True
    init: str = "default"

    @nn.compact
    def __call__(self, c_in: int) -> tuple[Array, Optional[Array]]:
        # -> kernel [c_in, features], bias [features] | None
        return _linear_params(self, c_in)


def dense(x: Array, kernel: Array, out_axis: int = -1) -> Array:
    """x [*, in] @ kernel [in, out], with the output features at `out_axis`.

    `out_axis != -1` is computed as kernel^T x^T, whose output [out, *] is channel-first
    already; the move to `out_axis` is free when nothing precedes it. XLA then transposes x once
    for all projections of it, instead of transposing each output.
    """
    if out_axis == -1:
        return jnp.matmul(x, kernel)
    return jnp.moveaxis(_dense_channel_first(kernel, x), 0, out_axis)


@jax.custom_vjp
def _dense_channel_first(kernel: Array, x: Array) -> Array:
    """kernel^T x^T: x [*, in] @ kernel [in, out] with the output features first, [out, *].

    The kernel is transposed first, behind a barrier: XLA would fold the transpose into the dot,
    and XLA:CPU runs a dot contracting its lhs's leading axis on Eigen, 2.6x slower than the
    library GEMM it runs for kernel^T [out, in] (measured on [128, 512] x [4096, 128])."""
    kernel_t = jax.lax.optimization_barrier(kernel.T)  # [out, in]
    return jax.lax.dot_general(kernel_t, x, (((1,), (x.ndim - 1,)), ((), ())))  # [out, *]


def _dense_channel_first_fwd(kernel, x) -> tuple[Array, tuple]:
    # `kernel`, `x`: CustomVJPPrimal (symbolic_zeros); a frozen kernel is not perturbed, and the
    # residuals' structure (a trailing () or not) tells the backward whether to compute its dW
    res = (kernel.value, x.value) + (((),) if kernel.perturbed else ())
    return _dense_channel_first(kernel.value, x.value), res


def _dense_channel_first_bwd(res: tuple, dy: Array) -> tuple[Optional[Array], Array]:
    """Autodiff's gradients, with x's computed as kernel dy (channel-first, [in, *]) and
    transposed once. Autodiff's dy^T kernel^T makes XLA:CPU transpose dy inside the fused
    elementwise backward that produces it, a strided loop 5-7x slower than a plain transpose
    (a third of the triangle update's backward). No dW for a frozen kernel."""
    kernel, x, *trained = res  # [in, out], [*, in]
    dx_t = jax.lax.dot_general(kernel, dy, (((1,), (0,)), ((), ())))  # [in, *]
    batch = tuple(range(x.ndim - 1))
    dkernel = (jax.lax.dot_general(x, dy, ((batch, tuple(d + 1 for d in batch)), ((), ())))  # [in, out]
               if trained else None)
    return dkernel, jnp.moveaxis(dx_t, 0, -1)


_dense_channel_first.defvjp(_dense_channel_first_fwd, _dense_channel_first_bwd, symbolic_zeros=True)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, always computed in float32 (eps 1e-5 as OpenFold)."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return layer_norm(x, scale, bias, self.eps)


def _statistics(x: Array, eps: float) -> tuple[Array, Array]:
    """The mean and 1 / std of x over its last axis, in float32: [*, 1], [*, 1]."""
    xf = x.astype(jnp.float32)  # [*, C]
    mean = jnp.mean(xf, axis=-1, keepdims=True)  # [*, 1]
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)  # [*, 1]


def _standardized(x: Array, mean: Array, rstd: Array) -> Array:
    """x [*, C] standardised with its statistics [*, 1], in float32: [*, C]."""
    return (x.astype(jnp.float32) - mean) * rstd


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """x [*, C] standardised over C in float32, times `scale` plus `bias` (float32 [C]), in x's
    dtype; with its closed-form backward (`_layer_norm_bwd`)."""
    return (_standardized(x, *_statistics(x, eps)) * scale + bias).astype(x.dtype)  # [*, C]


def _layer_norm_fwd(x, scale, bias, eps) -> tuple[Array, tuple]:
    # `x`, `scale`, `bias`: CustomVJPPrimal (symbolic_zeros). In the residuals () marks an input
    # that needs a gradient and None one that does not (a frozen scale / bias gets no sum over
    # positions, an x outside the differentiated path no dx); a 0-d zero carries x's dtype. The
    # statistics are named for the remat policy: a rematerialised block keeps them (N_res^2 * 8
    # bytes a pair LayerNorm) and recomputes x_hat from x, without the two reductions
    mean, rstd = (checkpoint_name(t, LAYER_NORM_STATISTICS) for t in _statistics(x.value, eps))  # [*, 1], [*, 1]
    x_hat = _standardized(x.value, mean, rstd)  # [*, C]
    trained = tuple(() if p.perturbed else None for p in (x, scale, bias))
    res = (x_hat, rstd, scale.value, jnp.zeros((), x.value.dtype), trained)
    return (x_hat * scale.value + bias.value).astype(x.value.dtype), res


def _layer_norm_bwd(eps: float, res: tuple, dy: Array) -> tuple[Optional[Array], Optional[Array], Optional[Array]]:
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale, its two means over
    the channels as matmuls with a [C, 1] column of 1 / C (full float32 precision). Autodiff's
    backward puts both channel reductions in one fusion with the matmul that produces dy, which
    XLA:CPU runs at a third of the matmul's rate (a [64, 64, 128] pair after a [128, 128] matmul:
    1.7 ms, where this takes 0.9 and the matmul alone 0.65); 48-block LoRA step at N=64: 3 % faster."""
    x_hat, rstd, scale, zero, (x_trained, scale_trained, bias_trained) = res  # [*, C], [*, 1], [C], [], _
    dy = dy.astype(jnp.float32)  # [*, C]
    dx = None
    if x_trained is not None:
        col = jnp.full((dy.shape[-1], 1), 1.0 / dy.shape[-1], jnp.float32)  # [C, 1]
        mean = lambda t: jnp.matmul(t, col, precision=jax.lax.Precision.HIGHEST)  # [*, C] -> [*, 1]
        g = dy * scale  # [*, C]
        dx = (rstd * (g - mean(g) - x_hat * mean(g * x_hat))).astype(zero.dtype)  # [*, C]
    positions = tuple(range(dy.ndim - 1))
    dscale = None if scale_trained is None else jnp.sum(dy * x_hat, axis=positions)  # [C]
    dbias = None if bias_trained is None else jnp.sum(dy, axis=positions)  # [C]
    return dx, dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd, symbolic_zeros=True)


def runtime_chunk_size(module: nn.Module, chunk_size: Optional[int]) -> Optional[int]:
    """`chunk_size`, or None while `module` initialises: params are created unchunked (no
    lax.map at init)."""
    return None if module.is_initializing() else chunk_size


def chunk_layer(fn: Callable[..., Array], args: Sequence[Array], chunk_size: Optional[int],
                no_batch_dims: int) -> Array:
    """Apply a pure `fn(*args)` in chunks over the leading `no_batch_dims` axes (lax.map).

    Arguments whose batch axes are all 1 (broadcast, e.g. a pair bias shared by every MSA row)
    are passed whole; those with the full batch shape are split; those broadcast along only some
    batch axes (e.g. a triangle bias [T, 1, H, I, J] under a template axis) are gathered per
    chunk. Output equals `fn(*args)`.
    """
    batch_shape = tuple(jnp.broadcast_shapes(*(a.shape[:no_batch_dims] for a in args)))
    n = math.prod(batch_shape)
    if chunk_size is None or n <= chunk_size:
        return fn(*args)
    shared = [all(d == 1 for d in a.shape[:no_batch_dims]) for a in args]
    whole = [tuple(a.shape[:no_batch_dims]) == batch_shape for a in args]
    gathered = any(not (s or w) for s, w in zip(shared, whole))
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n

    def split(a: Array) -> Array:
        a = a.reshape((n,) + a.shape[no_batch_dims:])
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((n_chunks, chunk_size) + a.shape[1:])

    chunked = [split(a) for a, s, w in zip(args, shared, whole) if w and not s]
    if gathered:  # flat batch indices of each chunk (padding repeats index 0)
        chunked.append(split(jnp.arange(n)))

    def one(xs: Sequence[Array]) -> Array:
        it = iter(xs)
        pos = jnp.unravel_index(xs[-1], batch_shape) if gathered else None

        def pick(a: Array, s: bool, w: bool) -> Array:
            if s:
                return a.reshape(a.shape[no_batch_dims:])[None]
            if w:
                return next(it)
            return jnp.asarray(a)[tuple(p if d > 1 else 0 for p, d in zip(pos, a.shape[:no_batch_dims]))]

        return fn(*(pick(a, s, w) for a, s, w in zip(args, shared, whole)))

    # each chunk is recomputed in the backward pass: otherwise the map keeps every chunk's
    # intermediates for its gradient, and training would take the unchunked memory
    out = jax.lax.map(jax.checkpoint(one, prevent_cse=False), chunked)  # no CSE to prevent in a scan body
    out = out.reshape((n_chunks * chunk_size,) + out.shape[2:])[:n]
    return out.reshape(batch_shape + out.shape[1:])


@jax.custom_vjp
def relu_keeping_mask(x: Array) -> Array:
    """max(x, 0), jax.nn.relu's values and gradient, whose backward keeps only where x > 0, packed
    to bits and named `RELU_MASK` for the remat policy (config.remat_policy): a rematerialised
    block that saves it need not recompute x to back-propagate through the ReLU."""
    return jnp.maximum(x, 0)


def _relu_keeping_mask_fwd(x: Array) -> tuple[Array, Array]:
    # x: [*, C] -> bits [*, ceil(C / 8)] uint8
    return jnp.maximum(x, 0), checkpoint_name(jnp.packbits(x > 0, axis=-1), RELU_MASK)


def _relu_keeping_mask_bwd(bits: Array, dy: Array) -> tuple[Array]:
    keep = jnp.unpackbits(bits, axis=-1, count=dy.shape[-1]).astype(bool)  # [*, C]
    return (jnp.where(keep, dy, 0),)


relu_keeping_mask.defvjp(_relu_keeping_mask_fwd, _relu_keeping_mask_bwd)


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis, with the closed-form derivative y * (t - sum(y * t)).
    `jax.nn.softmax` (while `jax_softmax_custom_jvp` is off) differentiates exp / sum through the
    division, an elementwise backward about twice as long over the [*, H, Q, K] logits."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))  # [*, K]
    return e / jnp.sum(e, axis=-1, keepdims=True)  # [*, K]


@softmax.defjvp
def _softmax_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y = softmax(x)  # [*, K]
    return y, y * (t - jnp.sum(y * t, axis=-1, keepdims=True))  # [*, K]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_leading(x: Array, lead: tuple[int, ...]) -> Array:
    """x [*] broadcast to [*lead, *], whose backward sums the cotangent over `lead` as a matmul with
    a row of ones (full float32 precision). Autodiff's sum over leading axes runs on XLA:CPU as a
    YNNPACK reduce, which slows sharply past N=64: a triangle-attention bias's gradient, [N, H, N, N]
    summed over the first N, takes 0.4 ms at N=64, 47 ms at N=128 and 386 ms at N=256 (this: 0.3, 1
    and 9 ms; the 48-block LoRA step at N=128 is 10 % faster)."""
    return jnp.broadcast_to(x, lead + x.shape)


def _broadcast_leading_fwd(x: Array, lead: tuple[int, ...]) -> tuple[Array, None]:
    return broadcast_leading(x, lead), None


def _broadcast_leading_bwd(lead: tuple[int, ...], _: None, g: Array) -> tuple[Array]:
    n = math.prod(lead)
    ones = jnp.ones((1, n), g.dtype)  # [1, n]
    total = jnp.matmul(ones, g.reshape(n, -1), precision=jax.lax.Precision.HIGHEST)  # [1, prod(*)]
    return (total.reshape(g.shape[len(lead):]),)


broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def _bias_to(b: Array, shape: tuple[int, ...]) -> Array:
    """A bias b that only lacks leading axes of `shape` (size 1 there), as `broadcast_leading` to
    `shape`; any other b unchanged, for `+` to broadcast (e.g. a mask bias, never differentiated)."""
    k = next((i for i, d in enumerate(b.shape) if d != 1), b.ndim)  # b's leading ones
    if b.shape[k:] != shape[k:] or math.prod(shape[:k]) == 1:
        return b
    return broadcast_leading(b.reshape(b.shape[k:]), shape[:k])


def _attention_core(q: Array, k: Array, v: Array, *biases: Array) -> Array:
    """softmax(q k^T + sum(biases)) v with float32 logits/softmax. q: [*, H, Q, C]; k, v: [*, H, K, C]."""
    logits = jnp.einsum("...hqc,...hkc->...hqk", q, k, preferred_element_type=jnp.float32)
    for b in biases:
        logits = logits + _bias_to(b.astype(jnp.float32), logits.shape)
    a = softmax(logits).astype(v.dtype)
    return jnp.einsum("...hqk,...hkc->...hqc", a, v)


class Attention(nn.Module):
    """Multi-head attention with optional gating and additive biases (masks and pair bias)
    [Algorithms 7, 13, 14 core]. `c_hidden` is per head; output width equals q_x's."""
    c_hidden: int
    no_heads: int
    gating: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_x: Array, kv_x: Array, biases: Sequence[Array] = (),
                 chunk_size: Optional[int] = None) -> Array:
        # q_x: [*, Q, C_q], kv_x: [*, K, C_k], biases broadcast to [*, H, Q, K]
        h, c = self.no_heads, self.c_hidden
        lin = lambda name, init, bias=False: Linear(h * c, use_bias=bias, init=init, dtype=self.dtype, name=name)
        # [*, H, Q/K, C]
        q = jnp.swapaxes(lin("linear_q", "glorot")(q_x).reshape(q_x.shape[:-1] + (h, c)), -2, -3)
        k = jnp.swapaxes(lin("linear_k", "glorot")(kv_x).reshape(kv_x.shape[:-1] + (h, c)), -2, -3)
        v = jnp.swapaxes(lin("linear_v", "glorot")(kv_x).reshape(kv_x.shape[:-1] + (h, c)), -2, -3)
        q = q / math.sqrt(c)
        no_batch = q.ndim - 3
        biases = [b.reshape((1,) * (q.ndim - b.ndim) + b.shape) for b in biases]
        o = chunk_layer(_attention_core, [q, k, v, *biases], chunk_size, no_batch)
        o = jnp.swapaxes(o, -2, -3)  # [*, Q, H, C]
        if self.gating:
            g = jax.nn.sigmoid(lin("linear_g", "gating", True)(q_x))
            o = o * g.reshape(g.shape[:-1] + (h, c))
        o = o.reshape(o.shape[:-2] + (h * c,))
        return Linear(q_x.shape[-1], init="final", dtype=self.dtype, name="linear_o")(o)


class GlobalAttention(nn.Module):
    """Global column attention of the extra-MSA stack [Algorithm 19]: one query per column
    (mask-averaged), shared single-head keys/values."""
    c_hidden: int
    no_heads: int
    inf: float
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array, mask: Array) -> Array:
        # m: [*, N_res, N_seq, C_in], mask: [*, N_res, N_seq]
        h, c = self.no_heads, self.c_hidden
        mask = mask.astype(jnp.float32)
        # [*, N_res, C_in]
        q = jnp.sum(m.astype(jnp.float32) * mask[..., None], axis=-2) / (jnp.sum(mask, axis=-1)[..., None] + self.eps)
        q = Linear(h * c, use_bias=False, init="glorot", dtype=self.dtype, name="linear_q")(q) * (c ** -0.5)
        q = q.reshape(q.shape[:-1] + (h, c))  # [*, N_res, H, C]
        k = Linear(c, use_bias=False, init="glorot", dtype=self.dtype, name="linear_k")(m)  # [*, N_res, N_seq, C]
        v = Linear(c, use_bias=False, init="glorot", dtype=self.dtype, name="linear_v")(m)
        bias = (self.inf * (mask - 1))[..., None, :]  # [*, N_res, 1, N_seq]
        logits = jnp.einsum("...hc,...sc->...hs", q, k, preferred_element_type=jnp.float32) + bias
        a = softmax(logits).astype(v.dtype)
        o = jnp.einsum("...hs,...sc->...hc", a, v)  # [*, N_res, H, C]
        g = jax.nn.sigmoid(Linear(h * c, init="gating", dtype=self.dtype, name="linear_g")(m))
        o = o[..., None, :, :] * g.reshape(g.shape[:-1] + (h, c))  # [*, N_res, N_seq, H, C]
        o = o.reshape(o.shape[:-2] + (h * c,))
        return Linear(m.shape[-1], init="final", dtype=self.dtype, name="linear_o")(o)
