"""Task heads on top of the AlphaFold trunk."""
from molfun_jax.heads.affinity import AffinityHead, HeadConfig, TargetNorm, affinity_loss

__all__ = ["AffinityHead", "HeadConfig", "TargetNorm", "affinity_loss"]
