"""Atomic file writes: a temp file in the same folder, then `os.replace`, so a reader (or a killed
run) never sees a partial file. The one home of this helper for reports, run args, meta files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (the folder must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """`obj` as indented, key-sorted JSON, written atomically."""
    return write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())
