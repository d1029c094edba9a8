"""Auxiliary heads (AF2 Suppl. 1.9): pLDDT [Algorithm 29], distogram, pTM / PAE, masked MSA and
experimentally-resolved logits, and the confidence metrics computed from them (OpenFold
`openfold/model/heads.py` and the `compute_*` functions of `openfold/utils/loss.py`)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from molfun_jax.model.primitives import LayerNorm, Linear

Array = jax.Array


def compute_plddt(logits: Array) -> Array:
    """pLDDT in [0, 100] [*, N] from lDDT-Ca logits [*, N, no_bins] (expected bin centre x 100)."""
    num_bins = logits.shape[-1]
    bounds = (jnp.arange(num_bins, dtype=jnp.float32) + 0.5) / num_bins  # bin centres
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(probs * bounds, axis=-1) * 100


def _calculate_bin_centers(boundaries: Array) -> Array:
    """Centres of the bins between `boundaries`, plus one more bin past the last boundary."""
    step = boundaries[1] - boundaries[0]
    bin_centers = boundaries + step / 2
    return jnp.concatenate([bin_centers, (bin_centers[-1] + step)[None]], axis=0)


def compute_predicted_aligned_error(logits: Array, max_bin: int = 31,
                                    no_bins: int = 64) -> dict[str, Array]:
    """Aligned-error metrics from pTM-head logits [*, N, N, no_bins]: `aligned_confidence_probs`
    [*, N, N, no_bins], `predicted_aligned_error` [*, N, N] (expected error in Å) and
    `max_predicted_aligned_error` [] (the last bin centre)."""
    boundaries = jnp.linspace(0.0, max_bin, no_bins - 1, dtype=jnp.float32)
    bin_centers = _calculate_bin_centers(boundaries)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return {
        "aligned_confidence_probs": probs,
        "predicted_aligned_error": jnp.sum(probs * bin_centers, axis=-1),
        "max_predicted_aligned_error": bin_centers[-1],
    }


def compute_tm(logits: Array, residue_weights: Optional[Array] = None, max_bin: int = 31,
               no_bins: int = 64, eps: float = 1e-8) -> Array:
    """Predicted TM-score [*] from pTM-head logits [*, N, N, no_bins]: the best per-alignment
    expected TM-score over alignment residues i (weighted by `residue_weights` [N], default all 1
    as OpenFold, padding included)."""
    if residue_weights is None:
        residue_weights = jnp.ones(logits.shape[-2], jnp.float32)
    boundaries = jnp.linspace(0.0, max_bin, no_bins - 1, dtype=jnp.float32)
    bin_centers = _calculate_bin_centers(boundaries)
    clipped_n = jnp.maximum(jnp.sum(residue_weights), 19)
    d0 = 1.24 * (clipped_n - 15) ** (1.0 / 3) - 1.8

    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    tm_per_bin = 1.0 / (1 + bin_centers ** 2 / d0 ** 2)
    predicted_tm_term = jnp.sum(probs * tm_per_bin, axis=-1)  # [*, N, N]

    normed_residue_mask = residue_weights / (eps + jnp.sum(residue_weights))
    per_alignment = jnp.sum(predicted_tm_term * normed_residue_mask, axis=-1)  # [*, N]
    weighted = per_alignment * residue_weights
    best = jnp.argmax(weighted, axis=-1)  # first maximum, as OpenFold
    return jnp.take_along_axis(per_alignment, best[..., None], axis=-1)[..., 0]


class PerResidueLDDTCaPredictor(nn.Module):
    """pLDDT head [Algorithm 29]: lDDT-Ca bin logits [*, N, no_bins] from the single repr."""
    no_bins: int
    c_in: int
    c_hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array) -> Array:
        s = LayerNorm(name="layer_norm")(s)
        s = nn.relu(Linear(self.c_hidden, init="relu", dtype=self.dtype, name="linear_1")(s))
        s = nn.relu(Linear(self.c_hidden, init="relu", dtype=self.dtype, name="linear_2")(s))
        return Linear(self.no_bins, init="final", dtype=self.dtype, name="linear_3")(s)


class DistogramHead(nn.Module):
    """Distogram logits [*, N, N, no_bins] (AF2 Suppl. 1.9.8), symmetrised (logits + logits^T);
    always float32, as OpenFold runs it outside autocast."""
    c_z: int
    no_bins: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        logits = Linear(self.no_bins, init="final", dtype=jnp.float32, name="linear")(z.astype(jnp.float32))
        return logits + jnp.swapaxes(logits, -2, -3)


class TMScoreHead(nn.Module):
    """pTM / aligned-error logits [*, N, N, no_bins] (AF2 Suppl. 1.9.7)."""
    c_z: int
    no_bins: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        return Linear(self.no_bins, init="final", dtype=self.dtype, name="linear")(z)


class MaskedMSAHead(nn.Module):
    """Masked-MSA reconstruction logits [*, N_seq, N, c_out] (AF2 Suppl. 1.9.9)."""
    c_m: int
    c_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, m: Array) -> Array:
        return Linear(self.c_out, init="final", dtype=self.dtype, name="linear")(m)


class ExperimentallyResolvedHead(nn.Module):
    """Experimentally-resolved atom37 logits [*, N, c_out] (AF2 Suppl. 1.9.10)."""
    c_s: int
    c_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array) -> Array:
        return Linear(self.c_out, init="final", dtype=self.dtype, name="linear")(s)


class AuxiliaryHeads(nn.Module):
    """All auxiliary heads (AF2 Suppl. 1.9) on the model outputs (`sm.single`, `single`, `pair`,
    `msa`); `tm` exists only when `config.tm.enabled` (pTM presets). Returns OpenFold's dict:
    lddt_logits, plddt, distogram_logits, masked_msa_logits, experimentally_resolved_logits and,
    with pTM, tm_logits, predicted_tm_score, aligned_confidence_probs, predicted_aligned_error,
    max_predicted_aligned_error."""
    config: mlc.ConfigDict  # the model config's `heads`
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c, dt = self.config, self.dtype
        self.plddt = PerResidueLDDTCaPredictor(c.lddt.no_bins, c.lddt.c_in, c.lddt.c_hidden, dtype=dt)
        self.distogram = DistogramHead(c.distogram.c_z, c.distogram.no_bins)
        self.masked_msa = MaskedMSAHead(c.masked_msa.c_m, c.masked_msa.c_out, dtype=dt)
        self.experimentally_resolved = ExperimentallyResolvedHead(
            c.experimentally_resolved.c_s, c.experimentally_resolved.c_out, dtype=dt)
        if c.tm.enabled:
            self.tm = TMScoreHead(c.tm.c_z, c.tm.no_bins, dtype=dt)

    def __call__(self, outputs: Mapping[str, Any]) -> dict[str, Array]:
        aux = {}
        aux["lddt_logits"] = self.plddt(outputs["sm"]["single"])
        aux["plddt"] = compute_plddt(aux["lddt_logits"])
        aux["distogram_logits"] = self.distogram(outputs["pair"])
        aux["masked_msa_logits"] = self.masked_msa(outputs["msa"])
        aux["experimentally_resolved_logits"] = self.experimentally_resolved(outputs["single"])
        if self.config.tm.enabled:
            aux["tm_logits"] = self.tm(outputs["pair"])
            aux["predicted_tm_score"] = compute_tm(aux["tm_logits"], no_bins=self.config.tm.no_bins)
            aux.update(compute_predicted_aligned_error(aux["tm_logits"], no_bins=self.config.tm.no_bins))
        return aux
