"""PDBbind as it is distributed: the index file and the per-entry folder layout.

Index (`INDEX_general_PL_data.2016`, `INDEX_refined_data.2016`, ...): `#` comment lines, then one
line per complex, whitespace-separated:

    1nlo   NMR  1997   5.47  Kd=3.4uM      // 1nlo.pdf (11-mer)
    code   resolution (Angstrom or NMR)  release year  -logKd/Ki  measurement  // reference (ligand)

The measurement is `{Kd|Ki|IC50}{=|<|>|~|<=|>=}{value}{unit}` (units fM..M). `read_index` keeps
every field (`IndexEntry`); `is_pdbbind_index` recognises such a file by its content, so a CSV
and an index can be given the same way.

Folder layout (`resolve_entry`): `{folder}/{id}/{id}_protein.pdb`, `{id}_ligand.sdf` (falling back
to `{id}_ligand.mol2`) and `{id}_pocket.pdb`, or a flat folder `{folder}/{id}.pdb|.cif[.gz]` (a
complex whose ligand is read from its HETATM records unless `{id}_ligand.sdf|.mol2` lies next
to it). The pocket file replaces a missing protein file only with `use_pocket_files=True`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from molfun_jax.data.errors import DataError, EntryError

PathLike = Union[str, Path]
MEASUREMENTS = ("Kd", "Ki", "IC50")
RELATIONS = ("=", "<", ">", "~", "<=", ">=")
# molar factor of each unit PDBbind uses
UNITS = {"fM": 1e-15, "pM": 1e-12, "nM": 1e-9, "uM": 1e-6, "mM": 1e-3, "M": 1.0}
LIGAND_SUFFIXES = (".sdf", ".mol2")
# `structure_suffixes` default of `resolve_entry`: the flat folder's structure files
FLAT_SUFFIXES = tuple(s + gz for s in (".cif", ".mmcif", ".pdb", ".ent") for gz in ("", ".gz"))

_MEASUREMENT = re.compile(r"^(Kd|Ki|IC50)(<=|>=|=|<|>|~)([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(fM|pM|nM|uM|mM|M)$")
_LINE = re.compile(r"^(\w{4})\s+(\S+)\s+(\d{4})\s+(\S+)\s+(\S+)\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """One line of a PDBbind index: `affinity` is the -log10 K column; `measurement` the
    Kd / Ki / IC50 field as written, split into `kind`, `relation`, `value` and `unit`
    (`molar` = value in mol/L); `resolution` is None for NMR structures; `line` is 1-based."""
    pdb_id: str
    resolution: Optional[float]
    year: int
    affinity: float
    kind: str
    relation: str
    value: float
    unit: str
    reference: str
    ligand_name: str
    line: int

    @property
    def measurement(self) -> str:
        return f"{self.kind}{self.relation}{self.value:g}{self.unit}"

    @property
    def molar(self) -> float:
        return self.value * UNITS[self.unit]


@dataclasses.dataclass(frozen=True)
class EntryFiles:
    """The files of one entry: `protein` (or the pocket file when it stands in for it),
    `ligand` (None: take the ligand from the protein file's HETATM records), `ligand_fallback`
    (the other ligand format, tried when `ligand` cannot be read), `pocket` (when present),
    `layout` ('pdbbind' or 'flat') and `used_pocket` (the pocket file replaces the protein)."""
    pdb_id: str
    protein: Path
    ligand: Optional[Path]
    ligand_fallback: Optional[Path]
    pocket: Optional[Path]
    layout: str
    used_pocket: bool = False


def _data_lines(text: str) -> list[tuple[int, str]]:
    return [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1) if s.strip() and not s.lstrip().startswith("#")]


def is_pdbbind_index(path: PathLike) -> bool:
    """True when the file's first data line (after `#` comments) reads as a PDBbind index line
    (4-character code, resolution, 4-digit year, -log K, Kd/Ki/IC50 measurement)."""
    try:
        with Path(path).open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    lines = _data_lines(head)
    if not lines:
        return False
    m = _LINE.match(lines[0][1])
    return bool(m and _MEASUREMENT.match(m.group(5)))


def _number(text: str, what: str, pdb_id: str, line: int, path: Path) -> float:
    try:
        x = float(text)
    except ValueError:
        raise EntryError(pdb_id, f"{what} {text!r} is not a number", line, path) from None
    if not math.isfinite(x):
        raise EntryError(pdb_id, f"{what} {text!r} is not a finite number", line, path)
    return x


def parse_index_line(text: str, line: int, path: PathLike = "<index>") -> IndexEntry:
    """One data line of an index; raises `EntryError` (with the line number as `row`)."""
    path = Path(path)
    m = _LINE.match(text.strip())
    if m is None:
        first = text.split()[0] if text.split() else ""
        raise EntryError(first, "not a PDBbind index line (code, resolution, year, -logK, measurement, "
                                f"// reference (ligand)): {text.strip()[:80]!r}", line, path)
    pdb_id, res, year, logk, meas, rest = m.groups()
    resolution = None if res.upper() == "NMR" else _number(res, "resolution", pdb_id, line, path)
    affinity = _number(logk, "-logKd/Ki", pdb_id, line, path)
    mm = _MEASUREMENT.match(meas)
    if mm is None:
        raise EntryError(pdb_id, f"measurement {meas!r} is not Kd/Ki/IC50, a relation ({', '.join(RELATIONS)}), "
                                 f"a value and a unit ({', '.join(UNITS)})", line, path)
    kind, relation, value, unit = mm.groups()
    rest = rest.strip()
    rest = rest[2:].strip() if rest.startswith("//") else rest
    lig = re.search(r"\(([^()]*)\)\s*$", rest)
    ligand_name = lig.group(1).strip() if lig else ""
    reference = rest[:lig.start()].strip() if lig else rest
    return IndexEntry(pdb_id=pdb_id, resolution=resolution, year=int(year), affinity=affinity, kind=kind,
                      relation=relation, value=float(value), unit=unit, reference=reference,
                      ligand_name=ligand_name, line=line)


def read_index(path: PathLike) -> tuple[list[IndexEntry], list[EntryError]]:
    """(entries, bad lines) of a PDBbind index file; a malformed line is an `EntryError` naming
    the file, line and reason, and the other lines are still read.

    Raises:
        DataError: the file is missing or has no data line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index file not found")
    entries, bad = [], []
    for line, text in _data_lines(path.read_text(encoding="utf-8", errors="replace")):
        try:
            entries.append(parse_index_line(text, line, path))
        except EntryError as e:
            bad.append(e)
    if not entries and not bad:
        raise DataError(f"{path}: no data line (only comments or empty)")
    return entries, bad


def folder_listing(folder: Path) -> dict[str, Path]:
    """Lower-cased file name -> path of the files in `folder` (empty when it is no folder)."""
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def _first(folder: Path, names: Sequence[str], listing: Optional[dict[str, Path]] = None) -> Optional[Path]:
    """The first of `names` that is a file in `folder` (exact name, then case-insensitive, from
    `listing` when given: `folder_listing(folder)`)."""
    if listing is None:
        for n in names:
            if (folder / n).is_file():
                return folder / n
        listing = folder_listing(folder)
    return next((listing[n.lower()] for n in names if n.lower() in listing), None)


def _ligand_files(folder: Path, stems: Sequence[str],
                  listing: Optional[dict[str, Path]] = None) -> tuple[Optional[Path], Optional[Path]]:
    found = [p for p in (_first(folder, [s + suf for s in stems], listing) for suf in LIGAND_SUFFIXES)
             if p is not None]
    return (found[0] if found else None), (found[1] if len(found) > 1 else None)


def resolve_entry(folder: PathLike, pdb_id: str, *, use_pocket_files: bool = False,
                  structure_suffixes: Sequence[str] = FLAT_SUFFIXES,
                  listing: Optional[dict[str, Path]] = None) -> EntryFiles:
    """The files of `pdb_id` in a PDBbind-layout folder (`{folder}/{id}/`) or a flat folder
    (`listing`: the flat folder's `folder_listing`, to look up many entries without listing
    the folder for each).

    Raises:
        EntryError: no protein file (with what was found instead, e.g. the pocket file and the
            `use_pocket_files` option), no entry at all, or a PDBbind entry without a ligand file.
    """
    folder = Path(folder)
    sub = next((c for c in (folder / pdb_id, folder / pdb_id.lower(), folder / pdb_id.upper()) if c.is_dir()), None)
    if sub is not None:
        stem = sub.name
        ids = list(dict.fromkeys([stem, pdb_id, pdb_id.lower()]))
        protein = _first(sub, [i + "_protein" + s for i in ids for s in structure_suffixes])
        pocket = _first(sub, [i + "_pocket" + s for i in ids for s in structure_suffixes])
        ligand, fallback = _ligand_files(sub, [i + "_ligand" for i in ids])
        used_pocket = False
        if protein is None:
            if pocket is None:
                raise EntryError(pdb_id, f"no protein file {pdb_id}_protein.pdb (nor a pocket file) in {sub}",
                                 path=sub)
            if not use_pocket_files:
                raise EntryError(pdb_id, f"no protein file {pdb_id}_protein.pdb; only the pocket file "
                                         f"{pocket.name} (--use-pocket-files, use_pocket_files=True, uses it instead)", path=sub)
            protein, used_pocket = pocket, True
        if ligand is None:
            raise EntryError(pdb_id, f"no ligand file {pdb_id}_ligand.sdf|.mol2", path=sub)
        return EntryFiles(pdb_id, protein, ligand, fallback, pocket, "pdbbind", used_pocket)

    protein = _first(folder, [pdb_id + s for s in structure_suffixes], listing)
    if protein is None:
        raise EntryError(pdb_id, f"no structure file {pdb_id}{{.cif,.pdb}}[.gz] nor folder {pdb_id}/ in {folder}",
                         path=folder)
    ligand, fallback = _ligand_files(folder, [pdb_id + "_ligand", pdb_id], listing)
    return EntryFiles(pdb_id, protein, ligand, fallback, None, "flat")
