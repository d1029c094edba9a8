"""What the three commands share: flag tables -> argparse, which flags were given, `--config`
files, console output, the exit code of user errors, the XLA compilation cache, predictions CSV."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ flag tables
@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag: argparse `names` and `kwargs`, its help `group`, the Strategy
    field it sets (`field`), and a range check `valid = (predicate, why)` on a non-None value."""
    names: tuple[str, ...]
    kwargs: Mapping[str, Any]
    group: str = ""
    field: Optional[str] = None
    valid: Optional[tuple[Callable[[Any], bool], str]] = None

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.names[0].lstrip("-").replace("-", "_")

    @property
    def option(self) -> str:
        return self.names[0]


def flag(*names: str, group: str = "", field: Optional[str] = None,
         valid: Optional[tuple[Callable[[Any], bool], str]] = None, **kwargs: Any) -> Flag:
    return Flag(tuple(names), kwargs, group, field, valid)


def build_parser(flags: Iterable[Flag], suppress_defaults: bool = False, **parser_kw: Any) -> argparse.ArgumentParser:
    """An ArgumentParser of a flag table. `suppress_defaults`: a parser whose namespace holds
    only the flags given (for `given_dests`; positionals are left out)."""
    ap = argparse.ArgumentParser(add_help=not suppress_defaults, **parser_kw)
    groups: dict[str, Any] = {}
    for f in flags:
        if suppress_defaults and not f.option.startswith("-"):
            continue
        where = ap if not f.group else groups.setdefault(f.group, ap.add_argument_group(f.group))
        kw = {**f.kwargs, "default": argparse.SUPPRESS} if suppress_defaults else dict(f.kwargs)
        where.add_argument(*f.names, **kw)
    return ap


def given_dests(flags: Sequence[Flag], argv: Sequence[str]) -> set[str]:
    """Destinations of the flags that appear in `argv` (parsed again, defaults suppressed)."""
    ns, _ = build_parser(flags, suppress_defaults=True).parse_known_args(list(argv))
    return set(vars(ns))


def check_ranges(ap: argparse.ArgumentParser, flags: Iterable[Flag], a: argparse.Namespace) -> None:
    for f in flags:
        v = getattr(a, f.dest, None)
        if f.valid is not None and v is not None and not f.valid[0](v):
            ap.error(f"{f.option} {f.valid[1]}")


def jsonable(v: Any) -> Any:
    return str(Path(v).absolute()) if isinstance(v, Path) else v


def coerce(f: Flag, v: Any) -> Any:
    """A config / saved value as the flag's type (paths become Path, choices are checked)."""
    if v is None or isinstance(v, bool):
        return v
    t = f.kwargs.get("type")
    if t is not None:
        v = t(v) if not isinstance(v, (list, dict)) else v
    choices = f.kwargs.get("choices")
    if choices is not None and v not in choices:
        raise ValueError(f"{f.dest}: {v!r} is not one of {', '.join(map(str, choices))}")
    return v


def read_config(path: Path) -> dict[str, Any]:
    """A run config: a YAML (.yaml/.yml) or JSON mapping of flag destinations to values."""
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 -- any parse error is the file's fault
        raise ValueError(f"--config {path}: cannot parse it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return data


def apply_values(ap: argparse.ArgumentParser, a: argparse.Namespace, flags: Sequence[Flag],
                 values: Mapping[str, Any], keep: set[str], source: str) -> None:
    """Set `values` (flag destinations -> values) on `a`, except the destinations in `keep`
    (given on the command line). An unknown key is an error naming it."""
    known = {f.dest: f for f in flags}
    unknown = sorted(set(values) - set(known))
    if unknown:
        ap.error(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                 f"(keys are the flags' names with '_', e.g. 'batch_size')")
    for k, v in values.items():
        if k not in keep:
            try:
                setattr(a, k, coerce(known[k], v))
            except (TypeError, ValueError) as e:
                ap.error(f"{source}: {e}")


# ------------------------------------------------------------------------------ running
def run_reporting_errors(fn: Callable[[], Any]) -> int:
    """The commands' exit code: 0, or 2 with `error: ...` on stderr for a user error (bad data,
    checkpoint, value, tracker or missing file) instead of a traceback."""
    from molfun_jax.data import DataError
    from molfun_jax.training import SkippedStepsError

    try:
        fn()
    except (DataError, ValueError, FileNotFoundError, SkippedStepsError) as e:  # CheckpointError,
        # NonFiniteInputError, TrackerError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def enable_compilation_cache() -> Optional[str]:
    """XLA's persistent compilation cache (a rerun skips compiling the model): `MOLFUN_JAX_CACHE`
    or ~/.cache/molfun_jax/xla; `MOLFUN_JAX_CACHE=off` disables it."""
    import jax

    where = os.environ.get("MOLFUN_JAX_CACHE", str(Path.home() / ".cache" / "molfun_jax" / "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return None
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return where


def default_precision() -> str:
    """bf16 on an accelerator, fp32 on CPU (bf16 matmuls are slow on CPUs)."""
    import jax

    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def buckets_for(max_len: int) -> tuple[int, ...]:
    """The default length buckets below `max_len`, and `max_len` itself (longer chains are cropped
    to it, around the ligand when there is one)."""
    from molfun_jax.data import DEFAULT_BUCKETS

    return tuple(b for b in DEFAULT_BUCKETS if b < max_len) + (max_len,)


def fmt_metrics(m: Mapping[str, Any]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"
    return f"RMSE {f(m['rmse'])} | MAE {f(m['mae'])} | Pearson r {f(m['pearson'])} | Spearman {f(m['spearman'])}"


def write_predictions_csv(path: Path, ids: Sequence[str], pred: Sequence[float],
                          true: Optional[Sequence[Optional[float]]] = None) -> Path:
    """`pdb_id,prediction[,affinity,error]` (atomic)."""
    from molfun_jax.atomic import write_bytes_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    labelled = true is not None and any(t is not None for t in true)
    w.writerow(["pdb_id", "prediction"] + (["affinity", "error"] if labelled else []))
    for i, pid in enumerate(ids):
        row = [pid, f"{float(pred[i]):.6g}"]
        if labelled:
            t = true[i]
            row += ["", ""] if t is None else [f"{float(t):.6g}", f"{float(pred[i]) - float(t):.6g}"]
        w.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, buf.getvalue().encode())
