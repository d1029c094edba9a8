"""Auxiliary heads and confidence metrics (pLDDT, pTM, PAE) vs OpenFold (fp32, tiny widths);
param count at full size."""
import jax
import jax.numpy as jnp
import numpy as np

from molfun_jax.config import model_config
from molfun_jax.model.heads import (AuxiliaryHeads, DistogramHead, ExperimentallyResolvedHead, MaskedMSAHead,
                                    PerResidueLDDTCaPredictor, TMScoreHead, compute_plddt,
                                    compute_predicted_aligned_error, compute_tm)
from tests.reference import assert_parity, flax_params, randomize_, to_torch

from openfold.model import heads as of  # noqa: E402
from openfold.utils import loss as of_loss  # noqa: E402

N, N_SEQ = 11, 5


def _outputs(c, rng: np.random.Generator) -> dict:
    """Model outputs the heads read, at the config's widths."""
    return {
        "sm": {"single": rng.normal(size=(N, c.lddt.c_in)).astype(np.float32)},
        "single": rng.normal(size=(N, c.experimentally_resolved.c_s)).astype(np.float32),
        "pair": rng.normal(size=(N, N, c.distogram.c_z)).astype(np.float32),
        "msa": rng.normal(size=(N_SEQ, N, c.masked_msa.c_m)).astype(np.float32),
    }


def test_each_head_matches_openfold():
    c = model_config("tiny").model.heads
    out = _outputs(c, np.random.default_rng(0))
    cases = [
        ("PerResidueLDDTCaPredictor", of.PerResidueLDDTCaPredictor(**c.lddt),
         PerResidueLDDTCaPredictor(**c.lddt), out["sm"]["single"]),
        ("DistogramHead", of.DistogramHead(**c.distogram), DistogramHead(**c.distogram), out["pair"]),
        ("TMScoreHead", of.TMScoreHead(**c.tm), TMScoreHead(c.tm.c_z, c.tm.no_bins), out["pair"]),
        ("MaskedMSAHead", of.MaskedMSAHead(**c.masked_msa), MaskedMSAHead(**c.masked_msa), out["msa"]),
        ("ExperimentallyResolvedHead", of.ExperimentallyResolvedHead(**c.experimentally_resolved),
         ExperimentallyResolvedHead(**c.experimentally_resolved), out["single"]),
    ]
    for i, (name, ref, mod, x) in enumerate(cases):
        randomize_(ref, seed=i)
        got = mod.apply({"params": flax_params(ref)}, x)
        assert_parity(name, got, ref(to_torch(x)))
    # the distogram is symmetric in (i, j)
    d = cases[1][2].apply({"params": flax_params(cases[1][1])}, out["pair"])
    np.testing.assert_array_equal(d, np.swapaxes(d, 0, 1))


def test_confidence_metrics_match_openfold():
    rng = np.random.default_rng(1)
    lddt_logits = 3 * rng.normal(size=(N, 50)).astype(np.float32)
    tm_logits = 3 * rng.normal(size=(N, N, 64)).astype(np.float32)
    assert_parity("compute_plddt", compute_plddt(lddt_logits), of_loss.compute_plddt(to_torch(lddt_logits)))
    assert_parity("compute_tm", compute_tm(tm_logits), of_loss.compute_tm(to_torch(tm_logits)))
    weights = (rng.uniform(size=(N,)) > 0.3).astype(np.float32)
    assert_parity("compute_tm (residue weights)", compute_tm(tm_logits, residue_weights=weights),
                  of_loss.compute_tm(to_torch(tm_logits), residue_weights=to_torch(weights)))
    got = compute_predicted_aligned_error(tm_logits)
    want = of_loss.compute_predicted_aligned_error(to_torch(tm_logits))
    assert set(got) == set(want)
    for k in sorted(want):
        assert_parity(f"compute_predicted_aligned_error {k}", got[k], want[k])
    # batched (vmapped model): one score per example
    both = compute_tm(np.stack([tm_logits, -tm_logits]))
    assert both.shape == (2,)
    np.testing.assert_allclose(both[0], compute_tm(tm_logits), rtol=1e-6)


def test_auxiliary_heads_match_openfold():
    c = model_config("tiny").model.heads
    assert c.tm.enabled
    out = _outputs(c, np.random.default_rng(2))
    ref = randomize_(of.AuxiliaryHeads(c), seed=3)
    want = ref({"sm": {"single": to_torch(out["sm"]["single"])},
                **{k: to_torch(out[k]) for k in ("single", "pair", "msa")}})
    got = jax.jit(AuxiliaryHeads(c).apply)({"params": flax_params(ref)}, out)
    assert set(got) == set(want)
    for k in sorted(want):
        assert_parity(f"AuxiliaryHeads {k}", got[k], want[k])


def test_aux_heads_param_count():
    n = 4
    for name, count in (("model_1_ptm", 109_678), ("model_1", 109_678 - 128 * 64 - 64)):
        c = model_config(name).model.heads
        shapes = {"sm": {"single": jax.ShapeDtypeStruct((n, c.lddt.c_in), jnp.float32)},
                  "single": jax.ShapeDtypeStruct((n, c.experimentally_resolved.c_s), jnp.float32),
                  "pair": jax.ShapeDtypeStruct((n, n, c.distogram.c_z), jnp.float32),
                  "msa": jax.ShapeDtypeStruct((2, n, c.masked_msa.c_m), jnp.float32)}
        params = jax.eval_shape(lambda o: AuxiliaryHeads(c).init(jax.random.PRNGKey(0), o), shapes)["params"]
        assert sum(x.size for x in jax.tree.leaves(params)) == count, name
        ref_shapes = jax.tree.map(np.shape, flax_params(of.AuxiliaryHeads(c)))
        assert jax.tree.map(lambda x: x.shape, params) == ref_shapes
