"""Structure module [Algorithm 20]: invariant point attention, backbone updates, torsion angles
and atom14 positions. Mirrors OpenFold v1.0 `openfold/model/structure_module.py`.

Geometry (rigid frames, points, attention over points, angles) is float32 whatever the compute
dtype; only the Linear layers run in `dtype`.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from molfun_jax.model.primitives import LayerNorm, Linear, softmax
from molfun_jax.utils.feats import frames_and_literature_positions_to_atom14_pos, torsion_angles_to_frames
from molfun_jax.utils.rigid_utils import Rigid

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
# softplus^-1(1): OpenFold's ipa_point_weights_init_
_SOFTPLUS_INV_1 = 0.541324854612918


class AngleResnetBlock(nn.Module):
    """Residual block of the angle resnet [Algorithm 20, lines 12-13]."""
    c_hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, a: Array) -> Array:
        # a: [*, C_hidden]
        x = Linear(self.c_hidden, init="relu", dtype=self.dtype, name="linear_1")(nn.relu(a))
        x = Linear(self.c_hidden, init="final", dtype=self.dtype, name="linear_2")(nn.relu(x))
        return x + a


class AngleResnet(nn.Module):
    """Torsion-angle prediction [Algorithm 20, lines 11-14] (with the input ReLUs of the
    AlphaFold source). Returns (unnormalized, normalized) angles [*, no_angles, 2], float32."""
    c_in: int
    c_hidden: int
    no_blocks: int
    no_angles: int
    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array, s_initial: Array) -> tuple[Array, Array]:
        # s, s_initial: [*, C_in]
        lin = lambda c, name: Linear(c, dtype=self.dtype, name=name)
        s_initial = lin(self.c_hidden, "linear_initial")(nn.relu(s_initial))
        s = lin(self.c_hidden, "linear_in")(nn.relu(s)) + s_initial
        for i in range(self.no_blocks):
            s = AngleResnetBlock(self.c_hidden, dtype=self.dtype, name=f"layers_{i}")(s)
        s = lin(self.no_angles * 2, "linear_out")(nn.relu(s)).astype(jnp.float32)
        unnormalized = s.reshape(s.shape[:-1] + (self.no_angles, 2))  # [*, no_angles, 2]
        norm = jnp.sqrt(jnp.maximum(jnp.sum(unnormalized ** 2, axis=-1, keepdims=True), self.epsilon))
        return unnormalized, unnormalized / norm


class InvariantPointAttention(nn.Module):
    """Invariant point attention [Algorithm 22]. Attention logits, softmax and all point
    arithmetic are float32; padded residues get OpenFold's `-inf` (mask bias `inf * (mask - 1)`)."""
    c_s: int
    c_z: int
    c_hidden: int
    no_heads: int
    no_qk_points: int
    no_v_points: int
    inf: float = 1e5
    eps: float = 1e-8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array, z: Array, r: Rigid, mask: Array) -> Array:
        # s: [*, N, C_s], z: [*, N, N, C_z], r: [*, N], mask: [*, N]
        h, c, pq, pv = self.no_heads, self.c_hidden, self.no_qk_points, self.no_v_points
        f32 = jnp.float32
        lin = lambda n, name, init="default": Linear(n, init=init, dtype=self.dtype, name=name)

        # [*, N, H, C_hidden]
        q = lin(h * c, "linear_q")(s).reshape(s.shape[:-1] + (h, c))
        kv = lin(2 * h * c, "linear_kv")(s).reshape(s.shape[:-1] + (h, 2 * c))
        k, v = kv[..., :c], kv[..., c:]

        def points(name: str, n: int) -> Array:
            """[*, N, H, n, 3] points generated in each residue's frame, in the global frame."""
            p = lin(h * n * 3, name)(s).astype(f32)
            p = jnp.stack(jnp.split(p, 3, axis=-1), axis=-1)  # [*, N, H * n, 3] (x, y, z blocks)
            p = r[..., None].apply(p)
            return p.reshape(p.shape[:-2] + (h, n, 3))

        q_pts = points("linear_q_points", pq)
        kv_pts = points("linear_kv_points", pq + pv)
        k_pts, v_pts = kv_pts[..., :pq, :], kv_pts[..., pq:, :]

        # [*, N, N, H]
        b = lin(h, "linear_b")(z).astype(f32)

        # [*, H, N, N]
        a = jnp.einsum("...qhc,...khc->...hqk", q, k, preferred_element_type=f32, precision=_HIGHEST)
        a = a * math.sqrt(1.0 / (3 * c)) + math.sqrt(1.0 / 3) * jnp.moveaxis(b, -1, -3)

        # [*, N, N, H, P_qk]
        pt_att = jnp.sum((q_pts[..., :, None, :, :, :] - k_pts[..., None, :, :, :, :]) ** 2, axis=-1)
        head_weights = jax.nn.softplus(
            self.param("head_weights", nn.initializers.constant(_SOFTPLUS_INV_1), (h,), f32))
        head_weights = head_weights * math.sqrt(1.0 / (3 * (pq * 9.0 / 2)))
        pt_att = jnp.sum(pt_att * head_weights[:, None], axis=-1) * (-0.5)  # [*, N, N, H]

        mask = mask.astype(f32)
        square_mask = self.inf * (mask[..., :, None] * mask[..., None, :] - 1)  # [*, N, N]
        a = a + jnp.moveaxis(pt_att, -1, -3) + square_mask[..., None, :, :]
        a = softmax(a)  # [*, H, N, N]

        # [*, N, H * C_hidden]
        o = jnp.einsum("...hqk,...khc->...qhc", a, v.astype(f32), precision=_HIGHEST)
        o = o.reshape(o.shape[:-2] + (h * c,))

        # [*, N, H, P_v, 3], back in each residue's local frame
        o_pt = jnp.einsum("...hqk,...khpx->...qhpx", a, v_pts, precision=_HIGHEST)
        o_pt = r[..., None, None].invert_apply(o_pt)
        o_pt_norm = jnp.sqrt(jnp.sum(o_pt ** 2, axis=-1) + self.eps)
        o_pt_norm = o_pt_norm.reshape(o_pt_norm.shape[:-2] + (h * pv,))  # [*, N, H * P_v]
        o_pt = o_pt.reshape(o_pt.shape[:-3] + (h * pv, 3))  # [*, N, H * P_v, 3]

        # [*, N, H * C_z]
        o_pair = jnp.einsum("...hqk,...qkc->...qhc", a, z.astype(f32), precision=_HIGHEST)
        o_pair = o_pair.reshape(o_pair.shape[:-2] + (h * self.c_z,))

        cat = jnp.concatenate([o, o_pt[..., 0], o_pt[..., 1], o_pt[..., 2], o_pt_norm, o_pair], axis=-1)
        return lin(self.c_s, "linear_out", "final")(cat.astype(self.dtype))


class BackboneUpdate(nn.Module):
    """Backbone update vector [Algorithm 23, line 1]: [*, N, 6] = quaternion (b, c, d), translation."""
    c_s: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array) -> Array:
        return Linear(6, init="final", dtype=self.dtype, name="linear")(s)


class StructureModuleTransitionLayer(nn.Module):
    """Residual 3-layer MLP of the single transition [Algorithm 20, line 8]."""
    c: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array) -> Array:
        x = nn.relu(Linear(self.c, init="relu", dtype=self.dtype, name="linear_1")(s))
        x = nn.relu(Linear(self.c, init="relu", dtype=self.dtype, name="linear_2")(x))
        return Linear(self.c, init="final", dtype=self.dtype, name="linear_3")(x) + s


class StructureModuleTransition(nn.Module):
    """Single transition with dropout and LayerNorm [Algorithm 20, lines 8-9]."""
    c: int
    num_layers: int
    dropout_rate: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array, deterministic: bool = True) -> Array:
        for i in range(self.num_layers):
            s = StructureModuleTransitionLayer(self.c, dtype=self.dtype, name=f"layers_{i}")(s)
        s = nn.Dropout(self.dropout_rate, name="dropout")(s, deterministic=deterministic)
        return LayerNorm(name="layer_norm")(s)


class StructureModule(nn.Module):
    """Structure module [Algorithm 20]: `no_blocks` iterations with shared weights (an `nn.scan`
    with broadcast params, so the param tree is OpenFold's unstacked one). Backbone frames are
    held as quaternions and their rotations are `stop_gradient`ed between iterations, as in
    OpenFold v1. Returns OpenFold's output dict: per-iteration `frames` [no_blocks, *, N, 7]
    (quaternion, translation in Å), `sidechain_frames` [no_blocks, *, N, 8, 4, 4],
    `unnormalized_angles` / `angles` [no_blocks, *, N, 7, 2], `positions` (atom14)
    [no_blocks, *, N, 14, 3], `states` [no_blocks, *, N, C_s]; and the final `single` [*, N, C_s].
    """
    c_s: int
    c_z: int
    c_ipa: int
    c_resnet: int
    no_heads_ipa: int
    no_qk_points: int
    no_v_points: int
    dropout_rate: float
    no_blocks: int
    no_transition_layers: int
    no_resnet_blocks: int
    no_angles: int
    trans_scale_factor: float
    epsilon: float
    inf: float
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.layer_norm_s = LayerNorm()
        self.layer_norm_z = LayerNorm()
        self.linear_in = Linear(self.c_s, dtype=self.dtype)
        self.ipa = InvariantPointAttention(self.c_s, self.c_z, self.c_ipa, self.no_heads_ipa, self.no_qk_points,
                                           self.no_v_points, inf=self.inf, eps=self.epsilon, dtype=self.dtype)
        self.ipa_dropout = nn.Dropout(self.dropout_rate)
        self.layer_norm_ipa = LayerNorm()
        self.transition = StructureModuleTransition(self.c_s, self.no_transition_layers, self.dropout_rate,
                                                    dtype=self.dtype)
        self.bb_update = BackboneUpdate(self.c_s, dtype=self.dtype)
        self.angle_resnet = AngleResnet(self.c_s, self.c_resnet, self.no_resnet_blocks, self.no_angles,
                                        self.epsilon, dtype=self.dtype)

    def block(self, s: Array, rigids: Rigid, s_initial: Array, z: Array, aatype: Array, mask: Array,
              deterministic: bool) -> tuple[Array, Rigid, dict[str, Array]]:
        """One iteration [Algorithm 20, lines 6-10, 23]; returns (s, rigids, this iteration's outputs)."""
        s_in = s
        s = s + self.ipa(s, z, rigids, mask)
        s = self.ipa_dropout(s, deterministic=deterministic)
        s = self.layer_norm_ipa(s)
        s = self.transition(s, deterministic=deterministic)

        rigids = rigids.compose_q_update_vec(self.bb_update(s).astype(jnp.float32))
        # rotation-matrix frames in Å for the all-atom construction (as AlphaFold)
        backb_to_global = Rigid(rigids.rots, rigids.trans).scale_translation(self.trans_scale_factor)

        unnormalized_angles, angles = self.angle_resnet(s, s_initial)  # [*, N, 7, 2]
        all_frames_to_global = torsion_angles_to_frames(backb_to_global, angles, aatype)  # [*, N, 8]
        pred_xyz = frames_and_literature_positions_to_atom14_pos(all_frames_to_global, aatype)

        preds = {
            "frames": rigids.scale_translation(self.trans_scale_factor).to_tensor_7(),
            "sidechain_frames": all_frames_to_global.to_tensor_4x4(),
            "unnormalized_angles": unnormalized_angles,
            "angles": angles,
            "positions": pred_xyz,
            "states": s,
        }
        return s.astype(s_in.dtype), rigids.stop_rot_gradient(), preds

    def __call__(self, s: Array, z: Array, aatype: Array, mask: Optional[Array] = None,
                 deterministic: bool = True) -> dict[str, Array]:
        # s: [*, N, C_s], z: [*, N, N, C_z], aatype: [*, N], mask: [*, N]
        mask = jnp.ones(s.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        s = self.layer_norm_s(s)
        z = self.layer_norm_z(z)
        s_initial = s
        s = self.linear_in(s)
        rigids = Rigid.identity(s.shape[:-1], fmt="quat")

        def body(mdl: "StructureModule", carry: tuple[Array, Rigid], _: None) -> tuple[tuple, dict]:
            s, rigids, preds = mdl.block(*carry, s_initial, z, aatype, mask, deterministic)
            return (s, rigids), preds

        # weights shared by all iterations (broadcast); fresh dropout masks per iteration
        blocks = nn.scan(body, variable_broadcast=["params", "lora"], variable_axes={},
                         split_rngs={"params": False, "dropout": True}, length=self.no_blocks)
        (s, _), outputs = blocks(self, (s, rigids), None)
        outputs["single"] = s
        return outputs
