"""Fine-tuning strategies as data (docs/architecture.md, "Strategies").

The model's variables are one plain pytree

    variables = {'trunk': <AlphaFold params>, 'head': <AffinityHead params>, 'lora': <adapters or {}>}

A strategy assigns each leaf a `Rule` (its optimizer label, e.g. 'head', 'lora', 'trunk',
'blocks', 'embedder', 'structure_module') or leaves it frozen; `Strategy.plan(variables)` turns
that into a `Plan` that splits the variables into a trainable and a frozen subtree, puts them back
together, and builds the optimizer: `optax.multi_transform` of one AdamW-style chain per label
(Adam, decoupled weight decay on kernels and LoRA factors only -- never on biases, LayerNorm
scales or other 1-D leaves --, the label's schedule), behind a global-norm clip.

* `HeadOnly`: the head.
* `LoRA`: the head and the adapters' `a`, `b` (see `molfun_jax.lora`).
* `Partial`: the head, the last `unfreeze_last_n` Evoformer blocks and the stack's output
  projection `evoformer/linear` (it sits between those blocks and the head), and the structure
  module with `unfreeze_structure_module` (which needs a head reading the structure module's
  single representation, else it gets no gradient: a ValueError). The Evoformer params are one
  scanned stack `[no_blocks, ...]`;
  the trainable subtree holds the slices `[no_blocks - n:]` of its leaves and the frozen subtree
  the slices `[:no_blocks - n]`, concatenated back on the block axis inside the step. Frozen
  blocks are never differentiated or updated, so they stay bit-identical by construction, and the
  optimizer state holds only the unfrozen blocks (a mask multiplying updates by 0 would keep Adam
  state for all blocks and is not bit-safe: -0.0 + 0.0 = +0.0).
* `Full`: every parameter the affinity loss reaches: Evoformer block i gets
  `lr * layer_lr_decay**(no_blocks - 1 - i)` (a per-block factor on the block axis),
  `evoformer/linear` gets `lr`, the embedders and the template / extra-MSA stacks (all below
  block 0) `lr_embedder` (default `lr * layer_lr_decay**no_blocks`), the structure module
  `lr_structure_module` (default `lr`) when the head reads it. The auxiliary heads (pLDDT,
  distogram, ...) never receive a gradient from the affinity loss and stay frozen (weight decay
  alone would only shrink them), as does the structure module when the head reads the
  Evoformer's single representation (the default).

Head LR defaults to 10x the trunk / LoRA LR (`lr_head=None`): LoRA 1e-4 -> 1e-3 (the value of
Molfun, the PyTorch original), Partial 1e-5 -> 1e-4 and Full 1e-5 -> 1e-4 (Molfun used 1e-3 there;
we follow the 10x rule). HeadOnly trains only the head, at `lr` (1e-3).

A strategy class describes itself, and the CLI and the API read that: `name`, `lr_field` (the
field `--lr` sets), `structural` (fields that change which parameters exist or train, checked on
load and resume), `options` (its own CLI flags), `describe()` (the one-line detail), and its
validation in `__post_init__` (`StrategyError` names the field). `register_strategy` adds a new
class to `STRATEGIES`, after which `--strategy NAME`, `strategy_from_dict` and checkpoints know it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from molfun_jax.heads.affinity import SOURCES
from molfun_jax.lora import TRAINED_LEAVES, LoRAConfig
from molfun_jax.training.schedules import SCHEDULERS, layer_decay_factors, make_schedule

Path = tuple[str, ...]
HEAD_LR_FACTOR = 10.0
# trunk parts below the Evoformer (Full: `lr_embedder`)
EMBEDDERS = ("input_embedder", "recycling_embedder", "template_angle_embedder", "template_pair_embedder",
             "template_pair_stack", "template_pointwise_att", "extra_msa_embedder", "extra_msa_stack")
DECAYED_LEAVES = ("kernel",) + TRAINED_LEAVES  # AdamW weight decay only on matrices
BLOCKS: Path = ("trunk", "evoformer", "blocks")


class StrategyError(ValueError):
    """An invalid strategy field: `field` and `why` (the CLI turns `field` into its flag)."""

    def __init__(self, field: str, why: str) -> None:
        self.field, self.why = field, why
        super().__init__(f"{field} {why}")


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise StrategyError(field, why)


@dataclasses.dataclass(frozen=True)
class Option:
    """A strategy's own CLI flag `--{flag}` that sets its field `field` (default: the field's)."""
    flag: str
    field: str
    type: Callable[[str], Any]
    help: str

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a trainable leaf is optimised: its label and, for leaves on the Evoformer block axis,
    the first trained block (`start`; 0 = all)."""
    label: str
    start: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """Options shared by every strategy (defaults = those of Molfun, the PyTorch original)."""
    name: ClassVar[str] = ""
    lr_field: ClassVar[str] = "lr"  # the field `--lr` sets
    structural: ClassVar[tuple[str, ...]] = ()  # fields beyond `name` checked on load / resume
    options: ClassVar[tuple[Option, ...]] = ()  # the strategy's own CLI flags
    warmup_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.0
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    amp: bool = True
    early_stopping_patience: int = 0
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        _check(self.scheduler in SCHEDULERS, "scheduler", f"must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay",
               f"is an EMA decay in [0, 1) (0 = off, e.g. 0.999), got {self.ema_decay}")
        _check(self.accumulation_steps >= 1, "accumulation_steps", f"must be >= 1, got {self.accumulation_steps}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.early_stopping_patience >= 0, "early_stopping_patience",
               f"must be >= 0 (0 = off), got {self.early_stopping_patience}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for k, v in dataclasses.asdict(self).items():
            _check(not k.startswith("lr") or v is None or v > 0, k, f"must be > 0, got {v}")

    @classmethod
    def structural_fields(cls) -> tuple[str, ...]:
        """The fields that change which parameters exist / are trained (checked on load and resume)."""
        return ("name",) + cls.structural

    @classmethod
    def default_lr(cls) -> float:
        return next(f.default for f in dataclasses.fields(cls) if f.name == cls.lr_field)

    def describe(self) -> str:
        """What the strategy trains, in a few words beyond its name ('' = nothing to add)."""
        return ""

    def check_blocks(self, no_blocks: int) -> None:
        """Refuse settings that do not fit an Evoformer of `no_blocks` blocks (StrategyError)."""

    # --- what each strategy defines -------------------------------------------------------
    def rule(self, path: Path, no_blocks: int, head_source: str) -> Optional[Rule]:
        """The rule of the leaf at `path` of the variables, None when frozen."""
        raise NotImplementedError

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        """Peak LR of each label."""
        raise NotImplementedError

    def block_factors(self, label: str, no_blocks: int) -> Optional[np.ndarray]:
        """Per-block LR multipliers [no_blocks] for a label on the block axis (None = uniform)."""
        return None

    def lora_config(self) -> Optional[LoRAConfig]:
        return None

    # ---------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> str:
        """The model's `globals.dtype` under this strategy (`amp` -> bfloat16)."""
        return "bfloat16" if self.amp else "float32"

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, **dataclasses.asdict(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def plan(self, variables: Mapping[str, Any], head_source: str = "evoformer") -> "Plan":
        """Resolve the rules on a variables tree (arrays or ShapeDtypeStructs)."""
        if head_source not in SOURCES:
            raise ValueError(f"head_source={head_source!r}; choose one of {SOURCES}")
        flat = traverse_util.flatten_dict(variables)
        block_leaves = [v for p, v in flat.items() if p[:3] == BLOCKS]
        if not block_leaves:
            raise ValueError("variables['trunk'] has no Evoformer stack (evoformer/blocks)")
        no_blocks = int(block_leaves[0].shape[0])
        rules = {p: r for p in flat if (r := self.rule(p, no_blocks, head_source)) is not None}
        if not rules:
            raise ValueError(f"{type(self).__name__} trains nothing in these variables")
        return Plan(self, rules, no_blocks)


def _head(path: Path) -> Optional[Rule]:
    return Rule("head") if path[0] == "head" else None


def _head_lr(lr_head: Optional[float], base: float) -> float:
    return HEAD_LR_FACTOR * base if lr_head is None else lr_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadOnly(Strategy):
    """Train the affinity head on a frozen trunk (trunk outputs can be cached)."""
    name: ClassVar[str] = "head_only"
    lr: float = 1e-3

    def rule(self, path: Path, no_blocks: int, head_source: str) -> Optional[Rule]:
        return _head(path)

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        return {"head": self.lr}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Strategy):
    """Low-rank adapters on the trunk's attention projections + the head."""
    name: ClassVar[str] = "lora"
    lr_field: ClassVar[str] = "lr_lora"
    structural: ClassVar[tuple[str, ...]] = ("rank", "alpha", "target_modules", "stacks")
    options: ClassVar[tuple[Option, ...]] = (
        Option("lora-rank", "rank", int, "LoRA rank, on q and v of the Evoformer (default 8)"),)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("linear_q", "linear_v")
    stacks: tuple[str, ...] = ("evoformer",)
    lr_lora: float = 1e-4
    lr_head: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "stacks", tuple(self.stacks))
        super().__post_init__()
        _check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        self.lora_config()  # validates the rest

    def describe(self) -> str:
        return f"rank {self.rank}, {', '.join(self.target_modules)}"

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=self.target_modules, stacks=self.stacks)

    def rule(self, path: Path, no_blocks: int, head_source: str) -> Optional[Rule]:
        if path[0] == "lora" and path[-1] in TRAINED_LEAVES:
            return Rule("lora")
        return _head(path)

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        return {"lora": self.lr_lora, "head": _head_lr(self.lr_head, self.lr_lora)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Partial(Strategy):
    """Unfreeze the last N Evoformer blocks (+ `evoformer/linear`, optionally the structure
    module) and train them with the head."""
    name: ClassVar[str] = "partial"
    lr_field: ClassVar[str] = "lr_trunk"
    structural: ClassVar[tuple[str, ...]] = ("unfreeze_last_n", "unfreeze_structure_module")
    options: ClassVar[tuple[Option, ...]] = (
        Option("unfreeze-blocks", "unfreeze_last_n", int,
               "partial: the last N Evoformer blocks are trained (default 4)"),)
    unfreeze_last_n: int = 4
    unfreeze_structure_module: bool = False
    lr_trunk: float = 1e-5
    lr_head: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.unfreeze_last_n >= 1 or self.unfreeze_structure_module, "unfreeze_last_n",
               f"must be >= 1, got {self.unfreeze_last_n}")

    def describe(self) -> str:
        return f"last {self.unfreeze_last_n} Evoformer blocks"

    def check_blocks(self, no_blocks: int) -> None:
        _check(self.unfreeze_last_n <= no_blocks, "unfreeze_last_n",
               f"{self.unfreeze_last_n}: the Evoformer has {no_blocks} blocks")

    def rule(self, path: Path, no_blocks: int, head_source: str) -> Optional[Rule]:
        self.check_blocks(no_blocks)
        if self.unfreeze_structure_module and head_source != "structure_module":
            raise ValueError("unfreeze_structure_module=True needs a head that reads the structure module "
                             "(HeadConfig(source='structure_module')): with source='evoformer' it gets no gradient")
        n = self.unfreeze_last_n
        if path[:3] == BLOCKS and n:
            return Rule("trunk", start=no_blocks - n)
        if path[:3] == ("trunk", "evoformer", "linear") and n:
            return Rule("trunk")
        if path[:2] == ("trunk", "structure_module") and self.unfreeze_structure_module:
            return Rule("trunk")
        return _head(path)

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        return {"trunk": self.lr_trunk, "head": _head_lr(self.lr_head, self.lr_trunk)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Full(Strategy):
    """Train the whole trunk with layer-wise LR decay, and the head."""
    name: ClassVar[str] = "full"
    lr: float = 1e-5
    layer_lr_decay: float = 0.95
    lr_embedder: Optional[float] = None
    lr_structure_module: Optional[float] = None
    lr_head: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 < self.layer_lr_decay <= 1.0, "layer_lr_decay", f"must be in (0, 1], got {self.layer_lr_decay}")

    def describe(self) -> str:
        return f"layer LR decay {self.layer_lr_decay}"

    def rule(self, path: Path, no_blocks: int, head_source: str) -> Optional[Rule]:
        if path[0] != "trunk":
            return _head(path)
        if path[:3] == BLOCKS:
            return Rule("blocks")
        if path[:2] == ("trunk", "evoformer"):
            return Rule("trunk")
        if path[1] in EMBEDDERS:
            return Rule("embedder")
        if path[1] == "structure_module" and head_source == "structure_module":
            return Rule("structure_module")
        return None  # aux_heads; the structure module when the head reads the Evoformer

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        return {"blocks": self.lr, "trunk": self.lr,
                "embedder": self.lr * self.layer_lr_decay ** no_blocks if self.lr_embedder is None
                else self.lr_embedder,
                "structure_module": self.lr if self.lr_structure_module is None else self.lr_structure_module,
                "head": _head_lr(self.lr_head, self.lr)}

    def block_factors(self, label: str, no_blocks: int) -> Optional[np.ndarray]:
        return layer_decay_factors(no_blocks, self.layer_lr_decay) if label == "blocks" else None


S = TypeVar("S", bound=type[Strategy])
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: S) -> S:
    """Class decorator: make a Strategy subclass known by its `name` (CLI `--strategy`,
    `strategy_from_dict`, checkpoints). A name already taken by another class is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Strategy subclass with a `name`")
    if STRATEGIES.get(cls.name, cls) is not cls:
        raise ValueError(f"strategy name {cls.name!r} is taken by {STRATEGIES[cls.name].__qualname__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [f for f in (cls.lr_field, *cls.structural, *(o.field for o in cls.options)) if f not in fields]
    if missing:
        raise TypeError(f"{cls.__qualname__} names fields it does not have: {missing}")
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (HeadOnly, LoRA, Partial, Full):
    register_strategy(_cls)


def strategy_from_dict(d: Mapping[str, Any]) -> Strategy:
    """Inverse of `Strategy.to_dict` (e.g. from a checkpoint's meta)."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**d)


def scale_by_block(factors: np.ndarray) -> optax.GradientTransformation:
    """Multiply each update by `factors[i]` along its leading (block) axis."""
    f = jnp.asarray(factors, jnp.float32)

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        return jax.tree_util.tree_map(lambda u: u * f.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype),
                                      updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _decay_mask(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in DECAYED_LEAVES, tree)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A strategy resolved on a concrete variables tree (static; closed over by the jitted step)."""
    strategy: Strategy
    rules: Mapping[Path, Rule]
    no_blocks: int

    def split(self, variables: Mapping[str, Any]) -> tuple[dict, dict]:
        """(trainable, frozen): both nested dicts; block-axis leaves are sliced between them."""
        trainable, frozen = {}, {}
        for p, v in traverse_util.flatten_dict(variables).items():
            r = self.rules.get(p)
            if r is None:
                frozen[p] = v
            elif r.start:
                trainable[p], frozen[p] = v[r.start:], v[:r.start]
            else:
                trainable[p] = v
        if set(trainable) != set(self.rules):
            raise ValueError(f"variables lack trainable leaves of the plan: {sorted(set(self.rules) - set(trainable))[:3]}")
        return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)

    def combine(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
        """Inverse of `split` (frozen block slices first on the block axis)."""
        flat = traverse_util.flatten_dict(frozen)
        for p, v in traverse_util.flatten_dict(trainable).items():
            flat[p] = jnp.concatenate([flat[p], v.astype(flat[p].dtype)]) if self.rules[p].start else v
        out = traverse_util.unflatten_dict(flat)
        out.setdefault("lora", {})
        return out

    def labels(self) -> dict:
        """The label tree (same structure as the trainable subtree)."""
        return traverse_util.unflatten_dict({p: r.label for p, r in self.rules.items()})

    @property
    def learning_rates(self) -> dict[str, float]:
        used = {r.label for r in self.rules.values()}
        return {k: v for k, v in self.strategy.learning_rates(self.no_blocks).items() if k in used}

    @property
    def primary_label(self) -> str:
        """The label whose LR is reported (the trunk / adapters, else the head)."""
        return next(k for k in ("lora", "blocks", "trunk", "head") if k in self.learning_rates)

    def schedule(self, label: str, total_steps: int) -> optax.Schedule:
        s = self.strategy
        return make_schedule(self.learning_rates[label], total_steps, s.warmup_steps, s.scheduler, s.min_lr_ratio)

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """clip_by_global_norm -> multi_transform{label: Adam, weight decay, block factors, schedule}."""
        s = self.strategy
        transforms = {}
        for label in self.learning_rates:
            chain = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
            if s.weight_decay:
                chain.append(optax.add_decayed_weights(s.weight_decay, mask=_decay_mask))
            factors = s.block_factors(label, self.no_blocks)
            if factors is not None:
                chain.append(scale_by_block(factors))
            chain.append(optax.scale_by_learning_rate(self.schedule(label, total_steps)))
            transforms[label] = optax.chain(*chain)
        tx = optax.multi_transform(transforms, self.labels())
        return optax.chain(optax.clip_by_global_norm(s.grad_clip), tx) if s.grad_clip else tx

    def count(self, variables: Mapping[str, Any]) -> dict[str, int]:
        """Trainable parameter count per label and 'total' (arrays or ShapeDtypeStructs)."""
        flat = traverse_util.flatten_dict(variables)
        out: dict[str, int] = {}
        for p, r in self.rules.items():
            shape = flat[p].shape
            n = math.prod(shape) // shape[0] * (shape[0] - r.start) if r.start else math.prod(shape)
            out[r.label] = out.get(r.label, 0) + n
        out["total"] = sum(out.values())
        return out
