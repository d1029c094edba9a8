"""The one feature schema: a feature added to it is padded, cropped, has a dummy model input and
an empty-template entry by construction; a feature it does not declare is an error."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from molfun_jax.config import model_config
from molfun_jax.data import FEATURE_SCHEMA, FeatureSpec, crop_features, pad_features
from molfun_jax.data.templates import empty_template_features
from molfun_jax.feature_schema import N_ATOM, N_RES, N_TEMPL
from molfun_jax.model import dummy_features
from tests.conftest import ROOT

N_BOND = "N_bond"  # a padded axis kind the schema does not have
EXTENDED = dataclasses.replace(FEATURE_SCHEMA.with_features(
    template_extra=FeatureSpec(np.float32, (N_TEMPL, N_RES, 5)),
    bond_lengths=FeatureSpec(np.float32, (N_BOND,), model_input=False),
), padded_dims=(*FEATURE_SCHEMA.padded_dims, N_BOND))


def test_added_feature_is_padded_and_cropped():
    rng = np.random.default_rng(0)
    feats = {"aatype": np.arange(6, dtype=np.int32), "template_extra": rng.random((2, 6, 5), np.float32),
             "ligand_positions": rng.random((4, 3), np.float32)}
    out = pad_features(feats, 9, n_templ=3, sizes={N_ATOM: 7}, schema=EXTENDED)
    assert out["template_extra"].shape == (3, 9, 5) and out["ligand_positions"].shape == (7, 3)
    np.testing.assert_array_equal(out["template_extra"][:2, :6], feats["template_extra"])
    np.testing.assert_array_equal(out["ligand_positions"][:4], feats["ligand_positions"])
    assert not out["template_extra"][2:].any() and not out["template_extra"][:, 6:].any()
    assert not out["ligand_positions"][4:].any()
    np.testing.assert_array_equal(out["aatype"], [0, 1, 2, 3, 4, 5, 0, 0, 0])

    idx = np.array([1, 4])
    cropped = crop_features(feats, idx, schema=EXTENDED)
    np.testing.assert_array_equal(cropped["template_extra"], feats["template_extra"][:, [1, 4]])
    np.testing.assert_array_equal(cropped["ligand_positions"], feats["ligand_positions"])  # no residue axis
    np.testing.assert_array_equal(cropped["aatype"], [1, 4])


def test_added_feature_has_a_dummy_and_an_empty_template():
    dummy = dummy_features(model_config("tiny"), 6, n_seq=2, n_extra=3, n_templ=4, schema=EXTENDED)
    assert dummy["template_extra"].shape == (4, 6, 5) and dummy["template_extra"].dtype == np.float32
    assert "ligand_positions" not in dummy  # not a model input
    assert dummy["msa_feat"].shape == (2, 6, 49) and dummy["target_feat"].shape == (6, 22)
    assert set(dummy) == set(dummy_features(model_config("tiny"), 6)) | {"template_extra"}

    empty = empty_template_features(6, schema=EXTENDED)
    assert empty["template_extra"].shape == (1, 6, 5) and not empty["template_extra"].any()
    assert set(empty) - set(empty_template_features(6)) == {"template_extra"}


def test_default_empty_template():
    """OpenFold's templates-off input: one all-zero template of every template feature."""
    empty = empty_template_features(5)
    shapes = {"template_aatype": (1, 5), "template_all_atom_positions": (1, 5, 37, 3),
              "template_all_atom_mask": (1, 5, 37), "template_mask": (1,), "template_pseudo_beta": (1, 5, 3),
              "template_pseudo_beta_mask": (1, 5), "template_torsion_angles_sin_cos": (1, 5, 7, 2),
              "template_alt_torsion_angles_sin_cos": (1, 5, 7, 2), "template_torsion_angles_mask": (1, 5, 7)}
    assert {k: v.shape for k, v in empty.items()} == shapes
    assert empty["template_aatype"].dtype == np.int32 and not any(v.any() for v in empty.values())


def test_undeclared_feature_is_an_error():
    feats = {"aatype": np.zeros(4, np.int32), "bond_lengths": np.zeros(3, np.float32)}
    with pytest.raises(KeyError, match="'bond_lengths' is not in the feature schema"):
        pad_features(feats, 8)
    with pytest.raises(KeyError, match="'bond_lengths' is not in the feature schema"):
        crop_features(feats, np.arange(2))
    with pytest.raises(ValueError, match="'aatype' has shape \\(4, 1\\)"):
        pad_features({"aatype": np.zeros((4, 1), np.int32)}, 8)
    with pytest.raises(ValueError, match="N_atom"):
        pad_features({"aatype": np.zeros(4, np.int32)}, 8, sizes={N_BOND: 4})  # not a padded dim here
    with pytest.raises(ValueError, match="crop before padding"):
        pad_features({"aatype": np.zeros(9, np.int32)}, 8)


def test_model_package_does_not_import_the_data_package():
    """The schema is the model's and the data's common ground: the model imports no data module."""
    code = ("import sys, molfun_jax.model.model; "
            "print(sorted(m for m in sys.modules if m.startswith('molfun_jax.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
