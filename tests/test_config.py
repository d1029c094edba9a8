"""Our presets equal OpenFold's model configs; tiny is derived from the same code."""
import pytest

from molfun_jax.config import (AUTO_DOTS_MAX_N, LAYER_NORM_STATISTICS, PRESETS, RELU_MASK, REMAT_CHOICES, REMAT_OFF,
                               REMAT_POLICIES, from_openfold, model_config, remat_choice, remat_policy,
                               resolve_remat_policy, with_remat)
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# OpenFold model keys we leave out, by their last name: memory / runtime switches (our `remat`,
# `chunk_size` and XLA take their place) and one option that no preset turns on
RUNTIME_ONLY = {"blocks_per_ckpt", "ckpt", "clear_cache_between_blocks", "tune_chunk_size", "offload_templates"}
OFF_IN_EVERY_PRESET = {"average_templates": False}  # template pointwise attention, never averaging
# globals: ours only (compute dtype, recycles: OpenFold's data.common.max_recycling_iters, remat)
# and theirs only (LMA / flash attention kernels, CPU offloading: runtime choices)
GLOBALS_OURS_ONLY = {"dtype", "num_recycles", "remat", "remat_policy"}
GLOBALS_THEIRS_ONLY = {"blocks_per_ckpt", "offload_inference", "use_flash", "use_lma"}


@pytest.mark.parametrize("preset", PRESETS)
def test_model_keys_equal_openfold_both_ways(preset):
    """Key by key against OpenFold's own ConfigDict (not through `from_openfold`, which drops the
    keys we lack): every key of ours exists there with the same value, and every key of theirs
    is ours or a named omission."""
    ours, theirs = model_config(preset), of_config.model_config(preset)
    o, t = _flat(ours.model.to_dict()), _flat(theirs.model.to_dict())
    assert sorted(set(o) - set(t)) == []
    assert {k: (o[k], t[k]) for k in o if o[k] != t[k]} == {}
    omitted = {k: t[k] for k in set(t) - set(o)}
    unexplained = [k for k in omitted if k.split(".")[-1] not in RUNTIME_ONLY | set(OFF_IN_EVERY_PRESET)]
    assert unexplained == []
    for k, v in omitted.items():
        if k.split(".")[-1] in OFF_IN_EVERY_PRESET:
            assert v == OFF_IN_EVERY_PRESET[k.split(".")[-1]], (k, v)
    og, tg = ours.globals.to_dict(), theirs.globals.to_dict()
    assert set(og) - set(tg) == GLOBALS_OURS_ONLY and set(tg) - set(og) == GLOBALS_THEIRS_ONLY
    assert {k: (og[k], tg[k]) for k in set(og) & set(tg) if k != "chunk_size" and og[k] != tg[k]} == {}


def _saved(policy, capsys) -> list[str]:
    """What a block rematerialised under `policy` saves for its backward besides its arguments:
    jax's own report on x -> relu_keeping_mask(layer_norm(x @ w)) @ w."""
    import jax
    import jax.numpy as jnp

    from molfun_jax.model.primitives import layer_norm, relu_keeping_mask
    f = lambda x, w: jnp.sum(relu_keeping_mask(layer_norm(x @ w, w[0], w[1], 1e-5)) @ w)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=policy), jnp.ones((8, 16)), jnp.ones((16, 16)))
    return sorted(line.split(" from ")[0] for line in capsys.readouterr().out.splitlines()
                  if "from the argument" not in line)


def test_remat_policies_save_what_jax_policies_save_and_the_statistics(capsys):
    """'nothing_saveable' saves what jax's policy of that name saves; 'statistics_saveable' the
    ReLU's bit mask (8 rows of 16 channels: 8 x 2 bytes) and the LayerNorm's mean and 1 / std
    (8 x 1 floats each); the dots policies what jax's save plus those. An unknown name is refused."""
    import jax

    g = model_config("tiny", train=True).globals
    statistics = [f"u8[8,2] named '{RELU_MASK}'"] + [f"f32[8,1] named '{LAYER_NORM_STATISTICS}'"] * 2
    nothing = _saved(jax.checkpoint_policies.nothing_saveable, capsys)
    assert not set(statistics) & set(nothing)
    for name, jax_name, extra in (("nothing_saveable", "nothing_saveable", []),
                                  ("statistics_saveable", "nothing_saveable", statistics),
                                  ("dots_saveable", "dots_saveable", statistics),
                                  ("dots_with_no_batch_dims_saveable", "dots_with_no_batch_dims_saveable", statistics)):
        g.remat_policy = name
        assert _saved(remat_policy(g), capsys) == sorted(_saved(getattr(jax.checkpoint_policies, jax_name), capsys)
                                                         + extra), name
    g.remat_policy = "dots_saveable"
    assert "f32[8,16] output of dot_general" in _saved(remat_policy(g), capsys)
    g.remat_policy = "save_everything"
    with pytest.raises(ValueError, match="remat_policy"):
        remat_policy(g)


def test_with_remat_sets_the_policy_or_turns_remat_off_on_a_copy():
    train, infer = model_config("tiny", train=True), model_config("tiny")
    off = with_remat(train, REMAT_OFF)
    assert not off.globals.remat and train.globals.remat  # a copy
    dots = with_remat(infer, "dots_saveable")  # a policy turns remat on
    assert dots.globals.remat and dots.globals.remat_policy == "dots_saveable" and not infer.globals.remat
    assert with_remat(train, "auto").globals.remat_policy == "auto"
    assert set(REMAT_CHOICES) == set(REMAT_POLICIES) | {REMAT_OFF}
    assert [remat_choice(with_remat(train, c)) for c in REMAT_CHOICES] == list(REMAT_CHOICES)  # the inverse
    with pytest.raises(ValueError, match="remat policy 'sometimes'; choose one of"):
        with_remat(train, "sometimes")


def test_auto_remat_policy_saves_matmuls_only_for_short_crops_on_accelerators():
    c = model_config("tiny", train=True)
    assert c.globals.remat_policy == "auto"
    for platform in ("gpu", "tpu"):
        short = resolve_remat_policy(c, AUTO_DOTS_MAX_N, platform)
        long = resolve_remat_policy(c, AUTO_DOTS_MAX_N + 1, platform)
        assert short.globals.remat_policy == "dots_saveable"
        assert long.globals.remat_policy == "statistics_saveable"
    assert resolve_remat_policy(c, 8, "cpu").globals.remat_policy == "statistics_saveable"
    assert c.globals.remat_policy == "auto"  # resolved on a copy
    c.globals.remat_policy = "dots_saveable"  # an explicit choice is kept, on CPU too
    assert resolve_remat_policy(c, 8, "cpu").globals.remat_policy == "dots_saveable"
