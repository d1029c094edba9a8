"""Embedders and TemplatePointwiseAttention vs OpenFold; parameter counts at full size."""
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfun_jax.config import model_config
from molfun_jax.model.embedders import (ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder,
                                        TemplateAngleEmbedder, TemplatePairEmbedder)
from molfun_jax.model.template import TemplatePointwiseAttention
from tests.conftest import FIXTURES, need_fixtures
from tests.reference import assert_parity, flax_params, padded_mask, randomize_, to_torch, torch

from openfold.model import embedders as of  # noqa: E402
from openfold.model.template import TemplatePointwiseAttention as OFTemplatePointwiseAttention  # noqa: E402

TINY = model_config("tiny").model
N = 10


def _ca_coords(n: int) -> np.ndarray:
    """CA positions [n, 3] of the first n residues of a real chain."""
    from Bio.PDB import PDBParser
    need_fixtures()
    with gzip.open(FIXTURES / "chains" / "1ahsA.pdb.gz", "rt") as f:
        chain = next(PDBParser(QUIET=True).get_structure("1ahs", f)[0].get_chains())
    return np.array([r["CA"].coord for r in list(chain)[:n]], np.float32)


def test_input_embedder_matches_openfold_with_chain_break_and_clipped_relpos():
    c = TINY.input_embedder
    rng = np.random.default_rng(0)
    tf = rng.normal(size=(N, c.tf_dim)).astype(np.float32)
    msa = rng.normal(size=(3, N, c.msa_dim)).astype(np.float32)
    # chain break (+200) and offsets beyond relpos_k (32) in both directions
    ri = np.array([0, 1, 2, 3, 20, 40, 41, 240, 241, 500], np.int64)
    ref = randomize_(of.InputEmbedder(**c))
    want_m, want_z = ref(to_torch(tf), to_torch(ri), to_torch(msa))
    d = ri[:, None] - ri[None, :]
    assert d.max() > c.relpos_k and d.min() < -c.relpos_k
    got_m, got_z = InputEmbedder(**c).apply({"params": flax_params(ref)}, tf, ri.astype(np.int32), msa)
    assert_parity("InputEmbedder msa_emb", got_m, want_m)
    assert_parity("InputEmbedder pair_emb", got_z, want_z)


def test_recycling_embedder_matches_openfold_on_real_ca_coordinates():
    c = TINY.recycling_embedder
    rng = np.random.default_rng(1)
    m = rng.normal(size=(N, c.c_m)).astype(np.float32)
    z = rng.normal(size=(N, N, c.c_z)).astype(np.float32)
    x = _ca_coords(N)
    x[-1] = 0.0  # a padded position (OpenFold feeds zeros there)
    ref = randomize_(of.RecyclingEmbedder(**c))
    want_m, want_z = ref(to_torch(m), to_torch(z), to_torch(x))
    got_m, got_z = RecyclingEmbedder(**c).apply({"params": flax_params(ref)}, m, z, x)
    assert_parity("RecyclingEmbedder m", got_m, want_m)
    assert_parity("RecyclingEmbedder z", got_z, want_z)


@pytest.mark.parametrize("name, ours, theirs, shape", [
    ("TemplateAngleEmbedder", TemplateAngleEmbedder, of.TemplateAngleEmbedder, (2, N)),
    ("TemplatePairEmbedder", TemplatePairEmbedder, of.TemplatePairEmbedder, (2, N, N)),
    ("ExtraMSAEmbedder", ExtraMSAEmbedder, of.ExtraMSAEmbedder, (5, N)),
])
def test_linear_embedders_match_openfold(name, ours, theirs, shape):
    c = {"TemplateAngleEmbedder": TINY.template.template_angle_embedder,
         "TemplatePairEmbedder": TINY.template.template_pair_embedder,
         "ExtraMSAEmbedder": TINY.extra_msa.extra_msa_embedder}[name]
    x = np.random.default_rng(2).normal(size=shape + (c.c_in,)).astype(np.float32)
    ref = randomize_(theirs(**c))
    assert_parity(name, ours(**c).apply({"params": flax_params(ref)}, x), ref(to_torch(x)))


@pytest.mark.parametrize("chunk_size, batch", [(None, ()), (7, ()), (7, (2,))])
def test_template_pointwise_attention_matches_openfold_with_masked_templates(chunk_size, batch):
    c = TINY.template.template_pointwise_attention
    n_templ = 3
    rng = np.random.default_rng(3)
    t = rng.normal(size=batch + (n_templ, N, N, c.c_t)).astype(np.float32)
    z = rng.normal(size=batch + (N, N, c.c_z)).astype(np.float32)
    mask = padded_mask(batch + (n_templ,), 2)  # last template is padding
    ref = randomize_(OFTemplatePointwiseAttention(**c))
    want = ref(to_torch(t), to_torch(z), template_mask=to_torch(mask), chunk_size=chunk_size)
    got = TemplatePointwiseAttention(**c).apply({"params": flax_params(ref)}, t, z, mask,
                                                chunk_size=chunk_size)
    assert_parity(f"TemplatePointwiseAttention(chunk={chunk_size}, batch={batch})", got, want)
    # the masked template is ignored: changing it changes nothing
    t2 = t.copy()
    t2[..., -1, :, :, :] = 10.0
    got2 = TemplatePointwiseAttention(**c).apply({"params": flax_params(ref)}, t2, z, mask,
                                                 chunk_size=chunk_size)
    np.testing.assert_array_equal(got2, got)


def test_parameter_counts_at_full_size():
    m = model_config("model_1_ptm").model
    n_res, n_templ = 4, 2
    f = jnp.float32
    cases = {
        "input_embedder": (InputEmbedder(**m.input_embedder), (
            jnp.zeros((n_res, 22), f), jnp.zeros((n_res,), jnp.int32), jnp.zeros((1, n_res, 49), f)), 33_024),
        "recycling_embedder": (RecyclingEmbedder(**m.recycling_embedder), (
            jnp.zeros((n_res, 256), f), jnp.zeros((n_res, n_res, 128), f), jnp.zeros((n_res, 3), f)), 2_816),
        "template_angle_embedder": (TemplateAngleEmbedder(**m.template.template_angle_embedder), (
            jnp.zeros((n_templ, n_res, 57), f),), 80_640),
        "template_pair_embedder": (TemplatePairEmbedder(**m.template.template_pair_embedder), (
            jnp.zeros((n_templ, n_res, n_res, 88), f),), 5_696),
        "template_pointwise_att": (TemplatePointwiseAttention(**m.template.template_pointwise_attention), (
            jnp.zeros((n_templ, n_res, n_res, 64), f), jnp.zeros((n_res, n_res, 128), f),
            jnp.ones((n_templ,), f)), 24_704),
        "extra_msa_embedder": (ExtraMSAEmbedder(**m.extra_msa.extra_msa_embedder), (
            jnp.zeros((1, n_res, 25), f),), 1_664),
    }
    for name, (mod, args, want) in cases.items():
        shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), *args)
        n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
        assert n == want, f"{name}: {n} params, OpenFold has {want}"
