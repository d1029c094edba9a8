"""OpenFold v1 state dict <-> molfun_jax Flax param tree.

Our param paths are OpenFold's module names (DESIGN.md section 2), so the mapping is this table:

| OpenFold key                               | Flax path                                   | value        |
| ------------------------------------------ | ------------------------------------------- | ------------ |
| `<...>.weight` (2-D, a Linear)             | `<...>/kernel`                              | transposed   |
| `<...>.weight` (1-D, a LayerNorm)          | `<...>/scale`                               | as is        |
| `<...>.bias`, other leaves (`head_weights`)| same name                                   | as is        |
| `<stack>.blocks.<i>.<rest>`                | `<stack>/blocks/<rest>`, index i of axis 0  | stacked      |
| `<...>.layers.<i>.<rest>` (ModuleList)     | `<...>/layers_<i>/<rest>`                   | (Flax lists) |

Both directions are total: an unused key or an unfilled / mis-shaped param raises, listing them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

Tree = dict

_INDEX = re.compile(r"^\d+$")


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through float32)
        t = t.detach().cpu()
        return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    return np.asarray(t)


def key_to_path(key: str, ndim: int) -> tuple[tuple[str, ...], int | None, bool]:
    """OpenFold key -> (Flax path, stack index or None, transpose?)."""
    parts = key.split(".")
    path: list[str] = []
    index = None
    for p in parts[:-1]:
        if _INDEX.match(p):
            if path[-1] == "blocks":
                index = int(p)
            else:
                path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    leaf = parts[-1]
    transpose = False
    if leaf == "weight":
        leaf, transpose = ("kernel", True) if ndim == 2 else ("scale", False)
    return tuple(path) + (leaf,), index, transpose


def path_to_key(path: tuple[str, ...], index: int | None) -> tuple[str, bool]:
    """Flax path (+ stack index) -> (OpenFold key, transpose?). Inverse of `key_to_path`."""
    out: list[str] = []
    for p in path[:-1]:
        m = re.match(r"^(.*)_(\d+)$", p)
        if m and m.group(1) == "layers":
            out += [m.group(1), m.group(2)]
        else:
            out.append(p)
        if p == "blocks" and index is not None:
            out.append(str(index))
    leaf = path[-1]
    transpose = leaf == "kernel"
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join(out + [leaf]), transpose


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Tree:
    tree: Tree = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _is_stacked(path: tuple[str, ...]) -> bool:
    return "blocks" in path[:-1]


def state_dict_to_tree(state_dict: Mapping[str, Any]) -> Tree:
    """Convert an OpenFold (sub)module state dict to a nested param dict (no checks)."""
    flat: dict[tuple[str, ...], Any] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for key, t in state_dict.items():
        a = _to_numpy(t)
        path, index, transpose = key_to_path(key, a.ndim)
        a = np.ascontiguousarray(a.T) if transpose else a
        if index is None:
            flat[path] = a
        else:
            stacks.setdefault(path, {})[index] = a
    for path, per_block in stacks.items():
        n = max(per_block) + 1
        missing = sorted(set(range(n)) - set(per_block))
        if missing:
            raise ValueError(f"{'.'.join(path)}: blocks {missing} missing from the state dict")
        flat[path] = np.stack([per_block[i] for i in range(n)])
    return _unflatten(flat)


def tree_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `state_dict_to_tree`: nested params -> OpenFold state dict of numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for path, v in _flatten(params).items():
        a = np.asarray(v)
        blocks = [None] if not _is_stacked(path) else list(range(a.shape[0]))
        for i in blocks:
            key, transpose = path_to_key(path, i)
            x = a if i is None else a[i]
            out[key] = np.ascontiguousarray(x.T) if transpose else x
    return out


def check_tree(params: Mapping, expected: Mapping, what: str = "state dict") -> None:
    """Raise if `params` and `expected` (a tree of shapes/arrays) differ in paths or shapes."""
    got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
    want = {k: tuple(getattr(v, "shape", v)) for k, v in _flatten(expected).items()}
    unused = sorted(set(got) - set(want))
    unfilled = sorted(set(want) - set(got))
    bad = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    if unused or unfilled or bad:
        lines = [f"{what} does not match the model config:"]
        for p in unused[:20]:
            key = path_to_key(p, 0 if _is_stacked(p) else None)[0]
            lines.append(f"  unused: {key} {got[p]}")
        for p in unfilled[:20]:
            lines.append(f"  unfilled: {'/'.join(p)} {want[p]}")
        for p in bad[:20]:
            lines.append(f"  shape mismatch: {'/'.join(p)} got {got[p]}, model wants {want[p]}")
        n = len(unused) + len(unfilled) + len(bad)
        if n > 60:
            lines.append(f"  ... {n} problems in all")
        raise ValueError("\n".join(lines))
