"""Dropout with a mask shared along one axis (AF2 Suppl. 1.11.6): row-wise shares it over
axis -3, column-wise over axis -2."""
from __future__ import annotations

import flax.linen as nn
import jax


class SharedDropout(nn.Module):
    """Identity when `deterministic`; otherwise inverted dropout whose mask is broadcast along
    `broadcast_dim` (uses the 'dropout' RNG stream)."""
    rate: float
    broadcast_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return nn.Dropout(self.rate, broadcast_dims=(x.ndim + self.broadcast_dim,))(x, deterministic=deterministic)


def DropoutRowwise(rate: float, name: str | None = None) -> SharedDropout:
    return SharedDropout(rate, -3, name=name)


def DropoutColumnwise(rate: float, name: str | None = None) -> SharedDropout:
    return SharedDropout(rate, -2, name=name)
