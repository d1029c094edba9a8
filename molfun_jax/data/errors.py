"""Errors of the data package: each names the file (or CSV row) and the reason, so a dataset
can report every bad entry in one table and go on with the good ones."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class DataError(Exception):
    """Base class of the data package's errors."""


class StructureError(DataError):
    """A structure (or precomputed feature) file that cannot be used: `path` and `reason`."""

    def __init__(self, path: Union[str, Path], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class EntryError(DataError):
    """A CSV entry that cannot be used (bad affinity, duplicate id, missing file, too long, ...):
    its `pdb_id`, the CSV `row` (1-based, header = row 1) when known, `reason`, and the file
    concerned when there is one."""

    def __init__(self, pdb_id: str, reason: str, row: Optional[int] = None,
                 path: Optional[Union[str, Path]] = None) -> None:
        self.pdb_id = pdb_id
        self.reason = reason
        self.row = row
        self.path = Path(path) if path is not None else None
        where = f"row {row}, " if row is not None else ""
        what = f" ({self.path})" if self.path is not None else ""
        super().__init__(f"{where}{pdb_id!r}{what}: {reason}")
