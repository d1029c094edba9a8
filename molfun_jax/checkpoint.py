"""Training checkpoints with orbax (docs/architecture.md).

A run folder holds

    <run>/checkpoints/<epoch>/   the last `keep` epochs: what the strategy trains (`trainable`:
                                 head, LoRA adapters, and for partial/full the trained trunk
                                 parameters), `ema`, `opt_state`, `meta` (meta.json) and `trainer`
                                 (epoch, step, history, early-stopping state, splits)
    <run>/best/<epoch>/          the parameters that were evaluated at the best validation loss
                                 (the EMA ones when EMA is on), `meta` and `trainer`

Each `<epoch>` folder is written by orbax to a temporary name and renamed when complete (atomic);
an interrupted write is cleaned up on the next open. Then `molfun_sha256.json` records the size and
sha256 of every file in it but the JSON items (`meta`, `trainer`, `meta.json`: those are checked by
parsing them, and may be edited by hand); every reader verifies it (`verify`), and a file that
fails, or a restore that fails, is a CheckpointError of one line naming the folder and the fault.
`--resume` falls back to the newest intact epoch, moving damaged newer ones to `<run>/damaged/`.
An export folder (`write_export`) holds a merged, inference-only model: `params` (the whole
AlphaFold tree with LoRA folded in) and `head` (orbax) plus `meta.json` (and its manifest).

`meta` records the model config, the preset, the strategy and its config, the head config, the
target normalisation, the base weights and library versions. `check_compatible` compares it with
the model a checkpoint is loaded into and refuses another preset / strategy / config with a
message that names the differences.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from molfun_jax.atomic import write_json_atomic
from molfun_jax.training.distributed import held_whole, is_primary, sync
from molfun_jax.training.memory import align_host_arrays

FORMAT = "molfun_jax.checkpoint/1"
EXPORT_FORMAT = "molfun_jax.export/1"
ITEMS = ("trainable", "ema", "opt_state", "meta", "trainer")
_ARRAY_ITEMS = ("trainable", "ema", "opt_state")
# meta keys that must agree between a checkpoint and the model it is loaded into
COMPAT_KEYS = ("preset", "strategy", "model_config", "head", "lora")

MANIFEST = "molfun_sha256.json"
MANIFEST_FORMAT = "molfun_jax.manifest/1"
# files checked by parsing rather than by checksum (JSON that users may edit by hand)
_PARSED_FILES = ("meta/metadata", "trainer/metadata", "meta.json")

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at WARNING/INFO
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _one_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters (tensorstore errors
    carry kilobytes of JSON spec)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def _checked_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST
                  and f.relative_to(folder).as_posix() not in _PARSED_FILES)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint / export / weights folder; damage is a one-line CheckpointError."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged: not readable JSON ({_one_line(e, 100)})") from None


def read_arrays(folder: Path) -> Any:
    """An orbax array tree (`params/`, `head/` of an export or a weights folder) as written, its
    numpy arrays aligned so that a CPU device uses them in place (`align_host_arrays`)."""
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.restore(Path(folder).absolute())
        except Exception as e:  # orbax / tensorstore raise many types for a damaged folder
            raise CheckpointError(f"{folder}: cannot restore (damaged?): {_one_line(e)}") from None
    return align_host_arrays(tree) if isinstance(tree, dict) else tree


def write_manifest(folder: str | Path) -> Path:
    """Record size and sha256 of a finished checkpoint / export folder's files: process 0, once
    every process has finished writing its part, and every process returns once it is written."""
    folder = Path(folder)
    sync(f"molfun_saved:{folder}")
    if is_primary():
        files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in _checked_files(folder)}
        write_json_atomic(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})
    sync(f"molfun_manifest:{folder}")
    return folder / MANIFEST


def verify(folder: str | Path) -> None:
    """Raise CheckpointError naming the first file of `folder` that is missing or differs from
    what was written. Folders without a manifest (older ones) are left to the restore's checks."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return
    try:
        files = json.loads(mpath.read_text())["files"]
        sizes = {rel: int(f["size"]) for rel, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder}: damaged: {MANIFEST} is unreadable ({_one_line(e)})") from None
    for rel, size in sizes.items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{folder}: damaged: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{folder}: damaged: {rel} has {f.stat().st_size} bytes, "
                                  f"{size} were written")
        if _sha256(f) != files[rel]["sha256"]:
            raise CheckpointError(f"{folder}: damaged: {rel} differs from what was written (sha256)")


def _manager(directory: Path, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    directory = Path(directory).absolute()
    if create:
        _remove_interrupted_writes(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=opts)


def _remove_interrupted_writes(directory: Path) -> None:
    """Delete orbax's temporary folders of interrupted saves. (orbax's own
    `cleanup_tmp_directories` runs in a thread that `close()` never joins: a short-lived process
    then dies with "Event loop is closed" / "cannot schedule new futures after shutdown".)"""
    if is_primary() and directory.is_dir():
        for tmp in directory.glob(f"*{ocp.path.atomicity.TMP_DIR_SUFFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)
    sync(f"molfun_cleaned:{directory}")


def _host_value(x: Any) -> Any:
    """A leaf as orbax should save it: numpy when every process holds the whole value (orbax then
    writes it from process 0), else the global jax.Array (orbax writes each process's shards)."""
    if isinstance(x, jax.Array) and not held_whole(x):
        return x
    return np.asarray(x)


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(_host_value, tree)


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
        return write_manifest(self.last.directory / str(epoch)).parent

    def save_best(self, epoch: int, *, params: Any, meta: Mapping, trainer: Mapping) -> Path:
        """The evaluated parameters (EMA ones when EMA is on) of the best epoch so far."""
        self.best.save(epoch, args=_save_args({"trainable": params, "meta": dict(meta),
                                               "trainer": dict(trainer)}), force=True)
        self.best.wait_until_finished()
        return write_manifest(self.best.directory / str(epoch)).parent

    def latest_epoch(self) -> int | None:
        return self.last.latest_step()

    def _epochs(self) -> list[int]:
        """The epochs of `checkpoints/`, newest first."""
        return sorted((int(d.name) for d in self.last.directory.glob("*") if d.name.isdigit()), reverse=True)

    def newest_intact(self) -> tuple[int | None, list[str]]:
        """(the newest epoch whose files verify and whose meta reads, or None; the faults of the
        newer ones): where `restore_intact` will resume, found without restoring the arrays."""
        faults = []
        for epoch in self._epochs():
            try:
                read_meta(self.last.directory / str(epoch))
            except CheckpointError as e:
                faults.append(str(e))
                continue
            return epoch, faults
        return None, faults

    def restore_intact(self, abstract: Mapping[str, Any], items: Iterable[str],
                       check: Callable[[dict, Path], None] = lambda meta, path: None) -> tuple[Path, dict[str, Any]]:
        """(folder, items) of the newest epoch checkpoint that verifies and restores whole
        (`abstract`, `items`: see `restore`). `check(meta, folder)` may refuse a checkpoint (an
        incompatible model: raised as is). Damaged newer epochs (and best/ entries past the one
        restored) are moved to `<run>/damaged/`, each with a warning."""
        epochs = self._epochs()
        if not epochs:
            raise CheckpointError(f"{self.last.directory}: no epoch checkpoint to resume from")
        damaged: list[Path] = []
        for epoch in epochs:
            path = self.last.directory / str(epoch)
            try:
                meta = read_meta(path)
            except CheckpointError as e:
                _fall_back(e, damaged, path)
                continue
            check(meta, path)
            try:
                got = restore(path, abstract, items)
            except CheckpointError as e:
                _fall_back(e, damaged, path)
                continue
            self._set_aside(damaged + [d for d in self.best.directory.glob("*") if d.name.isdigit()
                                       and int(d.name) > epoch])
            if damaged:
                log.warning("resuming from %s (the newest intact checkpoint)", path)
            return path, got
        raise CheckpointError(f"{self.last.directory}: every epoch checkpoint is damaged "
                              f"({', '.join(str(e) for e in epochs)}); nothing to resume from")

    def _set_aside(self, folders: list[Path]) -> None:
        if not folders:
            return
        sync(f"molfun_fell_back:{self.run_dir}")  # every process has read what it needs
        if is_primary():
            for f in folders:
                dest = self.run_dir / "damaged" / f"{f.parent.name}-{f.name}"
                n = 1
                while dest.exists():
                    dest, n = dest.with_name(f"{f.parent.name}-{f.name}.{n}"), n + 1
                dest.parent.mkdir(exist_ok=True)
                f.rename(dest)
                log.warning("moved %s to %s", f, dest)
        sync(f"molfun_set_aside:{self.run_dir}")
        self.last.reload()
        self.best.reload()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _fall_back(error: CheckpointError, damaged: list[Path], path: Path) -> None:
    log.warning("%s; falling back to an older checkpoint", error)
    damaged.append(path)


def save_checkpoint(directory: str | Path, epoch: int, items: Mapping[str, Any]) -> Path:
    """One checkpoint `<directory>/<epoch>` of `items` (names from ITEMS; None values are left
    out), written atomically with its manifest; e.g. `MolfunStructureModel.save`."""
    mgr = _manager(Path(directory), keep=1)
    try:
        mgr.save(epoch, args=_save_args(items), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return write_manifest(Path(directory).absolute() / str(epoch)).parent


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
    verify(p)
    if is_export(p):
        meta = read_json(p / "meta.json")
        fmt = EXPORT_FORMAT
    else:
        meta = restore(p, items=("meta",))["meta"]
        fmt = FORMAT
    got = meta.get("format") if isinstance(meta, dict) else None
    if got != fmt:
        raise CheckpointError(f"{p}: unknown checkpoint format {got!r}, expected {fmt!r}")
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
    except Exception as e:  # orbax / tensorstore raise many types for a damaged folder
        raise CheckpointError(f"{p}: cannot restore {', '.join(args)} (damaged?): {_one_line(e)}") from None
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
    return write_manifest(out).parent


def read_export(path: str | Path) -> tuple[dict, dict, dict]:
    """(params, head, meta) of an export folder."""
    p = Path(path).absolute()
    meta = read_meta(p)
    return read_arrays(p / "params"), read_arrays(p / "head"), meta
