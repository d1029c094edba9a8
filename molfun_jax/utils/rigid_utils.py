"""Rigid transforms x -> R x + t over a batch `[*]` (OpenFold `openfold/utils/rigid_utils.py`).

`Rigid` is an immutable pytree of float32 arrays: rotation matrices `rots` [*, 3, 3], translations
`trans` [*, 3] and, for frames built from quaternions (the structure module's backbone frames,
[Algorithm 23]), the unit quaternions `quats` [*, 4] (w, x, y, z) they came from. Products of
rotations and rotations of vectors are written out elementwise, as OpenFold's `rot_matmul` /
`rot_vec_mul`, so geometry never goes through a reduced-precision matmul.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


def rot_matmul(a: Array, b: Array) -> Array:
    """[*, 3, 3] @ [*, 3, 3], elementwise in full precision."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def rot_vec_mul(r: Array, t: Array) -> Array:
    """[*, 3, 3] @ [*, 3], elementwise in full precision."""
    return jnp.sum(r * t[..., None, :], axis=-1)


def stack_matrix(rows: Sequence[Sequence[Union[Array, float]]], like: Array) -> Array:
    """A [*, 3, 3] matrix from 3x3 entries, each an array shaped like `like` [*] or a number."""
    full = lambda e: jnp.broadcast_to(jnp.asarray(e, like.dtype), like.shape)
    return jnp.stack([jnp.stack([full(e) for e in row], axis=-1) for row in rows], axis=-2)


def _quat_table(pairs: dict[str, float]) -> np.ndarray:
    m = np.zeros((4, 4))
    for key, value in pairs.items():
        m["abcd".index(key[0]), "abcd".index(key[1])] = value
    return m


# [4, 4, 3, 3]: R[i, j] = sum_kl q_k q_l _QTR_MAT[k, l, i, j] (OpenFold's table)
_QTR_MAT = np.zeros((4, 4, 3, 3))
_QTR_MAT[..., 0, 0] = _quat_table({"aa": 1, "bb": 1, "cc": -1, "dd": -1})
_QTR_MAT[..., 0, 1] = _quat_table({"bc": 2, "ad": -2})
_QTR_MAT[..., 0, 2] = _quat_table({"bd": 2, "ac": 2})
_QTR_MAT[..., 1, 0] = _quat_table({"bc": 2, "ad": 2})
_QTR_MAT[..., 1, 1] = _quat_table({"aa": 1, "bb": -1, "cc": 1, "dd": -1})
_QTR_MAT[..., 1, 2] = _quat_table({"cd": 2, "ab": -2})
_QTR_MAT[..., 2, 0] = _quat_table({"bd": 2, "ac": -2})
_QTR_MAT[..., 2, 1] = _quat_table({"cd": 2, "ab": 2})
_QTR_MAT[..., 2, 2] = _quat_table({"aa": 1, "bb": -1, "cc": -1, "dd": 1})

# [4, 3, 4]: (q * (0, v))[k] = sum_ij q_i v_j _QUAT_MULTIPLY_BY_VEC[i, j, k] (OpenFold's table)
_QUAT_MULTIPLY = np.zeros((4, 4, 4))
_QUAT_MULTIPLY[:, :, 0] = [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0], [0, 0, 0, -1]]
_QUAT_MULTIPLY[:, :, 1] = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, -1, 0]]
_QUAT_MULTIPLY[:, :, 2] = [[0, 0, 1, 0], [0, 0, 0, -1], [1, 0, 0, 0], [0, 1, 0, 0]]
_QUAT_MULTIPLY[:, :, 3] = [[0, 0, 0, 1], [0, 0, 1, 0], [0, -1, 0, 0], [1, 0, 0, 0]]
_QUAT_MULTIPLY_BY_VEC = _QUAT_MULTIPLY[:, 1:, :]


def quat_to_rot(quat: Array) -> Array:
    """Quaternions [*, 4] -> rotation matrices [*, 3, 3]."""
    qq = quat[..., :, None] * quat[..., None, :]  # [*, 4, 4]
    return jnp.sum(qq[..., None, None] * jnp.asarray(_QTR_MAT, quat.dtype), axis=(-3, -4))


def quat_multiply_by_vec(quat: Array, vec: Array) -> Array:
    """Quaternions [*, 4] times pure-vector quaternions (0, vec) [*, 3] -> [*, 4]."""
    table = jnp.asarray(_QUAT_MULTIPLY_BY_VEC, quat.dtype)
    return jnp.sum(table * quat[..., :, None, None] * vec[..., None, :, None], axis=(-3, -2))


@struct.dataclass
class Rigid:
    """A batch [*] of rigid transforms (OpenFold's `Rigid`); construct with float32 arrays."""
    rots: Array  # [*, 3, 3]
    trans: Array  # [*, 3]
    quats: Optional[Array] = None  # [*, 4] when the rotation is held as a quaternion

    @property
    def shape(self) -> tuple[int, ...]:
        return self.trans.shape[:-1]

    @staticmethod
    def identity(shape: tuple[int, ...], fmt: str = "quat") -> "Rigid":
        """Identity transforms of batch `shape`; `fmt='quat'` also holds (1, 0, 0, 0) quaternions."""
        trans = jnp.zeros(shape + (3,), jnp.float32)
        if fmt == "quat":
            return Rigid.from_quats(jnp.zeros(shape + (4,), jnp.float32).at[..., 0].set(1.0), trans,
                                    normalize=False)
        if fmt == "rot_mat":
            return Rigid(jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), shape + (3, 3)), trans)
        raise ValueError(f"Invalid format: {fmt}")

    @staticmethod
    def from_quats(quats: Array, trans: Array, normalize: bool = True) -> "Rigid":
        """From quaternions [*, 4] (normalised unless `normalize=False`) and translations [*, 3]."""
        quats = quats.astype(jnp.float32)
        if normalize:
            quats = quats / jnp.linalg.norm(quats, axis=-1, keepdims=True)
        return Rigid(quat_to_rot(quats), trans.astype(jnp.float32), quats)

    @staticmethod
    def from_tensor_4x4(t: Array) -> "Rigid":
        """From homogeneous transforms [*, 4, 4]."""
        t = t.astype(jnp.float32)
        return Rigid(t[..., :3, :3], t[..., :3, 3])

    @staticmethod
    def cat(rigids: Sequence["Rigid"], axis: int) -> "Rigid":
        """Concatenate along batch axis `axis` (rotation-matrix form)."""
        axis = axis % len(rigids[0].shape)
        return Rigid(jnp.concatenate([r.rots for r in rigids], axis=axis),
                     jnp.concatenate([r.trans for r in rigids], axis=axis))

    def __getitem__(self, index: Any) -> "Rigid":
        """Index the batch axes, e.g. `r[..., None]` (numpy indexing)."""
        index = index if isinstance(index, tuple) else (index,)
        return Rigid(self.rots[index + (slice(None),) * 2], self.trans[index + (slice(None),)],
                     None if self.quats is None else self.quats[index + (slice(None),)])

    def compose(self, other: "Rigid") -> "Rigid":
        """self o other (rotation-matrix form)."""
        return Rigid(rot_matmul(self.rots, other.rots), rot_vec_mul(self.rots, other.trans) + self.trans)

    def compose_q_update_vec(self, update: Array) -> "Rigid":
        """Compose with an update [*, 6]: quaternion (1, x, y, z) from the first three columns,
        translation from the last three [Algorithm 23, lines 2-4]. Needs `quats`."""
        q_vec, t_vec = update[..., :3], update[..., 3:]
        new_quats = self.quats + quat_multiply_by_vec(self.quats, q_vec)
        return Rigid.from_quats(new_quats, self.trans + rot_vec_mul(self.rots, t_vec))

    def apply(self, pts: Array) -> Array:
        """R x + t for points [*, 3]."""
        return rot_vec_mul(self.rots, pts) + self.trans

    def invert_apply(self, pts: Array) -> Array:
        """R^T (x - t) for points [*, 3]."""
        return rot_vec_mul(jnp.swapaxes(self.rots, -1, -2), pts - self.trans)

    def invert(self) -> "Rigid":
        rot_inv = jnp.swapaxes(self.rots, -1, -2)
        return Rigid(rot_inv, -1 * rot_vec_mul(rot_inv, self.trans))

    def to_tensor_4x4(self) -> Array:
        """[*, 4, 4] homogeneous transforms."""
        top = jnp.concatenate([self.rots, self.trans[..., None]], axis=-1)  # [*, 3, 4]
        bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], top.dtype), self.shape + (1, 4))
        return jnp.concatenate([top, bottom], axis=-2)

    def to_tensor_7(self) -> Array:
        """[*, 7]: quaternion then translation. Needs `quats`."""
        return jnp.concatenate([self.quats, self.trans], axis=-1)

    def scale_translation(self, factor: float) -> "Rigid":
        return self.replace(trans=self.trans * factor)

    def stop_rot_gradient(self) -> "Rigid":
        """Block gradients through the rotation (OpenFold's `stop_rot_gradient`)."""
        return self.replace(rots=jax.lax.stop_gradient(self.rots),
                            quats=None if self.quats is None else jax.lax.stop_gradient(self.quats))

    @staticmethod
    def make_transform_from_reference(n_xyz: Array, ca_xyz: Array, c_xyz: Array,
                                      eps: float = 1e-20) -> "Rigid":
        """Backbone frames from N, CA, C positions [*, 3]: origin CA, x-axis towards C, N in the
        xy-plane (OpenFold's successive-rotation construction; symmetries are not handled)."""
        translation = -1 * ca_xyz
        n_xyz = n_xyz + translation
        c_xyz = c_xyz + translation

        c_x, c_y, c_z = c_xyz[..., 0], c_xyz[..., 1], c_xyz[..., 2]
        norm = jnp.sqrt(eps + c_x ** 2 + c_y ** 2)
        sin_c1, cos_c1 = -c_y / norm, c_x / norm
        c1_rots = stack_matrix([[cos_c1, -1 * sin_c1, 0], [sin_c1, cos_c1, 0], [0, 0, 1]], sin_c1)

        norm = jnp.sqrt(eps + c_x ** 2 + c_y ** 2 + c_z ** 2)
        sin_c2, cos_c2 = c_z / norm, jnp.sqrt(c_x ** 2 + c_y ** 2) / norm
        c2_rots = stack_matrix([[cos_c2, 0, sin_c2], [0, 1, 0], [-1 * sin_c2, 0, cos_c2]], sin_c2)

        c_rots = rot_matmul(c2_rots, c1_rots)
        n_xyz = rot_vec_mul(c_rots, n_xyz)

        n_y, n_z = n_xyz[..., 1], n_xyz[..., 2]
        norm = jnp.sqrt(eps + n_y ** 2 + n_z ** 2)
        sin_n, cos_n = -n_z / norm, n_y / norm
        n_rots = stack_matrix([[1, 0, 0], [0, cos_n, -1 * sin_n], [0, sin_n, cos_n]], sin_n)

        rots = jnp.swapaxes(rot_matmul(n_rots, c_rots), -1, -2)
        return Rigid(rots.astype(jnp.float32), (-1 * translation).astype(jnp.float32))
