"""OpenFold v1 state dict <-> molfun_jax Flax param tree.

Our param paths are OpenFold's module names (docs/architecture.md, "Conventions"), so the mapping is this table:

| OpenFold key                               | Flax path                                   | value        |
| ------------------------------------------ | ------------------------------------------- | ------------ |
| `<...>.weight` (2-D, a Linear)             | `<...>/kernel`                              | transposed   |
| `<...>.weight` (1-D, a LayerNorm)          | `<...>/scale`                               | as is        |
| `<...>.bias`, other leaves (`head_weights`)| same name                                   | as is        |
| `<stack>.blocks.<i>.<rest>`                | `<stack>/blocks/<rest>`, index i of axis 0  | stacked      |
| `<...>.layers.<i>.<rest>` (ModuleList)     | `<...>/layers_<i>/<rest>`                   | (Flax lists) |

Both directions are total: an unused key or an unfilled / mis-shaped param raises, listing them.

Real files come wrapped (`{"ema": {"params": sd}}`, Lightning `{"state_dict": {"model.<key>": ...}}`,
`module.` prefixes) and in OpenFold v1 or v2 key layouts; `unwrap` and `to_v1_layout` normalise them.

`molfun_jax.pretrained.convert_file` turns a `.pt` into a converted folder (the CLI is
`convert/torch_to_flax.py`). torch is imported only to read the `.pt` file.
"""
from __future__ import annotations

import re
from pathlib import Path
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
            key, transpose = path_to_key(p, 0 if _is_stacked(p) else None)
            shape = got[p][1:] if _is_stacked(p) else got[p]
            lines.append(f"  unused: {key} {shape[::-1] if transpose else shape}")
        for p in unfilled[:20]:
            lines.append(f"  unfilled: {'/'.join(p)} {want[p]}")
        for p in bad[:20]:
            lines.append(f"  shape mismatch: {'/'.join(p)} got {got[p]}, model wants {want[p]}")
        n = len(unused) + len(unfilled) + len(bad)
        if n > 60:
            lines.append(f"  ... {n} problems in all")
        raise ValueError("\n".join(lines))


# OpenFold v2's `convert_deprecated_v1_keys` rules (v1 -> v2), applied in reverse to read v2 files.
# v2 also moved every `template_*` module under `template_embedder.`.
V1_TO_V2 = {
    "template_angle_embedder": "template_single_embedder",
    "core.msa_transition": "msa_transition",
    "core.outer_product_mean": "outer_product_mean",
    "core.tri_": "pair_stack.tri_",
    "core.pair_transition": "pair_stack.pair_transition",
    "ipa.linear_q_points": "ipa.linear_q_points.linear",
    "ipa.linear_kv_points": "ipa.linear_kv_points.linear",
}
_V1_RE = re.compile("|".join(map(re.escape, V1_TO_V2)))
_V2_RE = re.compile("|".join(map(re.escape, V1_TO_V2.values())))
_V2_TO_V1 = {v: k for k, v in V1_TO_V2.items()}


def v1_to_v2_key(key: str) -> str:
    """OpenFold's own v1 -> v2 renaming of one key."""
    new = _V1_RE.sub(lambda m: V1_TO_V2[m.group(0)], key)
    return f"template_embedder.{new}" if new.startswith("template_") else new


def is_v2_layout(keys: Any) -> bool:
    return any(k.startswith("template_embedder.") or ".pair_stack." in k or "linear_q_points.linear" in k
               or (k.startswith("evoformer.blocks.") and ".msa_transition." in k and ".core." not in k)
               for k in keys)


def to_v1_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map a v2-layout state dict to v1 keys (v1 input is returned unchanged: the rules are not
    idempotent, so the layout is detected first)."""
    if not is_v2_layout(state_dict):
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = k[len("template_embedder."):] if k.startswith("template_embedder.") else k
        out[_V2_RE.sub(lambda m: _V2_TO_V1[m.group(0)], k)] = v
    return out


def unwrap(obj: Any, source: str = "state dict") -> dict[str, Any]:
    """Find the model state dict inside the containers real checkpoints come in."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: not an OpenFold checkpoint (a {type(obj).__name__}, not a dict of tensors)")
    if "ema" in obj and isinstance(obj["ema"], Mapping) and "params" in obj["ema"]:
        obj = obj["ema"]["params"]  # OpenFold training checkpoints: EMA weights are the ones to use
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "model."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    if not any(k.startswith("evoformer.") for k in sd):
        sample = ", ".join(list(sd)[:5]) or "no keys"
        raise ValueError(f"{source}: not an OpenFold AlphaFold checkpoint (no 'evoformer.*' weights; found {sample})")
    bad = [k for k, v in sd.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {bad[:5]}")
    return sd


def guess_preset(state_dict: Mapping[str, Any]) -> str:
    """The OpenFold preset family a (v1) state dict looks like, for error messages."""
    templ = any(k.startswith("template_") for k in state_dict)
    ptm = any(k.startswith("aux_heads.tm.") for k in state_dict)
    n = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("evoformer.blocks.")), default=-1)
    return f"{'model_1/2' if templ else 'model_3/4/5'}{'_ptm' if ptm else ''}, {n} Evoformer blocks"


def torch_to_flax(state_dict: Mapping[str, Any], config: Any) -> dict:
    """OpenFold state dict (v1 or v2 layout, wrapped or not) -> our params for `config`."""
    from molfun_jax.model import param_shapes

    sd = to_v1_layout(unwrap(state_dict))
    params = state_dict_to_tree(sd)
    try:
        check_tree(params, param_shapes(config))
    except ValueError as e:
        raise ValueError(f"{e}\n(the checkpoint looks like {guess_preset(sd)})") from None
    return params


def flax_to_torch(params: Mapping, config: Any) -> dict[str, Any]:
    """Our params -> OpenFold v1 state dict of torch tensors (checked against `config`)."""
    import torch
    from molfun_jax.model import param_shapes

    check_tree(params, param_shapes(config), what="params")
    return {k: torch.from_numpy(v) for k, v in tree_to_state_dict(params).items()}


def load_torch_checkpoint(path: str | Path) -> Any:
    """torch.load a `.pt` safely (weights only), with clear errors for bad files."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the PyTorch file: truncated or corrupt ({str(e).splitlines()[0]})") from None
