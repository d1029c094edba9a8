"""Structure module, rigid utilities and frames -> atoms vs OpenFold (fp32, tiny widths, padded
masks, realistic aatype); param count at full size; gradients vs torch autograd."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfun_jax.config import model_config
from molfun_jax.model.structure_module import (AngleResnet, BackboneUpdate, InvariantPointAttention,
                                               StructureModule, StructureModuleTransition)
from molfun_jax.np import residue_constants as rc
from molfun_jax.utils import feats
from molfun_jax.utils.rigid_utils import Rigid
from tests.reference import assert_parity, flax_params, padded_mask, randomize_, to_torch, torch

from openfold.data import data_transforms as of_data  # noqa: E402
from openfold.model import structure_module as of  # noqa: E402
from openfold.utils import feats as of_feats  # noqa: E402
from openfold.utils.rigid_utils import Rigid as OFRigid, Rotation as OFRotation  # noqa: E402

N, N_VALID = 12, 9


def _sm_config(**overrides) -> dict:
    """model_config('tiny') structure-module hyperparameters (widths tiny, the rest real)."""
    c = model_config("tiny").model.structure_module.to_dict()
    c.update(overrides)
    return c


def _aatype(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """Random residue types (0..20, unknown included), zero-padded beyond N_VALID as the pipeline."""
    a = rng.integers(0, 21, size=(n,))
    a[N_VALID:] = 0
    return a.astype(np.int32)


def _random_rigid(rng: np.random.Generator, shape: tuple, scale: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(rotation matrices [*, 3, 3], translations [*, 3]) of random proper rigid transforms."""
    q = rng.normal(size=shape + (4,))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    rots = np.asarray(jax.jit(lambda x: Rigid.from_quats(x, jnp.zeros(x.shape[:-1] + (3,))).rots)(q))
    return rots.astype(np.float32), (scale * rng.normal(size=shape + (3,))).astype(np.float32)


def _of_rigid(rots: np.ndarray, trans: np.ndarray) -> OFRigid:
    return OFRigid(OFRotation(rot_mats=to_torch(rots)), to_torch(trans))


def assert_frames_parity(what: str, ours, ref, mask=None) -> None:
    """Frames as rotations and translations apart (a max over both mixes unitless rotation
    entries with Angstrom translations): 4x4 matrices [*, 4, 4] or tensor_7 [*, 7] (quaternion,
    translation)."""
    ours, ref = np.asarray(ours), ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    if ours.shape[-2:] == (4, 4):
        parts = {"rotation": lambda x: x[..., :3, :3], "translation": lambda x: x[..., :3, 3]}
    else:
        parts = {"quaternion": lambda x: x[..., :4], "translation": lambda x: x[..., 4:]}
    for name, part in parts.items():
        assert_parity(f"{what} {name}", part(ours), part(ref), mask=mask)


def test_rigid_ops_match_openfold():
    rng = np.random.default_rng(0)
    r1, t1 = _random_rigid(rng, (N,))
    r2, t2 = _random_rigid(rng, (N,))
    pts = rng.normal(size=(N, 3)).astype(np.float32) * 10
    a, b = Rigid(jnp.asarray(r1), jnp.asarray(t1)), Rigid(jnp.asarray(r2), jnp.asarray(t2))
    oa, ob = _of_rigid(r1, t1), _of_rigid(r2, t2)
    assert_frames_parity("Rigid.compose", a.compose(b).to_tensor_4x4(), oa.compose(ob).to_tensor_4x4())
    assert_parity("Rigid.apply", a.apply(pts), oa.apply(to_torch(pts)))
    assert_parity("Rigid.invert_apply", a.invert_apply(pts), oa.invert_apply(to_torch(pts)))
    assert_frames_parity("Rigid.invert", a.invert().to_tensor_4x4(), oa.invert().to_tensor_4x4())

    # quaternion frames: identity, then two backbone updates (OpenFold's compose_q_update_vec)
    upd = rng.normal(size=(2, N, 6)).astype(np.float32)
    ours, ref = Rigid.identity((N,)), OFRigid.identity((N,), fmt="quat")
    for u in upd:
        ours, ref = ours.compose_q_update_vec(jnp.asarray(u)), ref.compose_q_update_vec(to_torch(u))
    assert_frames_parity("Rigid.compose_q_update_vec (to_tensor_7)", ours.scale_translation(10.0).to_tensor_7(),
                         ref.scale_translation(10.0).to_tensor_7())
    assert_parity("Rigid quaternion -> rotation", ours.rots, ref.get_rots().get_rot_mats())

    # frames from N, CA, C of (noisy) ideal backbones
    n_xyz, ca_xyz, c_xyz = (rng.normal(size=(N, 3)).astype(np.float32) * 3 for _ in range(3))
    ours = Rigid.make_transform_from_reference(jnp.asarray(n_xyz), jnp.asarray(ca_xyz), jnp.asarray(c_xyz))
    ref = OFRigid.make_transform_from_reference(to_torch(n_xyz), to_torch(ca_xyz), to_torch(c_xyz))
    assert_frames_parity("Rigid.make_transform_from_reference", ours.to_tensor_4x4(), ref.to_tensor_4x4())


def test_torsion_angles_to_frames_and_atom_positions_match_openfold():
    rng = np.random.default_rng(1)
    aatype = _aatype(rng, 16)
    rots, trans = _random_rigid(rng, (16,))
    alpha = rng.normal(size=(16, 7, 2)).astype(np.float32)
    alpha /= np.linalg.norm(alpha, axis=-1, keepdims=True)

    rrgdf = to_torch(rc.restype_rigid_group_default_frame)
    ref = of_feats.torsion_angles_to_frames(_of_rigid(rots, trans), to_torch(alpha), to_torch(aatype).long(),
                                            rrgdf)
    ours = feats.torsion_angles_to_frames(Rigid(jnp.asarray(rots), jnp.asarray(trans)), jnp.asarray(alpha),
                                          jnp.asarray(aatype))
    assert_frames_parity("torsion_angles_to_frames", ours.to_tensor_4x4(), ref.to_tensor_4x4())

    # random (not only torsion-generated) group frames
    g_rots, g_trans = _random_rigid(rng, (16, 8))
    ref_pos = of_feats.frames_and_literature_positions_to_atom14_pos(
        _of_rigid(g_rots, g_trans), to_torch(aatype).long(), rrgdf,
        to_torch(rc.restype_atom14_to_rigid_group), to_torch(rc.restype_atom14_mask),
        to_torch(rc.restype_atom14_rigid_group_positions))
    pos = feats.frames_and_literature_positions_to_atom14_pos(
        Rigid(jnp.asarray(g_rots), jnp.asarray(g_trans)), jnp.asarray(aatype))
    assert_parity("frames_and_literature_positions_to_atom14_pos", pos, ref_pos)

    batch = of_data.make_atom14_masks({"aatype": to_torch(aatype).long()})
    ref37 = of_feats.atom14_to_atom37(ref_pos, batch)
    batch_np = {k: jnp.asarray(v.numpy()) for k, v in batch.items()}
    ours37 = feats.atom14_to_atom37(pos, batch_np)
    assert_parity("atom14_to_atom37", ours37, ref37)
    # stacked over iterations (leading axes beyond the features')
    stacked = feats.atom14_to_atom37(jnp.stack([pos, 2 * pos]), batch_np)
    np.testing.assert_allclose(stacked[1], 2 * np.asarray(ours37), rtol=1e-6, atol=1e-6)


def test_invariant_point_attention_matches_openfold():
    rng = np.random.default_rng(2)
    c = _sm_config()
    s = rng.normal(size=(N, c["c_s"])).astype(np.float32)
    z = rng.normal(size=(N, N, c["c_z"])).astype(np.float32)
    mask = padded_mask((N,), N_VALID)
    rots, trans = _random_rigid(rng, (N,))
    args = (c["c_s"], c["c_z"], c["c_ipa"], c["no_heads_ipa"], c["no_qk_points"], c["no_v_points"])
    ref = randomize_(of.InvariantPointAttention(*args, inf=c["inf"], eps=c["epsilon"]))
    want = ref(to_torch(s), to_torch(z), _of_rigid(rots, trans), to_torch(mask))
    mod = InvariantPointAttention(*args, inf=c["inf"], eps=c["epsilon"])
    got = mod.apply({"params": flax_params(ref)}, s, z, Rigid(jnp.asarray(rots), jnp.asarray(trans)), mask)
    assert_parity("InvariantPointAttention", got, want, mask=mask)


def test_small_structure_module_parts_match_openfold():
    rng = np.random.default_rng(3)
    c = _sm_config()
    s = rng.normal(size=(N, c["c_s"])).astype(np.float32)
    s0 = rng.normal(size=(N, c["c_s"])).astype(np.float32)

    ref = randomize_(of.BackboneUpdate(c["c_s"]))
    got = BackboneUpdate(c["c_s"]).apply({"params": flax_params(ref)}, s)
    assert_parity("BackboneUpdate", got, ref(to_torch(s)))

    args = (c["c_s"], c["c_resnet"], c["no_resnet_blocks"], c["no_angles"], c["epsilon"])
    ref = randomize_(of.AngleResnet(*args))
    want_u, want = ref(to_torch(s), to_torch(s0))
    mod = AngleResnet(*args)
    got_u, got = mod.apply({"params": flax_params(ref)}, s, s0)
    assert_parity("AngleResnet (unnormalized)", got_u, want_u)
    assert_parity("AngleResnet (angles)", got, want)

    ref = randomize_(of.StructureModuleTransition(c["c_s"], 2, c["dropout_rate"]))
    got = StructureModuleTransition(c["c_s"], 2, c["dropout_rate"]).apply({"params": flax_params(ref)}, s)
    assert_parity("StructureModuleTransition", got, ref(to_torch(s)))


def _structure_module_case(no_blocks: int, seed: int = 4):
    rng = np.random.default_rng(seed)
    c = _sm_config(no_blocks=no_blocks)
    s = rng.normal(size=(N, c["c_s"])).astype(np.float32)
    z = rng.normal(size=(N, N, c["c_z"])).astype(np.float32)
    aatype = _aatype(rng)
    mask = padded_mask((N,), N_VALID)
    ref = randomize_(of.StructureModule(**c), seed)
    return c, s, z, aatype, mask, ref


@pytest.mark.parametrize("no_blocks", [2, 8])
def test_structure_module_matches_openfold(no_blocks):
    c, s, z, aatype, mask, ref = _structure_module_case(no_blocks)
    want = ref({"single": to_torch(s), "pair": to_torch(z)}, to_torch(aatype).long(), to_torch(mask))
    got = jax.jit(StructureModule(**c).apply)({"params": flax_params(ref)}, s, z, aatype, mask)
    assert set(got) == set(want)
    for k in sorted(want):
        # 8 iterations (the real depth) stay within 1e-5 too: see the parity table. Valid residues
        # only; per-iteration outputs are [no_blocks, N, ...]
        valid = mask if k == "single" else mask[None]
        if k in ("frames", "sidechain_frames"):
            assert_frames_parity(f"StructureModule[{no_blocks} blocks] {k}", got[k], want[k], mask=valid)
        else:
            assert_parity(f"StructureModule[{no_blocks} blocks] {k}", got[k], want[k], mask=valid)


def test_structure_module_gradient_matches_torch():
    c, s, z, aatype, mask, ref = _structure_module_case(no_blocks=3, seed=5)
    rng = np.random.default_rng(6)
    w = {"positions": 0.01 * rng.normal(size=(3, N, 14, 3)), "angles": rng.normal(size=(3, N, 7, 2)),
         "single": rng.normal(size=(N, c["c_s"]))}
    w = {k: v.astype(np.float32) for k, v in w.items()}

    def loss(out, weights, total):
        return sum(total(out[k] * weights[k]) for k in weights)

    s_t = to_torch(s).requires_grad_(True)
    out = ref({"single": s_t, "pair": to_torch(z)}, to_torch(aatype).long(), to_torch(mask))
    loss(out, {k: to_torch(v) for k, v in w.items()}, torch.sum).backward()

    params = flax_params(ref)
    mod = StructureModule(**c)
    grad = jax.jit(jax.grad(lambda x: loss(mod.apply({"params": params}, x, z, aatype, mask), w, jnp.sum)))(s)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0
    assert_parity("StructureModule d loss / d single", grad, s_t.grad, rtol=1e-4, mask=mask)


def test_structure_module_param_count_and_dropout():
    c = model_config("model_1_ptm").model.structure_module.to_dict()
    n = 4
    args = (jnp.zeros((n, c["c_s"])), jnp.zeros((n, n, c["c_z"])), jnp.zeros((n,), jnp.int32), jnp.ones((n,)))
    shapes = jax.eval_shape(lambda: StructureModule(**c).init(jax.random.PRNGKey(0), *args))["params"]
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 2_019_116
    # same names/shapes as OpenFold's state dict
    ref_shapes = jax.tree.map(np.shape, flax_params(of.StructureModule(**c)))
    assert jax.tree.map(lambda x: x.shape, shapes) == ref_shapes

    # dropout: different masks per iteration and per key, none when deterministic
    c, s, z, aatype, mask, ref = _structure_module_case(no_blocks=2)
    mod, params = StructureModule(**c), {"params": flax_params(ref)}
    det = mod.apply(params, s, z, aatype, mask)["single"]
    a = mod.apply(params, s, z, aatype, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    b = mod.apply(params, s, z, aatype, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.all(np.isfinite(a["positions"]))
    assert not np.allclose(a["single"], det) and not np.allclose(a["single"], b["single"])


def test_structure_module_bfloat16_keeps_geometry_float32():
    c, s, z, aatype, mask, ref = _structure_module_case(no_blocks=2)
    params = {"params": flax_params(ref)}
    f32 = StructureModule(**c).apply(params, s, z, aatype, mask)
    bf16 = jax.jit(StructureModule(**c, dtype=jnp.bfloat16).apply)(params, s, z, aatype, mask)
    for k in ("frames", "sidechain_frames", "angles", "unnormalized_angles", "positions"):
        assert bf16[k].dtype == jnp.float32 and np.all(np.isfinite(bf16[k])), k
    assert bf16["single"].dtype == jnp.bfloat16
    # bf16 Linear layers with random weights: a loose agreement check on the coordinates (Å)
    err = float(jnp.max(jnp.abs(bf16["positions"] - f32["positions"])))
    assert err < 0.05 * float(jnp.max(jnp.abs(f32["positions"])))
