"""Converter: OpenFold state dict <-> Flax params, file wrappers, v1/v2 layouts, bad files."""
import numpy as np
import pytest
import torch

from convert.torch_to_flax import (convert_file, flax_to_torch, main, torch_to_flax, unwrap,
                                   v1_to_v2_key)
from molfun_jax.config import model_config
from molfun_jax.model import param_shapes
from molfun_jax.pretrained import load_pretrained
from tests.reference import randomize_

import openfold.config as of_config  # noqa: E402
from openfold.model.model import AlphaFold as OFAlphaFold  # noqa: E402


@pytest.fixture(scope="module")
def full_sd():
    """A full-size model_1_ptm OpenFold state dict with random non-zero weights."""
    torch.manual_seed(0)
    return randomize_(OFAlphaFold(of_config.model_config("model_1_ptm"))).state_dict()


def _count(tree) -> int:
    import jax
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_full_model_has_openfold_parameter_count(full_sd):
    assert _count(param_shapes(model_config("model_1_ptm"))) == 93_237_338
    assert sum(v.numel() for v in full_sd.values()) == 93_237_338


@pytest.mark.slow  # ~15 s a preset; model_1_ptm's count is checked by default
@pytest.mark.parametrize("preset", ["model_1", "model_3_ptm"])
def test_other_presets_match_openfold_counts(preset):
    want = sum(p.numel() for p in OFAlphaFold(of_config.model_config(preset)).parameters())
    assert _count(param_shapes(model_config(preset))) == want


def test_round_trip_is_bit_exact(full_sd):
    cfg = model_config("model_1_ptm")
    params = torch_to_flax(full_sd, cfg)
    assert params["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_q"]["kernel"].shape == (48, 256, 256)
    np.testing.assert_array_equal(params["evoformer"]["blocks"]["msa_att_row"]["mha"]["linear_q"]["kernel"][7],
                                  full_sd["evoformer.blocks.7.msa_att_row.mha.linear_q.weight"].numpy().T)
    back = flax_to_torch(params, cfg)
    assert set(back) == set(full_sd)
    for k, v in full_sd.items():
        assert torch.equal(back[k], v), k


@pytest.mark.slow  # ~20 s; the round trip and the converter CLI run by default
def test_v2_layout_converts_to_the_same_params(full_sd):
    cfg = model_config("model_1_ptm")
    v2 = {v1_to_v2_key(k): t for k, t in full_sd.items()}
    assert "template_embedder.template_single_embedder.linear_1.weight" in v2
    assert "evoformer.blocks.0.pair_stack.tri_mul_out.linear_g.weight" in v2
    a, b = torch_to_flax(full_sd, cfg), torch_to_flax(v2, cfg)
    import jax
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_wrappers_are_unwrapped(full_sd):
    small = {k: v for k, v in list(full_sd.items())[:3]} | {"evoformer.blocks.0.x.bias": torch.zeros(2)}
    for wrapped in ({"ema": {"params": small}, "optimizer": {}},
                    {"state_dict": {f"model.{k}": v for k, v in small.items()}, "epoch": 3},
                    {f"module.{k}": v for k, v in small.items()}):
        assert set(unwrap(wrapped)) == set(small)


def test_wrong_preset_gets_a_clear_error(full_sd):
    with pytest.raises(ValueError, match=r"(?s)unused: aux_heads\.tm\.linear\.weight \(64, 128\).*looks like model_1/2_ptm"):
        torch_to_flax(full_sd, model_config("model_1"))


def test_not_openfold_and_missing_keys(full_sd):
    with pytest.raises(ValueError, match="not an OpenFold AlphaFold checkpoint"):
        unwrap({"encoder.weight": torch.zeros(3)})
    partial = dict(full_sd)
    del partial["structure_module.ipa.head_weights"]
    with pytest.raises(ValueError, match="unfilled: structure_module/ipa/head_weights"):
        torch_to_flax(partial, model_config("model_1_ptm"))


def test_cli_writes_loadable_weights_and_rejects_bad_files(full_sd, tmp_path, capsys):
    pt = tmp_path / "finetuning_ptm_2.pt"
    torch.save(full_sd, pt)
    assert main([str(pt), str(tmp_path / "out")]) == 0
    params, cfg = load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(params["structure_module"]["ipa"]["head_weights"],
                                  full_sd["structure_module.ipa.head_weights"].numpy())
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(tmp_path / "out", model_config("model_3_ptm"))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pt.read_bytes()[: 1 << 20])
    assert main([str(truncated), str(tmp_path / "o2")]) == 2
    assert "truncated.pt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert_file(truncated, tmp_path / "o3")
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="resnet.pt: .*not an OpenFold AlphaFold checkpoint"):
        convert_file(other, tmp_path / "o4")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_file(tmp_path / "missing.pt", tmp_path / "o5")
