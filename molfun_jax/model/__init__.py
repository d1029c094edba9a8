"""Flax AlphaFold2 (OpenFold v1.0 layout). `AlphaFold` is imported lazily to keep
`molfun_jax.model.primitives` importable on its own."""


def __getattr__(name: str):
    if name in ("AlphaFold", "dummy_features", "param_shapes"):
        from molfun_jax.model import model
        return getattr(model, name)
    raise AttributeError(f"module 'molfun_jax.model' has no attribute {name!r}")
