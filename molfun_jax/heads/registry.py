"""The affinity heads by kind: one home for what the CLI, the API, checkpoints and the train
step need to know of a head (its config class, its Flax module, the example keys it reads).

    cfg = head_config_from_dict({"kind": "ligand", "c_atom": 32})   # meta.json's `head`
    head = make_head(cfg)                                          # the Flax module
    head.apply({"params": p}, single, seq_mask, pocket_mask, **head_inputs(cfg, example))

A new head: a Flax module whose one field is its `config`, a frozen config dataclass with a
`kind` field, and `register_head(HeadKind(...))`. Every head reads `single`, `seq_mask` and
`pocket_mask`; `input_keys` are the other example features it takes (keyword arguments).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from molfun_jax.feature_schema import FEATURE_SCHEMA, N_ATOM, N_RES
from molfun_jax.heads.affinity import AffinityHead, HeadConfig
from molfun_jax.heads.ligand import LIGAND_HEAD_INPUT_KEYS, LigandAffinityHead, LigandHeadConfig


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """A head: `name` (its config's `kind`, the CLI's `--head`), `config` class, Flax `module`
    class (built as `module(config=cfg)`), the extra example keys it reads, and a one-line `summary`."""
    name: str
    config: type
    module: type
    input_keys: tuple[str, ...]
    summary: str


HEADS: dict[str, HeadKind] = {}


def register_head(kind: HeadKind) -> HeadKind:
    """Add a head kind (a name already registered is an error)."""
    if kind.name in HEADS:
        raise ValueError(f"head kind {kind.name!r} is already registered")
    HEADS[kind.name] = kind
    return kind


register_head(HeadKind("pocket", HeadConfig, AffinityHead, (),
                       "protein-only: pooled trunk representation of the pocket residues"))
register_head(HeadKind("ligand", LigandHeadConfig, LigandAffinityHead, LIGAND_HEAD_INPUT_KEYS,
                       "ligand-aware: ligand graph encoder + ligand-atom / pocket-residue attention over the pose"))


def head_kind(cfg: Any) -> HeadKind:
    """The registered kind of a head config."""
    kind = getattr(cfg, "kind", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEADS)}")
    return HEADS[kind]


def head_config_from_dict(d: Mapping[str, Any]) -> Any:
    """A head config from its `to_dict()` (a dict without `kind` is the pocket head's, as
    checkpoints written before there were several heads)."""
    d = dict(d)
    name = d.setdefault("kind", "pocket")
    if name not in HEADS:
        raise ValueError(f"unknown head kind {name!r}; choose one of {', '.join(HEADS)}")
    fields = {f.name for f in dataclasses.fields(HEADS[name].config)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"head config of kind {name!r}: unknown field(s) {unknown}")
    return HEADS[name].config(**d)


def make_head(cfg: Any) -> nn.Module:
    """The Flax module of a head config."""
    return head_kind(cfg).module(config=cfg)


def head_inputs(cfg: Any, example: Mapping[str, Any]) -> dict[str, Any]:
    """The head's extra inputs from an example (a missing one names the head and the key)."""
    keys = head_kind(cfg).input_keys
    missing = [k for k in keys if k not in example]
    if missing:
        raise KeyError(f"the {cfg.kind} head needs {missing}, which the example lacks (an example without a "
                       "ligand: use the pocket head)")
    return {k: example[k] for k in keys}


def dummy_head_inputs(cfg: Any) -> dict[str, Any]:
    """Zero inputs of one residue and one ligand atom, to initialise the head's params."""
    return FEATURE_SCHEMA.zeros(head_kind(cfg).input_keys, {N_RES: 1, N_ATOM: 1})


# every example key a head may read besides single / seq_mask / pocket_mask (the head-only cache keeps them)
ALL_HEAD_INPUT_KEYS = tuple(dict.fromkeys(k for h in HEADS.values() for k in h.input_keys))
