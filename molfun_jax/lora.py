"""LoRA adapters as their own pytree (docs/architecture.md).

The adapters live in the Flax collection `lora`, at the same path as the Dense they adapt:
`lora['evoformer']['blocks']['msa_att_row']['mha']['linear_q'] = {a, b, scale[, dropout]}`, and
`primitives.Linear` adds `scale * (dropout(x) @ a) @ b` to its output (without dropout as one
matmul over W + `delta`, the kernel `merge` writes). Adapters of a scanned stack
carry the block axis first, like the params: `a [48, in, r]`, `b [48, r, out]`, `scale [48]`.
`a` is uniform in +-1/sqrt(in) (PEFT's kaiming-uniform with a=sqrt(5)) and `b` is zero, so at
step 0 the adapted model is the base model exactly. `scale = alpha / rank` and `dropout` (the
LoRA dropout rate, only present when > 0) are frozen leaves; only `a` and `b` are trained.

Targets: `linear_q`, `linear_k`, `linear_v`, `linear_o`, `linear_g` select those projections of
the attention modules (`mha` / `global_attention`) of the chosen stacks: for the Evoformer, the
MSA row and column attention and both triangle attentions of every block. `msa_transition` and
`pair_transition` select both Linears of those transitions. Stacks: `evoformer` (default),
`extra_msa_stack`, `template_pair_stack`.

At `model_1_ptm`, rank 8 on q and v of the Evoformer: per block 2 x 8 x (256+256) for each of the
two MSA attentions plus 2 x 8 x (128+128) for each triangle attention = 24,576; x 48 = 1,179,648.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

Array = jax.Array
Tree = Mapping[str, Any]

ATTENTION_TARGETS = ("linear_q", "linear_k", "linear_v", "linear_o", "linear_g")
TRANSITION_TARGETS = ("msa_transition", "pair_transition")
STACKS = ("evoformer", "extra_msa_stack", "template_pair_stack")
_ATTENTION_MODULES = ("mha", "global_attention")
TRAINED_LEAVES = ("a", "b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("linear_q", "linear_v")
    stacks: tuple[str, ...] = ("evoformer",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "stacks", tuple(self.stacks))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in ATTENTION_TARGETS + TRANSITION_TARGETS]
        if bad or not self.target_modules:
            raise ValueError(f"LoRA target_modules {list(self.target_modules)}: choose among "
                             f"{list(ATTENTION_TARGETS + TRANSITION_TARGETS)}")
        bad = [s for s in self.stacks if s not in STACKS]
        if bad or not self.stacks:
            raise ValueError(f"LoRA stacks {list(self.stacks)}: choose among {list(STACKS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"], d["stacks"] = list(self.target_modules), list(self.stacks)
        return d


def _is_target(module_path: tuple[str, ...], cfg: LoRAConfig) -> bool:
    if len(module_path) < 3 or module_path[0] not in cfg.stacks or module_path[1] != "blocks":
        return False
    name, parent = module_path[-1], module_path[-2]
    if parent in _ATTENTION_MODULES:
        return name in cfg.target_modules
    return parent in cfg.target_modules and name.startswith("linear")


def target_kernels(params: Tree, cfg: LoRAConfig) -> dict[tuple[str, ...], Any]:
    """{module path: kernel} of every Dense that `cfg` adapts (leaves may be ShapeDtypeStructs)."""
    flat = traverse_util.flatten_dict(params)
    out = {p[:-1]: k for p, k in flat.items() if p[-1] == "kernel" and _is_target(p[:-1], cfg)}
    if not out:
        raise ValueError(f"LoRA {cfg.to_dict()} matches no Dense of the model (is the stack enabled?)")
    return out


def init_lora(params: Tree, cfg: LoRAConfig, rng: Array) -> dict:
    """The adapter tree for `params` (works under `jax.eval_shape`)."""
    targets = target_kernels(params, cfg)
    flat = {}
    for key, (path, kernel) in zip(jax.random.split(rng, len(targets)), sorted(targets.items())):
        *lead, d_in, d_out = kernel.shape
        lead = tuple(lead)
        bound = 1.0 / math.sqrt(d_in)
        flat[path + ("a",)] = jax.random.uniform(key, lead + (d_in, cfg.rank), jnp.float32, -bound, bound)
        flat[path + ("b",)] = jnp.zeros(lead + (cfg.rank, d_out), jnp.float32)
        flat[path + ("scale",)] = jnp.full(lead, cfg.scale, jnp.float32)
        if cfg.dropout > 0:
            flat[path + ("dropout",)] = jnp.full(lead, cfg.dropout, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def count_lora_params(lora: Tree) -> int:
    """Number of trained adapter parameters (a and b; scale and dropout are frozen constants)."""
    return sum(math.prod(v.shape) for p, v in traverse_util.flatten_dict(lora).items() if p[-1] in TRAINED_LEAVES)


def _adapters(lora: Tree) -> dict[tuple[str, ...], dict[str, Array]]:
    flat = traverse_util.flatten_dict(lora)
    out: dict[tuple[str, ...], dict[str, Array]] = {}
    for p, v in flat.items():
        out.setdefault(p[:-1], {})[p[-1]] = v
    return out


def delta(adapter: Mapping[str, Array]) -> Array:
    """scale * a @ b, [*, in, out] in float32 (full-precision matmul)."""
    ab = jnp.matmul(adapter["a"], adapter["b"], precision=jax.lax.Precision.HIGHEST)
    return adapter["scale"][..., None, None] * ab


def merge(params: Tree, lora: Tree, return_base: bool = False) -> Any:
    """A new params tree with every adapted kernel W replaced by W + scale * a @ b (the model
    then needs no `lora` collection; LoRA dropout, a training-only op, disappears).

    With `return_base=True` returns `(merged, base)` where `base` holds only the kernels that were
    overwritten (same nested paths), which `unmerge` uses to restore them bit-exactly.
    """
    flat = traverse_util.flatten_dict(params)
    base = {}
    for path, adapter in _adapters(lora).items():
        w = flat[path + ("kernel",)]
        base[path + ("kernel",)] = w
        flat[path + ("kernel",)] = (w + delta(adapter)).astype(w.dtype)
    merged = traverse_util.unflatten_dict(flat)
    return (merged, traverse_util.unflatten_dict(base)) if return_base else merged


def unmerge(merged: Tree, lora: Tree, base: Optional[Tree] = None) -> dict:
    """The inverse of `merge`.

    With `base` (from `merge(..., return_base=True)`) the result is bit-identical to the params
    before merging: the overwritten kernels are put back. Without it, each kernel is computed as
    W' - scale * a @ b, equal to W only up to float32 rounding: fl(fl(W + D) - D) != W wherever
    |D| is large against |W| (the low bits of W were rounded away in W'), so no subtraction can be
    bit-exact there; the error is at most about one ulp of |W'| per element.
    """
    flat = traverse_util.flatten_dict(merged)
    adapters = _adapters(lora)
    if base is not None:
        flat_base = traverse_util.flatten_dict(base)
        if set(flat_base) != {p + ("kernel",) for p in adapters}:
            raise ValueError("unmerge: `base` does not hold exactly the kernels that the adapters merged")
        flat.update(flat_base)
    else:
        for path, adapter in adapters.items():
            w = flat[path + ("kernel",)]
            flat[path + ("kernel",)] = (w - delta(adapter)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)
