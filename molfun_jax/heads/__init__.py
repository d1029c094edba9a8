"""Task heads on top of the AlphaFold trunk."""
from molfun_jax.heads.affinity import AffinityHead, HeadConfig, TargetNorm, affinity_loss
from molfun_jax.heads.ligand import LIGAND_HEAD_INPUT_KEYS, LigandAffinityHead, LigandHeadConfig, radial_basis

__all__ = ["AffinityHead", "HeadConfig", "LIGAND_HEAD_INPUT_KEYS", "LigandAffinityHead", "LigandHeadConfig",
           "TargetNorm", "affinity_loss", "radial_basis"]
