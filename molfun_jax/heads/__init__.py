"""Task heads on top of the AlphaFold trunk (`registry`: the heads by kind)."""
from molfun_jax.heads.affinity import AffinityHead, HeadConfig, TargetNorm, affinity_loss
from molfun_jax.heads.ligand import LIGAND_HEAD_INPUT_KEYS, LigandAffinityHead, LigandHeadConfig, radial_basis
from molfun_jax.heads.registry import (ALL_HEAD_INPUT_KEYS, HEADS, HeadKind, dummy_head_inputs, head_config_from_dict,
                                       head_inputs, head_kind, make_head, register_head)

__all__ = ["ALL_HEAD_INPUT_KEYS", "AffinityHead", "HEADS", "HeadConfig", "HeadKind", "LIGAND_HEAD_INPUT_KEYS",
           "LigandAffinityHead", "LigandHeadConfig", "TargetNorm", "affinity_loss", "dummy_head_inputs",
           "head_config_from_dict", "head_inputs", "head_kind", "make_head", "radial_basis", "register_head"]
