"""The one schema of an example's features: name -> dtype and shape in symbolic dims.

Everything that needs to know the features is derived from `FEATURE_SCHEMA`: the padding and
cropping axes (`molfun_jax.data.buckets`), the model's dummy inputs (`molfun_jax.model.dummy_features`)
and the all-zero template of templates-off (`molfun_jax.data.templates.empty_template_features`).
A feature missing from the schema cannot be padded or cropped (an error, never skipped).

Dims are ints (fixed sizes) or names. The names in `padded_dims` are padded with zeros (masks 0)
to a size chosen per dim (a length bucket for N_res, a fixed depth for the MSA / template axes);
`cropped_dim` (N_res) is the one that cropping selects along. Other names (C_tf, C_msa) are
channel widths given by the model config. `N_atom` (a ligand's heavy atoms) is padded to a
ligand atom bucket (`molfun_jax.data.ligand.LigandConfig.buckets`): `pad_features(..., sizes=
{N_ATOM: bucket})`. The ligand features' channel widths are fixed here (`LIGAND_ATOM_DIM`,
`LIGAND_BOND_DIM`); `molfun_jax.data.ligand` checks that its one-hot layout has these widths.

This module depends on numpy only, so that both `molfun_jax.model` and `molfun_jax.data` import it
(the model package never imports the data package).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Iterable, Mapping, Union

import numpy as np

N_RES, N_SEQ, N_EXTRA, N_TEMPL, N_ATOM = "N_res", "N_seq", "N_extra", "N_templ", "N_atom"
C_TF, C_MSA = "C_tf", "C_msa"  # input embedder widths (config `tf_dim`, `msa_dim`)
Dim = Union[int, str]
Features = dict[str, np.ndarray]  # one example's (or a batch's) features by name


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature: numpy dtype, shape (ints and dim names), and whether `AlphaFold` takes it
    (False: used downstream only, e.g. by the affinity head)."""
    dtype: type
    shape: tuple[Dim, ...]
    model_input: bool = True

    def axis(self, dim: str) -> int:
        """Index of `dim` in the shape, -1 if the feature has no such axis."""
        return self.shape.index(dim) if dim in self.shape else -1


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Feature specs by name, the dims padded to given sizes, and the dim that cropping selects."""
    features: Mapping[str, FeatureSpec]
    padded_dims: tuple[str, ...] = (N_RES, N_SEQ, N_EXTRA, N_TEMPL, N_ATOM)
    cropped_dim: str = N_RES

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", MappingProxyType(dict(self.features)))
        if self.cropped_dim not in self.padded_dims:
            raise ValueError(f"cropped dim {self.cropped_dim!r} is not one of the padded dims {self.padded_dims}")

    def with_features(self, **specs: FeatureSpec) -> "FeatureSchema":
        """A copy with `specs` added (or replaced)."""
        return dataclasses.replace(self, features={**self.features, **specs})

    def spec(self, name: str) -> FeatureSpec:
        """The spec of `name`; a clear error for a feature the schema does not declare."""
        if name not in self.features:
            raise KeyError(f"feature {name!r} is not in the feature schema (declare it in "
                           f"molfun_jax/feature_schema.py); known: {sorted(self.features)}")
        return self.features[name]

    def names_with(self, dim: str) -> tuple[str, ...]:
        """The features that have a `dim` axis, in schema order."""
        return tuple(k for k, s in self.features.items() if dim in s.shape)

    @property
    def model_inputs(self) -> tuple[str, ...]:
        """The features `AlphaFold` takes, in schema order."""
        return tuple(k for k, s in self.features.items() if s.model_input)

    def shape(self, name: str, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape of `name` with the named dims taken from `sizes`."""
        spec = self.spec(name)
        missing = [d for d in spec.shape if isinstance(d, str) and d not in sizes]
        if missing:
            raise ValueError(f"feature {name!r} {spec.shape}: no size given for {missing}")
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)

    def zeros(self, names: Iterable[str], sizes: Mapping[str, int]) -> Features:
        """All-zero arrays of the features `names` (each in its dtype)."""
        return {k: np.zeros(self.shape(k, sizes), self.spec(k).dtype) for k in names}


_F, _I = np.float32, np.int32
# ligand atom / bond feature widths: the one-hot blocks of `molfun_jax.data.ligand` (checked there)
LIGAND_ATOM_DIM, LIGAND_BOND_DIM = 45, 7
_TEMPL_RES = (N_TEMPL, N_RES)
FEATURE_SCHEMA = FeatureSchema({
    "aatype": FeatureSpec(_I, (N_RES,)),
    "residue_index": FeatureSpec(_I, (N_RES,)),
    "seq_mask": FeatureSpec(_F, (N_RES,)),
    "target_feat": FeatureSpec(_F, (N_RES, C_TF)),
    "msa_feat": FeatureSpec(_F, (N_SEQ, N_RES, C_MSA)),
    "msa_mask": FeatureSpec(_F, (N_SEQ, N_RES)),
    "extra_msa": FeatureSpec(_I, (N_EXTRA, N_RES)),
    "extra_msa_mask": FeatureSpec(_F, (N_EXTRA, N_RES)),
    "extra_has_deletion": FeatureSpec(_F, (N_EXTRA, N_RES)),
    "extra_deletion_value": FeatureSpec(_F, (N_EXTRA, N_RES)),
    "template_aatype": FeatureSpec(_I, _TEMPL_RES),
    "template_all_atom_positions": FeatureSpec(_F, (*_TEMPL_RES, 37, 3)),
    "template_all_atom_mask": FeatureSpec(_F, (*_TEMPL_RES, 37)),
    "template_mask": FeatureSpec(_F, (N_TEMPL,)),
    "template_pseudo_beta": FeatureSpec(_F, (*_TEMPL_RES, 3)),
    "template_pseudo_beta_mask": FeatureSpec(_F, _TEMPL_RES),
    "template_torsion_angles_sin_cos": FeatureSpec(_F, (*_TEMPL_RES, 7, 2)),
    "template_alt_torsion_angles_sin_cos": FeatureSpec(_F, (*_TEMPL_RES, 7, 2)),
    "template_torsion_angles_mask": FeatureSpec(_F, (*_TEMPL_RES, 7)),
    "atom14_atom_exists": FeatureSpec(_F, (N_RES, 14)),
    "residx_atom14_to_atom37": FeatureSpec(_I, (N_RES, 14)),
    "residx_atom37_to_atom14": FeatureSpec(_I, (N_RES, 37)),
    "atom37_atom_exists": FeatureSpec(_F, (N_RES, 37)),
    "pocket_mask": FeatureSpec(_F, (N_RES,), model_input=False),
    # the complex's pose (protein atoms in the ligand file's frame) and the ligand graph: read by
    # the ligand head (`molfun_jax.heads.ligand`), present only in examples with a ligand
    "all_atom_positions": FeatureSpec(_F, (N_RES, 37, 3), model_input=False),
    "all_atom_mask": FeatureSpec(_F, (N_RES, 37), model_input=False),
    "ligand_atom_feat": FeatureSpec(_F, (N_ATOM, LIGAND_ATOM_DIM), model_input=False),
    "ligand_bond_feat": FeatureSpec(_F, (N_ATOM, N_ATOM, LIGAND_BOND_DIM), model_input=False),
    "ligand_positions": FeatureSpec(_F, (N_ATOM, 3), model_input=False),
    "ligand_mask": FeatureSpec(_F, (N_ATOM,), model_input=False),
    "ligand_bond_orders_known": FeatureSpec(_F, (), model_input=False),
})
