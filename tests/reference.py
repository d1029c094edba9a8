"""Helpers for parity tests against the OpenFold reference (tools/install_openfold_reference.sh)."""
from __future__ import annotations

import importlib.util  # noqa: F401  (openfold.config uses importlib.util without importing it)
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("openfold", reason="OpenFold reference missing: run tools/install_openfold_reference.sh")

from convert.torch_to_flax import state_dict_to_tree  # noqa: E402

# (what, max abs error, rel. error, rel. error over all positions as before masks), for the report
PARITY: list[tuple[str, float, float, float]] = []


def randomize_(module: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Overwrite every parameter with non-zero random values (OpenFold's default init zeroes
    output layers and gates, which would hide bugs). Scales keep deep stacks finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def flax_params(module: "torch.nn.Module") -> dict:
    """A torch module's parameters as our Flax param tree (through the converter's table)."""
    return state_dict_to_tree(module.state_dict())


def to_torch(x: Any, dtype=None) -> "torch.Tensor":
    t = torch.from_numpy(np.array(x))
    return t if dtype is None else t.to(dtype)


def valid_positions(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean array of `shape` from a 0/1 mask over its leading axes (e.g. `[N_seq, N_res]`
    for `[N_seq, N_res, C]`, or `[N_res, N_res]` for a pair tensor); None: every position."""
    if mask is None:
        return np.ones(shape, bool)
    m = np.asarray(mask.detach().numpy() if hasattr(mask, "detach") else mask) > 0
    m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
    return np.broadcast_to(m, shape)


def rel_error(ours: Any, ref: Any, mask: Any = None) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|) over the valid positions of `mask` (see
    `valid_positions`): padded positions hold values no one reads, and can be large (the outer
    product mean's bias / 1e-3 at padded pairs), which would loosen the relative figure."""
    a = np.asarray(ours, dtype=np.float64)
    b = ref.detach().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    valid = valid_positions(mask, a.shape)
    a, b = a[valid], b[valid]
    assert np.all(np.isfinite(a)), "non-finite values in our output"
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return err, err / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)


def assert_parity(what: str, ours: Any, ref: Any, rtol: float = 1e-5, mask: Any = None) -> None:
    """Assert rel. error (max abs error / max |ref|, valid positions of `mask` only) <= rtol, and
    record it for the report."""
    err, rel = rel_error(ours, ref, mask)
    PARITY.append((what, err, rel, rel if mask is None else rel_error(ours, ref)[1]))
    assert rel <= rtol, f"{what}: max abs error {err:.3e}, rel. error {rel:.3e} > {rtol:.0e}"


def padded_mask(shape: tuple[int, ...], n_valid: int, axis: int = -1) -> np.ndarray:
    """A 0/1 float mask of `shape` whose last entries along `axis` (beyond n_valid) are padding."""
    m = np.ones(shape, np.float32)
    idx = [slice(None)] * len(shape)
    idx[axis] = slice(n_valid, None)
    m[tuple(idx)] = 0.0
    return m


def openfold_data():
    """OpenFold's data modules (`protein`, `mmcif_parsing`, `data_pipeline`, `feature_pipeline`,
    `data_transforms`, `config`), made importable on this install: NumPy 2 dropped `np.object`
    (used by openfold.data.templates) and Biopython >= 1.82 dropped `Bio.Data.SCOPData` (used by
    openfold.data.mmcif_parsing); its `protein_letters_3to1` lives on, unchanged, as
    `Bio.Data.PDBData.protein_letters_3to1_extended`."""
    import sys
    import types

    import Bio.Data
    from Bio.Data import PDBData

    if "object" not in vars(np):
        np.object = object  # type: ignore[attr-defined]
    if "Bio.Data.SCOPData" not in sys.modules:
        scop = types.ModuleType("Bio.Data.SCOPData")
        scop.protein_letters_3to1 = PDBData.protein_letters_3to1_extended
        sys.modules["Bio.Data.SCOPData"] = scop
        Bio.Data.SCOPData = scop
    from openfold import config
    from openfold.data import data_pipeline, data_transforms, feature_pipeline, mmcif_parsing
    from openfold.np import protein
    return types.SimpleNamespace(protein=protein, mmcif_parsing=mmcif_parsing, data_pipeline=data_pipeline,
                                 feature_pipeline=feature_pipeline, data_transforms=data_transforms,
                                 config=config)
