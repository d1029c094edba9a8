"""Training checkpoints with orbax (DESIGN.md section 11).

A run folder holds

    <run>/checkpoints/<epoch>/   the last `keep` epochs: what the strategy trains (`trainable`:
                                 head, LoRA adapters, and for partial/full the trained trunk
                                 parameters), `ema`, `opt_state`, `meta` (meta.json) and `trainer`
                                 (epoch, step, history, early-stopping state, splits)
    <run>/best/<epoch>/          the parameters that were evaluated at the best validation loss
                                 (the EMA ones when EMA is on), `meta` and `trainer`

Each `<epoch>` folder is written by orbax to a temporary name and renamed when complete (atomic);
an interrupted write is cleaned up on the next open. An export folder (`write_export`) holds a
merged, inference-only model: `params` (the whole AlphaFold tree with LoRA folded in) and `head`
(orbax) plus `meta.json`.

`meta` records the model config, the preset, the strategy and its config, the head config, the
target normalisation, the base weights and library versions. `check_compatible` compares it with
the model a checkpoint is loaded into and refuses another preset / strategy / config with a
message that names the differences.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from molfun_jax.atomic import write_json_atomic

FORMAT = "molfun_jax.checkpoint/1"
EXPORT_FORMAT = "molfun_jax.export/1"
ITEMS = ("trainable", "ema", "opt_state", "meta", "trainer")
_ARRAY_ITEMS = ("trainable", "ema", "opt_state")
# meta keys that must agree between a checkpoint and the model it is loaded into
COMPAT_KEYS = ("preset", "strategy", "model_config", "head", "lora")

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at WARNING/INFO


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _manager(directory: Path, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False,
                                        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=ITEMS, options=opts)


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _save_args(items: Mapping[str, Any]) -> ocp.args.Composite:
    args = {}
    for k, v in items.items():
        if v is None:
            continue
        args[k] = ocp.args.StandardSave(_numpy(v)) if k in _ARRAY_ITEMS else ocp.args.JsonSave(v)
    return ocp.args.Composite(**args)


class RunCheckpointer:
    """Per-epoch (keep-N) and best checkpoints of one run folder."""

    def __init__(self, run_dir: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_dir = Path(run_dir).absolute()
        self.last = _manager(self.run_dir / "checkpoints", keep)
        self.best = _manager(self.run_dir / "best", 1)

    def save(self, epoch: int, *, trainable: Any, ema: Any, opt_state: Any, meta: Mapping,
             trainer: Mapping) -> Path:
        """The state after `epoch` (1-based), for `--resume`."""
        self.last.save(epoch, args=_save_args({"trainable": trainable, "ema": ema, "opt_state": opt_state,
                                               "meta": dict(meta), "trainer": dict(trainer)}), force=True)
        self.last.wait_until_finished()
        return self.last.directory / str(epoch)

    def save_best(self, epoch: int, *, params: Any, meta: Mapping, trainer: Mapping) -> Path:
        """The evaluated parameters (EMA ones when EMA is on) of the best epoch so far."""
        self.best.save(epoch, args=_save_args({"trainable": params, "meta": dict(meta),
                                               "trainer": dict(trainer)}), force=True)
        self.best.wait_until_finished()
        return self.best.directory / str(epoch)

    def latest_epoch(self) -> int | None:
        return self.last.latest_step()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def save_checkpoint(directory: str | Path, epoch: int, items: Mapping[str, Any]) -> Path:
    """One checkpoint `<directory>/<epoch>` of `items` (names from ITEMS; None values are left
    out), written atomically; e.g. `MolfunStructureModel.save`."""
    mgr = _manager(Path(directory), keep=1)
    try:
        mgr.save(epoch, args=_save_args(items), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return Path(directory).absolute() / str(epoch)


def locate(path: str | Path) -> Path:
    """The checkpoint folder that `path` names: an epoch folder itself, a folder of epochs
    (`checkpoints/`, `best/`: the latest), a run folder (its best checkpoint, else its latest) or
    an export folder."""
    p = Path(path).absolute()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if (p / "meta.json").is_file() or (p / "meta").is_dir():
        return p
    for sub in (p / "best", p / "checkpoints", p):
        steps = sorted(int(d.name) for d in sub.glob("*") if d.name.isdigit() and (d / "meta").is_dir()) \
            if sub.is_dir() else []
        if steps:
            return sub / str(steps[-1])
    raise CheckpointError(f"{p}: not a molfun_jax checkpoint (no meta.json, best/ or checkpoints/ inside)")


def is_export(path: Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def read_meta(path: str | Path) -> dict:
    """meta of the checkpoint (or export) that `path` names (see `locate`)."""
    p = locate(path)
    if is_export(p):
        meta = json.loads((p / "meta.json").read_text())
        fmt = EXPORT_FORMAT
    else:
        meta = restore(p, items=("meta",))["meta"]
        fmt = FORMAT
    if meta.get("format") != fmt:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}, expected {fmt!r}")
    return meta


def restore(path: str | Path, abstract: Mapping[str, Any] | None = None,
            items: Iterable[str] | None = None) -> dict[str, Any]:
    """Items of one epoch checkpoint folder. With `abstract` (item -> tree of ShapeDtypeStructs),
    those items are restored into that structure (needed for the optimizer state); other array
    items come back as nested dicts of arrays."""
    p = Path(path).absolute()
    if not (p / "meta").is_dir():
        raise CheckpointError(f"{p}: not a molfun_jax checkpoint folder (no meta/)")
    abstract = dict(abstract or {})
    wanted = list(items) if items is not None else [k for k in ITEMS if (p / k).is_dir()]
    missing = [k for k in wanted if not (p / k).is_dir() and abstract.get(k, True) is not None]
    if missing:
        raise CheckpointError(f"{p}: the checkpoint has no {', '.join(missing)} "
                              f"(best/ and exported checkpoints hold parameters only; resume from checkpoints/)")
    args = {}
    for k in wanted:
        if k in _ARRAY_ITEMS:
            if abstract.get(k, ...) is None:
                continue
            target = abstract.get(k)
            args[k] = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        else:
            args[k] = ocp.args.JsonRestore()
    mngr = _manager(p.parent, create=False)
    try:
        out = mngr.restore(int(p.name), args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: cannot restore {', '.join(args)}: {str(e).splitlines()[0]}") from None
    finally:
        mngr.close()
    return {k: out[k] for k in args}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{sub}: absent in the checkpoint, {b[k]!r} here")
            elif k not in b:
                out.append(f"{sub}: {a[k]!r} in the checkpoint, absent here")
            else:
                out += _diff(a[k], b[k], sub)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{path}: {a!r} in the checkpoint, {b!r} here"]


def describe(meta: Mapping[str, Any]) -> str:
    s = meta.get("strategy", {})
    return f"preset {meta.get('preset')!r}, strategy {s.get('name')!r}"


def check_compatible(meta: Mapping[str, Any], expected: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every difference in COMPAT_KEYS between a checkpoint's meta
    and the model it is loaded into (`expected`, same layout)."""
    problems = []
    for k in COMPAT_KEYS:
        problems += _diff(meta.get(k), expected.get(k), k)
    if problems:
        lines = [f"{source} ({describe(meta)}) does not fit this model ({describe(expected)}):"]
        lines += [f"  {p}" for p in problems[:15]]
        if len(problems) > 15:
            lines.append(f"  ... {len(problems)} differences in all")
        raise CheckpointError("\n".join(lines))


def write_export(out_dir: str | Path, params: Any, head: Any, meta: Mapping[str, Any]) -> Path:
    """A merged, inference-only model: whole AlphaFold params + head params + meta.json."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", _numpy(params), force=True)
        ckptr.save(out / "head", _numpy(head), force=True)
    write_json_atomic(out / "meta.json", {**meta, "format": EXPORT_FORMAT})
    return out


def read_export(path: str | Path) -> tuple[dict, dict, dict]:
    """(params, head, meta) of an export folder."""
    p = Path(path).absolute()
    meta = read_meta(p)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(p / "params"), ckptr.restore(p / "head"), meta
