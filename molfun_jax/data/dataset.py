"""`AffinityDataset`: entries from a CSV of `pdb_id,affinity` (+ optional `year`, `resolution`,
`chain`, `ligand`, `ligand_file`, `smiles`, any other column kept as metadata) or a PDBbind index
file (recognised by its content: `molfun_jax.data.pdbbind`), structures in a flat folder
`{pdb_id}.cif|.pdb[.gz]` or the PDBbind layout `{pdb_id}/{pdb_id}_protein.pdb` (+ ligand and
pocket files), optionally a folder of precomputed OpenFold features `{pdb_id}.pkl|.npz`; examples
(model features padded to a length bucket and a ligand atom bucket, plus `target`) out.

The ligand of an entry (`entry_ligand`), first found of: the CSV `ligand_file` column; the
HETATM residue the CSV `ligand` column names in the structure (bond orders from the `smiles`
column, else only elements and connectivity are known); the layout's ligand file
(`{id}_ligand.sdf`, falling back to `.mol2`; next to a flat `{id}.pdb` too). An entry with a
ligand gets the ligand features (`molfun_jax.data.ligand`), the protein's atom positions
(`all_atom_positions`, `all_atom_mask`) and a pocket mask from the ligand's own coordinates;
the spatial crop keeps the residues nearest them. Without a named ligand (no file, no `ligand`
column) the pocket mask comes from the structure's HETATM ligands, as before, and the example
has no ligand features (the pocket head only). RDKit's notes (partial sanitisation, unknown bond
orders, metals left out, ...) are kept in `Entry.warnings`.

Bad entries (missing or broken files, bad affinities, duplicate ids, no protein, too long with
cropping off, ...) are collected, reported in one table, and left out; loading fails only when
nothing is left, or on any bad entry with `strict=True`.

Precomputed `.pkl` files are unpickled, which can run code: use only your own feature folder
(see `molfun_jax.data.precomputed`); `.npz` is safe.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from rich.console import Console
from rich.table import Table

from molfun_jax.data.buckets import (CROP_MODES, DEFAULT_BUCKETS, bucket_length, collate, crop_features,
                                     crop_indices, pad_features)
from molfun_jax.data.errors import DataError, EntryError, StructureError
from molfun_jax.data.features import FeatureConfig, ligand_distance, make_features
from molfun_jax.data.ligand import Ligand, LigandConfig, ligand_features, ligand_from_structure, ligand_pocket_mask, read_ligand
from molfun_jax.data.parsing import chain_sequences, parse_structure
from molfun_jax.data.pdbbind import FLAT_SUFFIXES, folder_listing, is_pdbbind_index, read_index, resolve_entry
from molfun_jax.data.precomputed import FEATURE_SUFFIXES, align_precomputed, load_precomputed
from molfun_jax.feature_schema import N_ATOM

PathLike = Union[str, Path]
Example = dict[str, np.ndarray]
STRUCTURE_SUFFIXES = FLAT_SUFFIXES
_LIST_SPLIT = re.compile(r"[,;\s]+")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """How entries become examples.

    buckets: padded lengths; an entry goes to the smallest bucket that holds it.
    crop: 'spatial' (residues nearest the ligand), 'contiguous' (a window around the pocket) or
        None (entries longer than the largest bucket are bad entries); without a ligand both
        crops keep the first residues.
    features: `FeatureConfig` of `make_features` (its `msa_seed` is combined with each entry's
        id, so every entry has its own fixed MSA sampling).
    modified_residues: see `parse_structure`.
    ligand: `LigandConfig` (atom buckets) of the ligand features.
    """
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    crop: Optional[str] = "spatial"
    features: FeatureConfig = FeatureConfig()
    modified_residues: str = "parent"
    ligand: LigandConfig = LigandConfig()

    def __post_init__(self) -> None:
        if self.crop is not None and self.crop not in CROP_MODES:
            raise ValueError(f"crop={self.crop!r}; choose one of {CROP_MODES} or None")
        if not self.buckets or any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets must be positive lengths, got {self.buckets}")
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))


@dataclasses.dataclass
class Entry:
    """One usable entry (`row`: CSV row or index line; `n_res`: residues before cropping;
    `bucket`: padded length; `atom_bucket`: padded ligand atoms, 0 without ligand features;
    `ligand_file` / `ligand_fallback`: the ligand's file and the other format; `smiles`: bond
    orders of a HETATM ligand; `warnings`: RDKit's notes on the ligand; `meta`: other CSV
    columns, or the index's `kind` (Kd / Ki / IC50), `measurement`, `reference`, `ligand_name`)."""
    pdb_id: str
    target: Optional[float]  # None: unlabelled (prediction)
    row: int
    structure: Path
    features: Optional[Path] = None
    chains: Optional[tuple[str, ...]] = None
    ligands: Optional[tuple[str, ...]] = None
    year: Optional[int] = None
    resolution: Optional[float] = None
    sequences: tuple[str, ...] = ()
    n_res: int = 0
    bucket: int = 0
    cropped: bool = False
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    ligand_file: Optional[Path] = None
    ligand_fallback: Optional[Path] = None
    smiles: Optional[str] = None
    layout: str = "flat"
    used_pocket: bool = False
    atom_bucket: int = 0
    n_atoms: int = 0
    ligand_source: Optional[str] = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        """Unique id: `pdb_id`, plus `_chains` when the CSV selects chains."""
        return self.pdb_id + ("_" + "".join(self.chains) if self.chains else "")

    @property
    def has_ligand(self) -> bool:
        """Whether the entry's example has ligand features (known once it is built)."""
        return self.atom_bucket > 0


@dataclasses.dataclass(frozen=True)
class EntryFilters:
    """Which entries to keep: `max_resolution` (Angstrom; an entry without one, e.g. NMR, is
    left out when it is set), `min_year` / `max_year` (inclusive; release year), `drop_ic50`
    (leave out IC50 measurements: the index's `kind`, or a CSV `kind` column)."""
    max_resolution: Optional[float] = None
    min_year: Optional[int] = None
    max_year: Optional[int] = None
    drop_ic50: bool = False

    def reason(self, entry: "Entry", final: bool = True) -> Optional[str]:
        """Why `entry` is left out, or None. Before building (`final=False`) an unknown year or
        resolution (filled in from the structure later) is not a reason yet."""
        if self.max_resolution is not None:
            if entry.resolution is None and final:
                return f"no resolution (NMR?); --max-resolution {self.max_resolution:g}"
            if entry.resolution is not None and entry.resolution > self.max_resolution:
                return f"resolution {entry.resolution:g} A > {self.max_resolution:g}"
        for bound, ok, word in ((self.min_year, lambda y, b: y >= b, "before"),
                                (self.max_year, lambda y, b: y <= b, "after")):
            if bound is not None:
                if entry.year is None and final:
                    return f"no release year to compare with {bound}"
                if entry.year is not None and not ok(entry.year, bound):
                    return f"released {entry.year}, {word} {bound}"
        if self.drop_ic50 and entry.meta.get("kind", "").upper() == "IC50":
            return "IC50 measurement (--drop-ic50)"
        return None

    def split(self, entries: Sequence["Entry"], final: bool = True) -> tuple[list["Entry"], list["BadEntry"]]:
        """(kept entries, the others with their reason)."""
        kept, out = [], []
        for e in entries:
            why = self.reason(e, final)
            if why is None:
                kept.append(e)
            else:
                out.append(BadEntry(e.row, e.pdb_id, _path_str(e.structure), why))
        return kept, out


@dataclasses.dataclass(frozen=True)
class BadEntry:
    """A CSV entry left out, and why."""
    row: Optional[int]
    pdb_id: str
    path: Optional[str]
    reason: str


def _index_dir(folder: Optional[PathLike]) -> dict[str, Path]:
    """Lower-cased file name -> path of the files in `folder`."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    return folder_listing(folder)


def _find(index: dict[str, Path], pdb_id: str, suffixes: Sequence[str]) -> Optional[Path]:
    for s in suffixes:
        p = index.get(pdb_id.lower() + s)
        if p is not None:
            return p
    return None


def _optional(value: Optional[str], kind: type, what: str, pdb_id: str, row: int) -> Any:
    """A CSV number (None when empty): finite, and whole for `int`."""
    if value is None or not value.strip():
        return None
    try:
        x = float(value)
    except ValueError:
        raise EntryError(pdb_id, f"{what} {value.strip()!r} is not a number", row) from None
    if not math.isfinite(x):
        raise EntryError(pdb_id, f"{what} {value.strip()!r} is not a finite number", row)
    if kind is int and not x.is_integer():
        raise EntryError(pdb_id, f"{what} {value.strip()!r} is not a whole number", row)
    return kind(x)


def _names(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None or not value.strip():
        return None
    return tuple(v for v in _LIST_SPLIT.split(value.strip()) if v)


def _read_csv(csv_path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows, keys lower-cased; the file must have the `required` columns."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [(c or "").strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip().lower(): (v if isinstance(v, str) else "") for k, v in r.items()} for r in reader]
    lower = [c.lower() for c in fields]
    missing = [c for c in required if c not in lower]
    if missing:
        raise DataError(f"{csv_path}: no {' / '.join(repr(m) for m in missing)} column (columns: {fields}); "
                        "or give a PDBbind index file")
    return rows


def structure_ids(structures_dir: PathLike) -> list[str]:
    """The `pdb_id`s of a folder (sorted): its structure files, and its PDBbind-layout entry
    folders `{id}/` (holding `{id}_protein.*`, `{id}_pocket.*` or `{id}_ligand.*`)."""
    names = set()
    for name, path in _index_dir(structures_dir).items():
        suffix = next((s for s in sorted(STRUCTURE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)
        if suffix is not None:
            names.add(path.name[:-len(suffix)])
    for sub in sorted(Path(structures_dir).iterdir()):
        if sub.is_dir() and any(n.startswith(sub.name.lower() + "_") for n in folder_listing(sub)):
            names.add(sub.name)
    if not names:
        raise DataError(f"{structures_dir}: no structure files (*.pdb, *.cif, optionally .gz) nor PDBbind entry "
                        "folders ({id}/{id}_protein.pdb)")
    return sorted(names)


def _csv_path(value: str, structures_dir: Path, csv_dir: Optional[Path]) -> Path:
    """A CSV file column: absolute, or relative to the structures folder, else to the CSV's."""
    p = Path(value.strip())
    if p.is_absolute() or (structures_dir / p).is_file() or csv_dir is None:
        return p if p.is_absolute() else structures_dir / p
    return csv_dir / p


def _entry(r: dict[str, str], row: int, labelled: bool, structures: dict[str, Path], structures_dir: PathLike,
           features: Optional[dict[str, Path]], features_dir: Optional[PathLike], use_pocket_files: bool = False,
           csv_dir: Optional[Path] = None) -> tuple[Entry, Optional[str]]:
    """One CSV (or index) row as an Entry (EntryError when unusable) and a note about its label."""
    known = {"pdb_id", "affinity", "year", "resolution", "chain", "ligand", "ligand_file", "smiles"}
    pdb_id = (r.get("pdb_id") or "").strip()
    if not pdb_id:
        raise EntryError("", "empty pdb_id", row)
    note = None
    try:
        target = _optional(r.get("affinity"), float, "affinity", pdb_id, row)
    except EntryError as e:
        if labelled:
            raise
        target, note = None, f"{e.reason} (predicted without label)"
    if target is None and labelled:
        raise EntryError(pdb_id, "no affinity value", row)
    smiles = (r.get("smiles") or "").strip() or None
    entry = Entry(pdb_id=pdb_id, target=target, row=row, structure=Path(), chains=_names(r.get("chain")),
                  ligands=_names(r.get("ligand")), year=_optional(r.get("year"), int, "year", pdb_id, row),
                  resolution=_optional(r.get("resolution"), float, "resolution", pdb_id, row), smiles=smiles,
                  meta={k: v for k, v in r.items() if k not in known})
    try:
        files = resolve_entry(structures_dir, pdb_id, use_pocket_files=use_pocket_files, listing=structures)
    except EntryError as e:
        raise EntryError(pdb_id, e.reason, row, e.path) from None
    entry.structure, entry.layout, entry.used_pocket = files.protein, files.layout, files.used_pocket
    if entry.used_pocket:
        entry.warnings.append(f"no protein file: the pocket file {files.protein.name} stands in for it")
    if (r.get("ligand_file") or "").strip():
        entry.ligand_file = _csv_path(r["ligand_file"], Path(structures_dir), csv_dir)
    elif not entry.ligands:
        entry.ligand_file, entry.ligand_fallback = files.ligand, files.ligand_fallback
    if smiles is not None and (entry.ligand_file is not None or not entry.ligands or len(entry.ligands) != 1):
        raise EntryError(pdb_id, "a smiles value assigns bond orders to the one HETATM ligand the `ligand` column "
                                 "names (a ligand file has its own)", row, entry.structure)
    if features is not None:
        entry.features = _find(features, pdb_id, FEATURE_SUFFIXES)
        if entry.features is None:
            raise EntryError(pdb_id, f"no precomputed features {pdb_id}.pkl|.npz in {features_dir}", row,
                             entry.structure)
    return entry, note


def _index_rows(path: Path) -> tuple[list[dict[str, str]], list[BadEntry]]:
    """A PDBbind index as CSV-like rows (`row` = the line), and its malformed lines."""
    entries, bad = read_index(path)
    rows = [{"pdb_id": e.pdb_id, "affinity": repr(e.affinity), "year": str(e.year),
             "resolution": "" if e.resolution is None else repr(e.resolution), "kind": e.kind,
             "measurement": e.measurement, "reference": e.reference, "ligand_name": e.ligand_name,
             "_row": str(e.line)} for e in entries]
    return rows, [BadEntry(b.row, b.pdb_id, str(path), b.reason) for b in bad]


def read_entries(csv_path: Optional[PathLike], structures_dir: PathLike, features_dir: Optional[PathLike] = None,
                 *, labelled: bool = True, use_pocket_files: bool = False) -> tuple[list[Entry], list[BadEntry]]:
    """The usable entries of a CSV (`pdb_id`, `affinity`, optional `year`, `resolution`,
    `chain`, `ligand`, `ligand_file`, `smiles`, other columns kept in `Entry.meta`) or of a
    PDBbind index file (recognised by content; `row` is its line), with their structure (and
    feature) files in a flat or PDBbind-layout folder, and the bad ones. `labelled=False`
    (prediction): `affinity` is optional (an entry without one has `target` None) and
    `csv_path` None means every entry of the folder. `use_pocket_files`: a PDBbind entry
    without a protein file uses its pocket file (else it is a bad entry). Structures are not
    parsed here (`build_example` does)."""
    bad: list[BadEntry] = []
    csv_dir = None
    if csv_path is None:
        if labelled:
            raise ValueError("read_entries: labelled entries need a CSV or a PDBbind index")
        rows = [{"pdb_id": n} for n in structure_ids(structures_dir)]
    elif is_pdbbind_index(csv_path):
        rows, bad = _index_rows(Path(csv_path))
    else:
        rows, csv_dir = _read_csv(Path(csv_path), ("pdb_id", "affinity") if labelled else ("pdb_id",)), Path(csv_path).parent
    structures = _index_dir(structures_dir)
    features = _index_dir(features_dir) if features_dir is not None else None
    entries, seen = [], {}
    for i, r in enumerate(rows, start=2):
        row = int(r.pop("_row", i))
        try:
            entry, note = _entry(r, row, labelled, structures, structures_dir, features, features_dir,
                                 use_pocket_files, csv_dir)
            key = (entry.pdb_id.lower(), entry.chains)
            if key in seen:
                raise EntryError(entry.pdb_id, f"duplicate entry (first at row {seen[key]})", row)
            seen[key] = row
        except EntryError as e:
            bad.append(BadEntry(row, e.pdb_id, _path_str(e.path), e.reason))
            continue
        if note is not None:
            bad.append(BadEntry(row, entry.pdb_id, str(entry.structure), note))
        entries.append(entry)
    return entries, bad


def _path_str(path: Optional[PathLike]) -> Optional[str]:
    return None if path is None else str(path)


def example_depths(config: DatasetConfig, precomputed: bool) -> tuple[int, int, int]:
    """The (MSA rows, extra-MSA rows, templates) every example is padded to: the feature
    config's with precomputed features, else 1 row each."""
    fc = config.features
    return (fc.max_msa_clusters, max(fc.max_extra_msa, 1), fc.max_templates) if precomputed else (1, 1, 1)


def _bad_reason(e: Exception) -> str:
    """A bad entry's reason, whatever went wrong."""
    if isinstance(e, (StructureError, EntryError)):
        return e.reason
    return str(e) if isinstance(e, DataError) else f"unexpected {type(e).__name__}: {e}"


def build_examples(entries: Sequence[Entry], config: DatasetConfig,
                   depths: tuple[int, int, int]) -> tuple[list[Entry], list[Example], list[BadEntry]]:
    """(kept entries, their examples, bad ones): `build_example` of each entry; an entry that
    fails, whatever went wrong, is a bad entry and does not stop the others."""
    kept, examples, bad = [], [], []
    for entry in entries:
        try:
            example = build_example(entry, config, depths)
        except Exception as e:  # noqa: BLE001 -- see the docstring
            where = getattr(e, "path", None) or entry.structure
            bad.append(BadEntry(entry.row, entry.pdb_id, _path_str(where), _bad_reason(e)))
            continue
        kept.append(entry)
        examples.append(example)
    return kept, examples, bad


def _bad_table(bad: Sequence[BadEntry], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("row", "pdb_id", "file", "reason"):
        table.add_column(col, overflow="fold")
    for b in bad:
        table.add_row("" if b.row is None else str(b.row), b.pdb_id, b.path or "", b.reason)
    return table


def render_bad_entries(bad: Sequence[BadEntry], title: str = "Bad entries", width: int = 160) -> str:
    """The bad-entry table as plain text."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(_bad_table(bad, title))
    return console.file.getvalue()


class AffinityDataset:
    """Examples of (structure, affinity) pairs; `dataset[i]` is one example: model features
    padded to the entry's bucket (`molfun_jax.data.buckets`) plus a float32 `target`."""

    def __init__(self, entries: Sequence[Entry], config: DatasetConfig = DatasetConfig(),
                 examples: Optional[Sequence[Example]] = None, bad: Sequence[BadEntry] = (),
                 depths: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.entries = list(entries)
        self.config = config
        self.bad = list(bad)
        self.depths = depths  # (MSA rows, extra-MSA rows, templates) every example is padded to
        self.filtered: list[BadEntry] = []  # entries left out by `EntryFilters`, with the reason
        self._examples = None if examples is None else list(examples)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_csv(cls, csv_path: PathLike, structures_dir: PathLike, features_dir: Optional[PathLike] = None, *,
                 config: Optional[DatasetConfig] = None, strict: bool = False, report: bool = True,
                 lazy: bool = False, use_pocket_files: bool = False, filters: EntryFilters = EntryFilters(),
                 **config_overrides: Any) -> "AffinityDataset":
        """Load a CSV of `pdb_id,affinity` entries, or a PDBbind index file.

        Args:
            csv_path: a CSV with columns `pdb_id`, `affinity` (required), `year`, `resolution`,
                `chain` (e.g. `A` or `A,B`), `ligand` (residue name(s), e.g. `XK2`),
                `ligand_file` (an .sdf / .mol2, relative to `structures_dir` or the CSV),
                `smiles` (bond orders of the `ligand` residue), others kept in `Entry.meta`;
                or a PDBbind index (`INDEX_general_PL_data.2016`, recognised by content).
            structures_dir: `{pdb_id}.cif|.mmcif|.pdb|.ent`, optionally `.gz` (case-insensitive),
                or the PDBbind layout `{pdb_id}/{pdb_id}_protein.pdb`, `_ligand.sdf|.mol2`.
            use_pocket_files: a PDBbind entry without a protein file uses its pocket file.
            filters: `EntryFilters` (resolution, years, IC50); the entries they leave out are
                in `dataset.filtered`, not among the bad ones.
            features_dir: optional precomputed OpenFold features `{pdb_id}.pkl|.npz`; pickles
                are unpickled: trusted (your own) files only.
            config / config_overrides: `DatasetConfig` (e.g. `crop=None`, `buckets=(128, 256)`,
                `features=FeatureConfig(templates=False)`).
            strict: fail on any bad entry (after checking them all).
            report: print the bad-entry table (rich, to stderr).
            lazy: keep no features in memory; rebuild each example (deterministically) on access.

        Raises:
            DataError: no usable entry (or, `strict`, any bad entry), with the table of reasons.
        """
        cfg = dataclasses.replace(config or DatasetConfig(), **config_overrides)
        csv_path = Path(csv_path)
        depths = example_depths(cfg, features_dir is not None)
        entries, bad = read_entries(csv_path, structures_dir, features_dir, use_pocket_files=use_pocket_files)
        n_rows = len(entries) + len(bad)
        entries, filtered = filters.split(entries, final=False)
        entries, examples, failed = build_examples(entries, cfg, depths)
        kept, late = filters.split(entries)  # years / resolutions read from the structures
        keep = {id(e) for e in kept}
        examples = [x for e, x in zip(entries, examples) if id(e) in keep]
        entries, filtered = kept, filtered + late
        bad = sorted(bad + failed, key=lambda b: b.row or 0)
        if not entries or (strict and bad):  # the error carries the table: print it once
            why = "no usable entry" if not entries else f"{len(bad)} bad entries (strict mode)"
            raise DataError(f"{csv_path}: {why}\n" + render_bad_entries(bad))
        if bad and report:
            Console(stderr=True).print(_bad_table(bad, f"{csv_path.name}: {len(bad)} bad of {n_rows} entries "
                                                        f"(left out)"))
        ds = cls(entries, cfg, None if lazy else examples, bad, depths)
        ds.filtered = filtered
        return ds

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Example:
        if self._examples is not None:
            return self._examples[i]
        return build_example(self.entries[i], self.config, self.depths)

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b}" + (f"x{a} atoms" if a else "") + f": {len(ix)}" for (b, a), ix in self.buckets().items())
        return f"AffinityDataset({len(self)} entries; buckets {{{sizes}}}; {len(self.bad)} bad)"

    def subset(self, indices: Sequence[int]) -> "AffinityDataset":
        """The entries `indices` (sharing this dataset's examples and config)."""
        idx = [int(i) for i in indices]
        ex = None if self._examples is None else [self._examples[i] for i in idx]
        return type(self)([self.entries[i] for i in idx], self.config, ex, self.bad, self.depths)

    @property
    def ids(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def targets(self) -> np.ndarray:
        return np.asarray([e.target for e in self.entries], np.float32)

    @property
    def years(self) -> list[Optional[int]]:
        return [e.year for e in self.entries]

    @property
    def chain_sequences(self) -> list[tuple[str, ...]]:
        return [e.sequences for e in self.entries]

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """(bucket length, ligand atom bucket or 0) -> indices of its entries: one batch holds
        entries of one such pair (same feature shapes)."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            out.setdefault((e.bucket, e.atom_bucket), []).append(i)
        return dict(sorted(out.items()))

    @property
    def has_ligands(self) -> bool:
        """Whether every entry has ligand features (the ligand head can read them all)."""
        return bool(self.entries) and all(e.has_ligand for e in self.entries)

    def warnings(self) -> list[tuple[str, str]]:
        """(entry key, note) of every entry's ligand / file notes (RDKit's sanitisation, unknown
        bond orders, metals left out, several copies, pocket file used, ...)."""
        return [(e.key, w) for e in self.entries for w in e.warnings]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Example]:
        """Collated batches (leading batch axis), each from one bucket; with `shuffle`, entries
        are shuffled within buckets and batches across buckets (seeded)."""
        rng = np.random.default_rng(seed)
        groups = []
        for idx in self.buckets().values():
            idx = list(rng.permutation(idx)) if shuffle else idx
            groups += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)
                       if not drop_last or i + batch_size <= len(idx)]
        order = rng.permutation(len(groups)) if shuffle else range(len(groups))
        for g in order:
            yield collate([self[i] for i in groups[g]])

    def report(self) -> str:
        """The bad-entry table as text ('' when there is none)."""
        return render_bad_entries(self.bad) if self.bad else ""


def entry_ligand(entry: Entry) -> Optional[Ligand]:
    """The entry's ligand (module doc), or None when it names none (or several HETATM residues:
    the ligand head reads one ligand; a warning says so).

    Raises:
        StructureError: the ligand cannot be read (naming the file and RDKit's reason).
    """
    if entry.ligand_file is not None:
        return read_ligand(entry.ligand_file, entry.ligand_fallback)
    if entry.ligands and len(entry.ligands) == 1:
        return ligand_from_structure(entry.structure, entry.ligands[0], entry.smiles)
    if entry.ligands:
        entry.warnings.append(f"ligand: several ligand residues ({', '.join(entry.ligands)}): no ligand graph (the "
                              "ligand head reads one ligand; the pocket head pools over all of them)")
    return None


def build_example(entry: Entry, config: DatasetConfig, depths: tuple[int, int, int]) -> Example:
    """Parse, featurise, crop (if longer than the largest bucket) and pad one entry; fills in
    the entry's `sequences`, `n_res`, `bucket`, `cropped`, ligand fields (`atom_bucket`,
    `n_atoms`, `ligand_source`, `warnings`) and, where the CSV has none, `year` (release year)
    and `resolution` from the structure's header."""
    entry.warnings = [w for w in entry.warnings if not w.startswith("ligand: ")]  # a rebuild (lazy) adds them again
    ligand = entry_ligand(entry)
    parsed = parse_structure(entry.structure, entry.chains, ligands=entry.ligands,
                             modified_residues=config.modified_residues)
    if ligand is not None:  # pocket and crop from the ligand's own coordinates
        parsed = {**parsed, "ligand_positions": ligand.positions}
    precomputed = None
    if entry.features is not None:
        precomputed = align_precomputed(load_precomputed(entry.features), parsed["sequence"], entry.features)
    fc = config.features
    seed = fc.msa_seed
    if seed is not None:
        seed = (*np.atleast_1d(seed).tolist(), zlib.crc32(entry.key.encode()))
    feats = make_features(parsed, precomputed, fc, msa_seed=seed)
    if ligand is not None:
        feats["all_atom_positions"] = np.asarray(parsed["atom_positions"], np.float32)
        feats["all_atom_mask"] = np.asarray(parsed["atom_mask"], np.float32)

    n = len(parsed["aatype"])
    entry.sequences = tuple(chain_sequences(parsed))
    entry.n_res = n
    if entry.year is None and parsed["release_date"]:
        entry.year = int(parsed["release_date"][:4])
    if entry.resolution is None:
        entry.resolution = parsed["resolution"]
    bucket = bucket_length(n, config.buckets)
    entry.cropped = bucket is None
    if bucket is None:
        largest = config.buckets[-1]
        if config.crop is None:
            raise EntryError(entry.pdb_id, f"{n} residues, longer than the largest bucket ({largest}), and "
                                           "cropping is off", entry.row, entry.structure)
        idx = crop_indices(n, largest, config.crop, ligand_distance(parsed), fc.pocket_cutoff)
        feats = crop_features(feats, idx)
        bucket = largest
    entry.bucket = bucket
    sizes = {}
    if ligand is not None:  # after cropping: raises when no kept residue is near the ligand
        feats["pocket_mask"] = ligand_pocket_mask(feats["all_atom_positions"], feats["all_atom_mask"],
                                                  ligand.positions, fc.pocket_cutoff, ligand.path)
        feats.update(ligand_features(ligand, config.ligand))
        sizes[N_ATOM] = len(feats["ligand_mask"])
        entry.n_atoms, entry.ligand_source = ligand.num_atoms, f"{ligand.source} {ligand.path.name}"
        entry.warnings += [f"ligand: {w}" for w in ligand.warnings]
    entry.atom_bucket = sizes.get(N_ATOM, 0)
    feats = pad_features(feats, bucket, *depths, sizes=sizes)
    feats["target"] = np.float32(0.0 if entry.target is None else entry.target)
    return feats
