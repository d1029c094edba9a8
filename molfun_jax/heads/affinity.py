"""Binding-affinity head: LayerNorm on the trunk's single representation, masked mean pooling
over residues (or over the binding pocket), and an MLP `c_s -> hidden -> 1` with dropout.

At `c_s=384, hidden_dim=128` it has 768 (LayerNorm) + 384*128 + 128 + 128 + 1 = 50,177 params.
Targets are optionally normalised with the train split's mean / std (`TargetNorm`, stored with
the model); the head predicts in normalised units and `TargetNorm.denormalize` maps back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molfun_jax.model.primitives import LayerNorm, Linear

Array = jax.Array

LOSSES = ("mse", "huber")
POOLINGS = ("pocket", "mean")
SOURCES = ("evoformer", "structure_module")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Affinity head hyper-parameters (`kind='pocket'`: the protein-only head).

    pooling: 'pocket' averages over `pocket_mask` residues when the example has a non-empty
        pocket mask (a ligand is present), else over all residues; 'mean' always over all
        residues (`seq_mask`).
    source: which single representation the head reads: the Evoformer's (`outputs['single']`,
        the default; the structure module then gets no gradient) or the structure module's
        (`outputs['sm']['single']`).
    loss: 'mse' or 'huber' (with `huber_delta`, in normalised target units).
    """
    kind: str = "pocket"
    hidden_dim: int = 128
    dropout: float = 0.1
    pooling: str = "pocket"
    source: str = "evoformer"
    loss: str = "mse"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind != "pocket":
            raise ValueError(f"HeadConfig.kind must be 'pocket', got {self.kind!r}")
        for field, allowed in (("pooling", POOLINGS), ("source", SOURCES), ("loss", LOSSES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"HeadConfig.{field}={getattr(self, field)!r}; choose one of {allowed}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HeadConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AffinityHead(nn.Module):
    """Pooled-MLP regression head on the single representation (float32 throughout)."""
    config: HeadConfig = HeadConfig()

    @nn.compact
    def __call__(self, single: Array, seq_mask: Array, pocket_mask: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        # single: [*, N_res, C_s], seq_mask / pocket_mask: [*, N_res] -> [*]
        s = LayerNorm(name="layer_norm")(single.astype(jnp.float32))
        w = seq_mask.astype(jnp.float32)
        if self.config.pooling == "pocket" and pocket_mask is not None:
            pocket = pocket_mask.astype(jnp.float32) * w
            has_pocket = jnp.sum(pocket, axis=-1, keepdims=True) > 0
            w = jnp.where(has_pocket, pocket, w)
        # [*, C_s]: masked mean (an all-zero mask gives 0, not NaN)
        pooled = jnp.sum(s * w[..., None], axis=-2) / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)
        h = jax.nn.relu(Linear(self.config.hidden_dim, init="relu", name="linear_1")(pooled))
        h = nn.Dropout(self.config.dropout)(h, deterministic=deterministic)
        return Linear(1, name="linear_2")(h)[..., 0]


def affinity_loss(pred: Array, target: Array, kind: str = "mse", delta: float = 1.0) -> Array:
    """Per-example loss (same shape as `pred`): squared error or Huber with `delta`."""
    err = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "mse":
        return jnp.square(err)
    if kind == "huber":
        a = jnp.abs(err)
        return jnp.where(a <= delta, 0.5 * jnp.square(err), delta * (a - 0.5 * delta))
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


@dataclasses.dataclass(frozen=True)
class TargetNorm:
    """Affine target normalisation y_n = (y - mean) / std, fitted on the train split."""
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, targets: Any) -> "TargetNorm":
        """Mean and (population) std of the train targets; std 1 when they are constant."""
        t = np.asarray(targets, np.float64)
        if t.size == 0:
            raise ValueError("cannot fit a target normalisation on no targets")
        std = float(t.std())
        return cls(float(t.mean()), std if std > 0 else 1.0)

    def normalize(self, y: Any) -> Any:
        return (y - self.mean) / self.std

    def denormalize(self, y: Any) -> Any:
        return y * self.std + self.mean

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}
