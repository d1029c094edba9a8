"""Structure parsing with Biopython: PDB and mmCIF files (gzip or not) into OpenFold's atom37
layout (`openfold.np.protein.from_pdb_string` / `openfold.data.mmcif_parsing.get_atom_coords`).

What is kept, on purpose:
- the first model only (NMR ensembles, multi-MODEL files);
- protein residues only: standard and modified amino acids (ATOM records; HETATM records only
  when the residue is an amino acid peptide-bonded to a neighbour, e.g. MSE, CSO), and ATOM
  records of unknown names that have an N-CA-C backbone; never water, ions or ligands. Residues
  without any atom37 atom are dropped (as OpenFold does);
- per atom, the altloc Biopython selects (highest occupancy, the first on ties), as OpenFold;
- hydrogens (element H/D; without a usable element, names starting with H) are ignored: atom37
  has none, whatever their names;
- modified residues map to their parent amino acid (Biopython's PDB chemical-component table,
  the one OpenFold's mmCIF parser uses; MSE's SE goes into SD) with `modified_residues='parent'`
  (default, what AlphaFold was trained on), or to X (unknown) as OpenFold's PDB parser does with
  `modified_residues='unknown'`; unknown residues are X (aatype 20);
- residue numbers are the authors' (`residue_index`), with insertion codes kept apart
  (`insertion_code`); only observed residues are present (no SEQRES), so a PDB file and its mmCIF
  give the same arrays;
- ligand heavy atoms (HETATM/other residues that are not protein, water, nucleic acid, ions or
  single atoms, or common crystallisation / buffer additives such as GOL, EDO, SO4; or exactly
  the residues named by `ligands`) for the pocket mask;
- atom records are checked: an explicit element X in an amino acid, a record type other than
  ATOM/HETATM, non-finite coordinates or occupancies of the atoms used are errors.
"""
from __future__ import annotations

import gzip
import io
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from Bio.Data.PDBData import protein_letters_3to1_extended
from Bio.PDB import MMCIFParser, PDBParser

from molfun_jax.data.errors import StructureError
from molfun_jax.np import residue_constants as rc

PathLike = Union[str, Path]
Parsed = dict[str, Any]

MODIFIED_RESIDUE_MODES = ("parent", "unknown")
HYDROGENS = frozenset({"H", "D"})
WATER_NAMES = frozenset({"HOH", "WAT", "H2O", "DOD", "D2O", "SOL", "TIP", "TIP3", "TIP4", "SPC", "T3P"})
NUCLEOTIDE_NAMES = frozenset(
    ["A", "C", "G", "U", "T", "I", "N", "ADE", "CYT", "GUA", "THY", "URA"]
    + [p + b + e for p in ("D", "R") for b in "ACGTUI" for e in ("", "3", "5")]
    + [b + e for b in "ACGU" for e in ("3", "5")])
# polyatomic ions and crystallisation / buffer additives: not ligands unless named explicitly
IONS = frozenset({"SO4", "PO4", "NO3", "NH4", "CO3", "SCN", "AZI", "CYN", "OH", "PI", "2HP", "IOD", "BR"})
ADDITIVES = frozenset({
    "GOL", "EDO", "PEG", "PGE", "PG4", "1PE", "P6G", "2PE", "MPD", "DMS", "ACT", "ACY", "ACE", "FMT",
    "TRS", "MES", "EPE", "BME", "IMD", "CIT", "TLA", "MLI", "IPA", "EOH", "MOH", "BU3", "NHE", "PEU",
    "CXS", "HEZ", "BTB", "MRD", "SIN", "TAR", "FLC", "DTT"})
PEPTIDE_BOND_MAX = 2.0  # Angstrom, C(i)-N(i+1)
_LIST_LIMIT = 6


def read_structure_text(path: PathLike) -> str:
    """The text of a structure file, gunzipped when gzip-compressed (detected from its bytes)."""
    path = Path(path)
    if not path.exists():
        raise StructureError(path, "file not found")
    if not path.is_file():
        raise StructureError(path, "not a regular file")
    data = path.read_bytes()
    if not data.strip():
        raise StructureError(path, "empty file")
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise StructureError(path, "truncated gzip file (the compressed stream ends early)") from None
        except (OSError, zlib.error) as e:
            raise StructureError(path, f"corrupt gzip file ({e})") from None
        if not data.strip():
            raise StructureError(path, "empty file (after gunzip)")
    return data.decode("utf-8", errors="replace")


def structure_format(path: PathLike, text: str) -> str:
    """'cif' or 'pdb', from the file name (`.cif`, `.mmcif`, `.pdb`, `.ent`, optionally `.gz`),
    else from the content."""
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    if name.endswith((".cif", ".mmcif")):
        return "cif"
    if name.endswith((".pdb", ".ent")):
        return "pdb"
    head = text.lstrip()[:200]
    return "cif" if head.startswith("data_") or "\n_atom_site." in text else "pdb"


def _list(names: Iterable[str]) -> str:
    names = sorted(set(names))
    more = f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def _label(chain_id: str, res) -> str:
    _, num, icode = res.id
    return f"{res.get_resname().strip()} {chain_id.strip() or '_'}{num}{icode.strip()}"


def _is_hydrogen(atom) -> bool:
    """Element H/D, or (element missing / not recognised, as Biopython's 'X') a name starting with
    H after leading digits (e.g. 'HT1', '1HB')."""
    element = (atom.element or "").upper()
    if element in HYDROGENS:
        return True
    return element in ("", "X") and atom.get_name().lstrip("0123456789").upper().startswith("H")


def _heavy_atoms(res) -> list:
    return [a for a in res if not _is_hydrogen(a)]


def _has_backbone(atom_names: set) -> bool:
    return {"N", "CA", "C"} <= atom_names


def _bonded(prev, nxt) -> bool:
    """Peptide bond between residue `prev` (its C) and `nxt` (its N)."""
    if prev is None or nxt is None or "C" not in prev or "N" not in nxt:
        return False
    return float(np.linalg.norm(prev["C"].coord - nxt["N"].coord)) < PEPTIDE_BOND_MAX


def _is_amino_name(name: str) -> bool:
    return name == "UNK" or name in protein_letters_3to1_extended


def _one_letter(name: str, mode: str) -> str:
    if mode == "unknown":  # openfold.np.protein.from_pdb_string
        return rc.restype_3to1.get(name, "X")
    code = protein_letters_3to1_extended.get(name, "X")  # openfold.data.mmcif_parsing (SCOPData)
    return code if code in rc.restype_order else "X"


def _classify(chain_res: list, i: int) -> str:
    """'protein', 'water', 'nucleic', 'ion', 'additive' or 'ligand' for residue i of a chain."""
    res = chain_res[i]
    hetflag = res.id[0]
    name = res.get_resname().strip()
    if hetflag == "W" or name in WATER_NAMES:
        return "water"
    heavy = _heavy_atoms(res)
    names = {a.get_name() for a in heavy}
    if hetflag == " ":  # ATOM record (mmCIF: group_PDB ATOM)
        if _is_amino_name(name) or (name not in NUCLEOTIDE_NAMES and _has_backbone(names)):
            return "protein"
    elif _is_amino_name(name) and _has_backbone(names):  # HETATM: modified residue if in the chain
        prev = chain_res[i - 1] if i > 0 else None
        nxt = chain_res[i + 1] if i + 1 < len(chain_res) else None
        if _bonded(prev, res) or _bonded(res, nxt):
            return "protein"
    return _classify_other(res)


def _classify_other(res) -> str:
    """The kind of a residue that is neither protein nor water."""
    name = res.get_resname().strip()
    if name in NUCLEOTIDE_NAMES:
        return "nucleic"
    if len(_heavy_atoms(res)) <= 1 or name in IONS:
        return "ion"
    return "additive" if name in ADDITIVES else "ligand"


def _record_problems(text: str, fmt: str, mmcif_dict: Optional[dict]) -> list[str]:
    """Invalid atom records stated in the file itself: a record type other than ATOM/HETATM, an
    explicit element 'X' in an amino acid (not Biopython's 'X' for an element it could not guess
    from a name; 'X' is legitimate in e.g. UNX, an unknown atom or ion)."""
    problems = []
    if fmt == "cif":
        site = {k.split(".", 1)[1]: v for k, v in mmcif_dict.items() if k.startswith("_atom_site.")}
        groups = site.get("group_PDB", [])
        bad = [g for g in groups if g not in ("ATOM", "HETATM")]
        if bad:
            problems.append(f"invalid atom record type(s) {_list(bad)} in _atom_site.group_PDB ({len(bad)} atoms)")
        rows = zip(*(site.get(k, ["?"] * len(groups)) for k in (
            "type_symbol", "id", "label_atom_id", "label_comp_id", "auth_asym_id", "auth_seq_id")))
        problems += [f"unknown element 'X' for atom {i} ({name} of {comp} {chain}{num})"
                     for el, i, name, comp, chain, num in rows if el.upper() == "X" and _is_amino_name(comp)]
    else:
        for line in text.splitlines():
            if (line.startswith(("ATOM  ", "HETATM")) and line[76:78].strip().upper() == "X"
                    and _is_amino_name(line[17:20].strip())):
                problems.append(f"unknown element 'X' for atom {line[6:11].strip()} ({line[12:16].strip()} of "
                                f"{line[17:20].strip()} {line[21].strip()}{line[22:27].strip()})")
    return problems


def _no_protein_reason(kinds: dict[str, list[str]]) -> str:
    if not any(kinds.values()):
        return "no protein chain: the file has no atoms (no ATOM/HETATM records)"
    words = {"water": "water", "nucleic": "nucleic-acid residues", "ion": "ions or single atoms",
             "additive": "additives", "ligand": "small molecules",
             "protein": "amino acids without an N-CA-C backbone"}
    parts = [f"{words[k]} ({_list(v)})" for k, v in kinds.items() if v]
    return "no protein chain: only " + ", ".join(parts)


def _header(structure, fmt: str, mmcif_dict: Optional[dict]) -> tuple[Optional[float], Optional[str]]:
    """(resolution in Angstrom or None, release date 'YYYY-MM-DD' or None)."""
    resolution, date = None, None
    if fmt == "pdb":
        h = getattr(structure, "header", {}) or {}
        resolution = h.get("resolution")
        date = h.get("release_date") or h.get("deposition_date")
    else:
        for key in ("_refine.ls_d_res_high", "_em_3d_reconstruction.resolution", "_reflns.d_resolution_high"):
            vals = mmcif_dict.get(key)
            if vals:
                try:
                    resolution = float(vals[0] if isinstance(vals, list) else vals)
                    break
                except ValueError:
                    continue
        dates = mmcif_dict.get("_pdbx_audit_revision_history.revision_date")
        if dates:
            date = min(dates) if isinstance(dates, list) else dates
    try:
        resolution = float(resolution) if resolution is not None and np.isfinite(float(resolution)) else None
    except (TypeError, ValueError):
        resolution = None
    if date is not None and (len(str(date)) < 4 or not str(date)[:4].isdigit() or str(date).startswith("1909")):
        date = None  # Biopython's placeholder for a missing date is 1909-01-08
    return resolution, date


def _load(path: Path, text: str, fmt: str):
    """(Biopython structure, mmCIF dict or None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "cif":
                parser = MMCIFParser(QUIET=True)
                structure = parser.get_structure(path.name, io.StringIO(text))
                mmcif_dict = parser._mmcif_dict  # pylint: disable=protected-access (as OpenFold)
                return structure, {k: (v if isinstance(v, list) else [v]) for k, v in mmcif_dict.items()}
            structure = PDBParser(QUIET=True, get_header=True).get_structure(path.name, io.StringIO(text))
            return structure, None
    except Exception as e:  # Biopython raises many types on malformed input
        kind = "mmCIF" if fmt == "cif" else "PDB"
        raise StructureError(path, f"cannot be parsed as {kind}: {type(e).__name__}: {e}") from None


def parse_structure(path: PathLike, chains: Optional[Sequence[str]] = None, *,
                    ligands: Optional[Sequence[str]] = None, modified_residues: str = "parent") -> Parsed:
    """Parse a PDB or mmCIF file (optionally gzip-compressed) into OpenFold's atom37 layout.

    Args:
        path: `*.pdb|*.ent|*.cif|*.mmcif`, optionally `.gz` (the format is guessed from the
            content when the name says nothing).
        chains: chain ids to keep (in file order); default: every chain with protein residues.
            The chains are concatenated; `make_features` puts a residue-index gap between them.
        ligands: residue names of the ligand (e.g. `['XK2']`); default: every residue that is
            not protein, water, nucleic acid, an ion or a common additive (see module doc).
        modified_residues: 'parent' (MSE -> M, CSO -> C, ...; default) or 'unknown' (X, as
            `openfold.np.protein.from_pdb_string`).

    Returns:
        dict with `aatype` [N] int32, `atom_positions` [N, 37, 3] float32, `atom_mask` [N, 37]
        float32, `b_factors` [N, 37] float32, `residue_index` [N] int32 (authors' numbers),
        `insertion_code` [N] str, `chain_index` [N] int32, `chain_ids` (list, per chain index),
        `sequence` (str, chains concatenated), `ligand_positions` [L, 3] float32 (heavy atoms),
        `ligand_names` (list), `resolution` (float or None), `release_date` (str or None),
        `path`, `format`.

    Raises:
        StructureError: naming the file and the reason (missing, empty, truncated gzip,
            unparsable, no protein chain, unknown chain, CA-only trace, invalid atoms, ...).
    """
    if modified_residues not in MODIFIED_RESIDUE_MODES:
        raise ValueError(f"modified_residues={modified_residues!r}; choose one of {MODIFIED_RESIDUE_MODES}")
    path = Path(path)
    text = read_structure_text(path)
    fmt = structure_format(path, text)
    structure, mmcif_dict = _load(path, text, fmt)

    problems = _record_problems(text, fmt, mmcif_dict)
    models = list(structure)
    if not models or not any(True for _ in models[0].get_atoms()):
        raise StructureError(path, "no atoms: no ATOM/HETATM records (is this a structure file?)")
    model = models[0]

    kinds: dict[str, list[str]] = {k: [] for k in ("protein", "water", "nucleic", "ion", "additive", "ligand")}
    protein: dict[str, list] = {}  # chain id -> protein residues, file order
    others: list[tuple[str, Any, str]] = []  # (chain id, residue, kind): non-protein, non-water
    for chain in model:
        res_list = list(chain)
        for i, res in enumerate(res_list):
            kind = _classify(res_list, i)
            kinds[kind].append(res.get_resname().strip())
            if kind == "protein":
                protein.setdefault(chain.id, []).append(res)
            elif kind != "water":
                others.append((chain.id, res, kind))
    if not protein:
        raise StructureError(path, _no_protein_reason(kinds))

    if chains is not None:
        chains = [str(c) for c in chains]
        all_ids = [c.id for c in model]
        for c in chains:
            if c not in all_ids:
                raise StructureError(path, f"chain {c!r} not in the file (chains: {_list(all_ids)})")
            if c not in protein:
                raise StructureError(path, f"chain {c!r} has no protein residues (protein chains: "
                                           f"{_list(protein)})")
        protein = {c: r for c, r in protein.items() if c in chains}

    if ligands is not None:
        wanted = {str(n).strip().upper() for n in ligands}
        lig_res = [(c, r) for c, r, _ in others if r.get_resname().strip().upper() in wanted]
        if not lig_res:
            present = {r.get_resname().strip() for _, r, _ in others}
            raise StructureError(path, f"ligand {_list(wanted)} not found (non-protein residues: "
                                       f"{_list(present) or 'none'})")
    else:
        lig_res = [(c, r) for c, r, kind in others if kind == "ligand"]

    used = [(c, r, a) for c, rs in protein.items() for r in rs for a in _heavy_atoms(r)]
    used += [(c, r, a) for c, r in lig_res for a in _heavy_atoms(r)]
    coords = np.asarray([a.coord for _, _, a in used], np.float64).reshape(-1, 3)
    occupancy = np.asarray([np.nan if a.occupancy is None else a.occupancy for _, _, a in used], np.float64)
    for i in np.flatnonzero(~np.isfinite(coords).all(-1) | np.isinf(occupancy)):
        chain_id, res, atom = used[i]
        what = "coordinates" if not np.isfinite(coords[i]).all() else "occupancy"
        problems.append(f"non-finite {what} for atom {atom.get_name()} of {_label(chain_id, res)}")
    if problems:
        more = f"; ... ({len(problems)} problems)" if len(problems) > 3 else ""
        raise StructureError(path, "; ".join(problems[:3]) + more)

    out = _atom37(protein, modified_residues)
    if out is None:
        raise StructureError(path, "no protein residue has any atom37 heavy atom")
    aatype, positions, mask, b_factors, resnum, icode, chain_index, chain_ids = out
    backbone = mask[:, [rc.atom_order[a] for a in ("N", "CA", "C")]].min(axis=-1)
    if not np.any(backbone):
        if len(aatype) < sum(len(v) for k, v in kinds.items() if k not in ("protein", "water")):
            raise StructureError(path, _no_protein_reason(kinds))  # e.g. a stray amino-acid name
        only_ca = bool(np.all(mask[:, rc.atom_order["CA"]] == 1)) and mask.sum() == len(mask)
        raise StructureError(path, ("CA-only trace: " if only_ca else "") +
                             f"no residue of {len(aatype)} has a complete N-CA-C backbone")

    lig_pos = [a.coord for _, r in lig_res for a in _heavy_atoms(r)]
    resolution, date = _header(structure, fmt, mmcif_dict)
    return {
        "aatype": aatype,
        "atom_positions": positions,
        "atom_mask": mask,
        "b_factors": b_factors,
        "residue_index": resnum,
        "insertion_code": icode,
        "chain_index": chain_index,
        "chain_ids": chain_ids,
        "sequence": "".join(rc.restypes_with_x[a] for a in aatype),
        "ligand_positions": np.asarray(lig_pos, np.float32).reshape(-1, 3),
        "ligand_names": sorted({r.get_resname().strip() for _, r in lig_res}),
        "resolution": resolution,
        "release_date": date,
        "path": str(path),
        "format": fmt,
    }


def _atom37(protein: dict[str, list], mode: str) -> Optional[tuple]:
    """Arrays of the protein residues that have at least one atom37 atom (OpenFold's rule)."""
    aatype, positions, masks, bfs, resnum, icodes, chain_index, chain_ids = [], [], [], [], [], [], [], []
    for chain_id, res_list in protein.items():
        kept = 0
        for res in res_list:
            name = res.get_resname().strip()
            pos = np.zeros((rc.atom_type_num, 3), np.float32)
            mask = np.zeros((rc.atom_type_num,), np.float32)
            bf = np.zeros((rc.atom_type_num,), np.float32)
            for atom in res:
                atom_name = atom.get_name()
                if atom_name in rc.atom_order:
                    j = rc.atom_order[atom_name]
                elif mode == "parent" and name == "MSE" and atom_name.upper() == "SE":
                    j = rc.atom_order["SD"]  # as openfold.data.mmcif_parsing.get_atom_coords
                else:
                    continue
                pos[j], mask[j], bf[j] = atom.coord, 1.0, atom.bfactor
            if mask.sum() < 0.5:
                continue
            aatype.append(rc.restype_order_with_x[_one_letter(name, mode)])
            positions.append(pos)
            masks.append(mask)
            bfs.append(bf)
            resnum.append(res.id[1])
            icodes.append(res.id[2].strip())
            chain_index.append(len(chain_ids))
            kept += 1
        if kept:
            chain_ids.append(chain_id)
    if not aatype:
        return None
    return (np.asarray(aatype, np.int32), np.stack(positions), np.stack(masks), np.stack(bfs),
            np.asarray(resnum, np.int32), np.asarray(icodes, dtype="<U1"), np.asarray(chain_index, np.int32),
            chain_ids)


def chain_sequences(parsed: Parsed) -> list[str]:
    """One-letter sequence of each chain of a parsed structure, in chain-index order."""
    seq = np.array(list(parsed["sequence"]))
    return ["".join(seq[parsed["chain_index"] == i]) for i in range(len(parsed["chain_ids"]))]
