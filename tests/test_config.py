"""Our presets equal OpenFold's model configs; tiny is derived from the same code."""
import pytest

from molfun_jax.config import PRESETS, from_openfold, model_config, remat_policy
import tests.reference  # noqa: F401  (skips without the reference; imports importlib.util)

import openfold.config as of_config  # noqa: E402


def _without_chunk(d: dict) -> dict:
    d = dict(d)
    d["globals"] = {k: v for k, v in d["globals"].items() if k != "chunk_size"}
    return d


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("low_prec", [False, True])
def test_presets_equal_openfold(preset, low_prec):
    ours = model_config(preset, low_prec=low_prec)
    theirs = from_openfold(of_config.model_config(preset, low_prec=low_prec))
    # chunk_size: OpenFold chunks inference by default (4); we default to unchunked
    assert _without_chunk(ours.to_dict()) == _without_chunk(theirs.to_dict())
    assert theirs.globals.chunk_size == 4 and ours.globals.chunk_size is None


def test_train_flag_turns_on_remat_like_openfold_blocks_per_ckpt():
    assert model_config("model_1_ptm", train=True).globals.remat
    assert from_openfold(of_config.model_config("model_1_ptm", train=True)).globals.remat


def test_tiny_is_reduced_model_1_ptm():
    t, f = model_config("tiny"), model_config("model_1_ptm")
    assert t.model.evoformer_stack.no_blocks == 2 and t.model.extra_msa.extra_msa_stack.no_blocks == 1
    assert t.model.template.template_pair_stack.no_blocks == 1
    assert t.model.template.enabled and t.model.heads.tm.enabled
    assert t.model.extra_msa.extra_msa_stack.c_m == t.globals.c_e
    assert t.model.keys() == f.model.keys()
    with pytest.raises(ValueError, match="unknown preset 'model_9'"):
        model_config("model_9")


def test_remat_policy_names_jax_policies():
    import jax

    g = model_config("tiny", train=True).globals
    assert remat_policy(g) is jax.checkpoint_policies.nothing_saveable
    g.remat_policy = "dots_saveable"
    assert remat_policy(g) is jax.checkpoint_policies.dots_saveable
    g.remat_policy = "save_everything"
    with pytest.raises(ValueError, match="remat_policy"):
        remat_policy(g)
