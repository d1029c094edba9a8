"""Ligands with RDKit: read a ligand file (SDF / mol2) or a ligand's HETATM records, and turn its
heavy atoms into padded graph features (numpy, float32).

Reading (`read_ligand`): RDKit with hydrogens removed. When sanitisation fails (valences that
RDKit rejects, as in some PDBbind files, e.g. 2lyw's SDF), the molecule is read unsanitised and
partially sanitised (`SANITIZE_ALL ^ SANITIZE_PROPERTIES`: rings, aromaticity, conjugation,
hybridisation, without the valence check; implicit Hs from a non-strict property update), and
`Ligand.sanitized` says 'partial'; when even that fails, the other file format is tried
(`fallback`); when nothing reads, a `StructureError` names the file and RDKit's reason.

Defined behaviour:
- several molecules in one SDF: the first is used (a warning says so); several copies of a
  HETATM ligand: the first copy (chain, residue number) in file order, with a warning;
- metal atoms (`METALS`) are removed from the ligand graph (a warning names them): a metal
  bound to a ligand is a cofactor, not part of the chemistry the head reads;
- a molecule without heavy atoms (after removing metals) is an error, and so is one with more
  heavy atoms than the largest bucket (`LigandConfig.buckets`, default 32 / 64 / 128: PDBbind
  peptide ligands reach 80-120);
- a HETATM ligand gets its connectivity from distances (RDKit's proximity bonding) and, with a
  SMILES, its bond orders from the template (`AssignBondOrdersFromTemplate`); without one,
  every bond is single and only elements and connectivity are known: `bond_orders_known` is
  False, a warning says so, and the feature `ligand_bond_orders_known` is 0;
- `ligand_pocket_mask` raises when no residue lies within the cutoff (a ligand far from the
  protein, or cropped away from it).

Features (`ligand_features`, A = the atom bucket):
    ligand_atom_feat   [A, C_atom] float32  one-hot blocks, `ATOM_FEATURE_SLICES` (C_atom = 45)
    ligand_bond_feat   [A, A, C_bond] float32  symmetric, `BOND_FEATURE_SLICES` (C_bond = 7);
                       all zero where there is no bond (the bond-type block sums to 1 on bonds)
    ligand_positions   [A, 3] float32  heavy-atom coordinates as in the file
    ligand_mask        [A] float32     1 on real atoms
    ligand_bond_orders_known  [] float32  1, or 0 for a HETATM ligand without SMILES
Padding atoms are all zero.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem

from molfun_jax.data.buckets import bucket_length
from molfun_jax.data.errors import StructureError
from molfun_jax.data.features import ligand_distance
from molfun_jax.data.parsing import read_structure_text, structure_format
from molfun_jax.feature_schema import LIGAND_ATOM_DIM, LIGAND_BOND_DIM

PathLike = Union[str, Path]
_F32 = np.float32

ELEMENTS = ("C", "N", "O", "S", "P", "F", "Cl", "Br", "I", "B", "Si", "Se")  # + other
DEGREES = (0, 1, 2, 3, 4, 5)  # + other
FORMAL_CHARGES = (-2, -1, 0, 1, 2)  # + other
HYBRIDIZATIONS = tuple(getattr(Chem.HybridizationType, n) for n in ("S", "SP", "SP2", "SP3", "SP3D", "SP3D2"))
NUM_HS = (0, 1, 2, 3, 4)  # total attached hydrogens, + other
CHIRAL_TAGS = (Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW,
               Chem.ChiralType.CHI_TETRAHEDRAL_CCW)  # + other
BOND_TYPES = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC)  # + other
METALS = frozenset(
    "Li Be Na Mg Al K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Cs Ba La Ce "
    "Pr Nd Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi".split())
DEFAULT_LIGAND_BUCKETS = (32, 64, 128)


def _slices(sizes: Sequence[tuple[str, int]]) -> dict[str, slice]:
    out, start = {}, 0
    for name, n in sizes:
        out[name] = slice(start, start + n)
        start += n
    return out


# one-hot blocks of the atom / bond feature vectors ('other' is the last entry of a block)
ATOM_FEATURE_SLICES = _slices([("element", len(ELEMENTS) + 1), ("degree", len(DEGREES) + 1),
                               ("formal_charge", len(FORMAL_CHARGES) + 1), ("hybridization", len(HYBRIDIZATIONS) + 1),
                               ("aromatic", 1), ("in_ring", 1), ("num_hs", len(NUM_HS) + 1),
                               ("chirality", len(CHIRAL_TAGS) + 1)])
BOND_FEATURE_SLICES = _slices([("bond_type", len(BOND_TYPES) + 1), ("conjugated", 1), ("in_ring", 1)])
ATOM_FEATURE_DIM = max(s.stop for s in ATOM_FEATURE_SLICES.values())
BOND_FEATURE_DIM = max(s.stop for s in BOND_FEATURE_SLICES.values())
if (ATOM_FEATURE_DIM, BOND_FEATURE_DIM) != (LIGAND_ATOM_DIM, LIGAND_BOND_DIM):  # the schema's widths
    raise ImportError(f"ligand feature widths {ATOM_FEATURE_DIM}, {BOND_FEATURE_DIM} differ from the feature schema's "
                      f"({LIGAND_ATOM_DIM}, {LIGAND_BOND_DIM}): update molfun_jax/feature_schema.py and "
                      "LIGAND_FEATURE_VERSION")
# the layout of the ligand features (blocks and their order); recorded in checkpoints
LIGAND_FEATURE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LigandConfig:
    """Ligand featurisation: atom-count `buckets` (an A beyond the largest is an error). The
    pocket cutoff is `FeatureConfig.pocket_cutoff`, as for HETATM ligands."""
    buckets: tuple[int, ...] = DEFAULT_LIGAND_BUCKETS

    def __post_init__(self) -> None:
        if not self.buckets or any(b < 1 for b in self.buckets):
            raise ValueError(f"ligand buckets must be positive atom counts, got {self.buckets}")
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records of the featurisation: buckets, layout version, widths."""
        return {**self.to_dict(), "buckets": list(self.buckets), "version": LIGAND_FEATURE_VERSION,
                "atom_dim": ATOM_FEATURE_DIM, "bond_dim": BOND_FEATURE_DIM}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "LigandConfig":
        """The config of `meta()`; a checkpoint of another feature layout is refused (ValueError)."""
        if meta.get("version") != LIGAND_FEATURE_VERSION:
            raise ValueError(f"ligand feature layout version {meta.get('version')} of the checkpoint differs from "
                             f"this code's ({LIGAND_FEATURE_VERSION}): features would not match the trained head")
        return cls(buckets=tuple(meta["buckets"]))


@dataclasses.dataclass(frozen=True)
class Ligand:
    """A ligand's heavy-atom molecule (`mol`, with a conformer in the file's frame), where it
    came from (`path`, `source`: 'sdf', 'mol2' or 'hetatm:{resname}'), how far it is sanitised
    ('full' or 'partial'), whether its bond orders are known, and `warnings`."""
    mol: Chem.Mol
    path: Path
    source: str
    sanitized: str = "full"
    bond_orders_known: bool = True
    warnings: tuple[str, ...] = ()

    @property
    def num_atoms(self) -> int:
        return self.mol.GetNumAtoms()

    @property
    def positions(self) -> np.ndarray:
        """[n_atoms, 3] float32 heavy-atom coordinates."""
        return np.asarray(self.mol.GetConformer().GetPositions(), _F32).reshape(-1, 3)


# ---------------------------------------------------------------------------- reading
def _messages(log: Any) -> str:
    """RDKit's captured error log as one line, without the time stamps."""
    return " ".join(line.split("] ", 1)[-1].strip() for line in log.messages.strip().splitlines())


def _partial(raw: Optional[Chem.Mol]) -> tuple[Optional[Chem.Mol], str]:
    """(heavy-atom mol or None, why not) of an unsanitised molecule with its hydrogens,
    sanitised without the valence check (`SANITIZE_ALL ^ SANITIZE_PROPERTIES`)."""
    if raw is None:
        return None, "unparsable even unsanitised"
    mol = Chem.Mol(raw)
    with rdBase.CaptureErrorLog() as log:
        try:
            mol.UpdatePropertyCache(strict=False)
            mol = Chem.RemoveAllHs(mol, sanitize=False)
            failed = Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES,
                                      catchErrors=True)
            mol.UpdatePropertyCache(strict=False)
            if mol.GetNumConformers():
                Chem.AssignStereochemistryFrom3D(mol)
        except Exception as e:  # RDKit raises its own exception types (valence, kekulisation, ...)
            return None, f"partial sanitisation failed: {str(e).strip() or _messages(log)}"
    if failed != Chem.SanitizeFlags.SANITIZE_NONE:
        return None, f"partial sanitisation failed at {failed} ({_messages(log)})"
    return mol, ""


@contextlib.contextmanager
def _without_rdkit_warnings() -> Iterator[None]:
    """RDKit's warning log off within the block (its error log stays on): RDKit warns on every
    PDBbind SDF that the header says 2D while the coordinates are 3D (`_finish` checks the
    coordinates itself)."""
    was_on = "rdApp.warning:enabled" in rdBase.LogStatus()
    rdBase.DisableLog("rdApp.warning")
    try:
        yield
    finally:
        if was_on:
            rdBase.EnableLog("rdApp.warning")


def _read_file(path: Path, sanitize: bool) -> tuple[list[Optional[Chem.Mol]], str]:
    """(molecules of an SDF / mol2 file, None where RDKit fails; RDKit's error log). Sanitised
    ones have their hydrogens removed; unsanitised ones keep them."""
    if path.stat().st_size == 0:
        return [], ""
    with rdBase.CaptureErrorLog() as log, _without_rdkit_warnings():
        try:
            if path.suffix.lower() == ".mol2":
                mols = [Chem.MolFromMol2File(str(path), sanitize=sanitize, removeHs=sanitize)]
            else:
                mols = list(Chem.SDMolSupplier(str(path), sanitize=sanitize, removeHs=sanitize))
        except OSError as e:  # RDKit's "File error: Invalid input file"
            return [None], str(e)
    return mols, _messages(log)


def _without_metals(mol: Chem.Mol) -> tuple[Chem.Mol, list[str]]:
    metals = [a.GetIdx() for a in mol.GetAtoms() if a.GetSymbol() in METALS]
    if not metals:
        return mol, []
    names = [f"{mol.GetAtomWithIdx(i).GetSymbol()}{i + 1}" for i in metals]
    rw = Chem.RWMol(mol)
    for i in sorted(metals, reverse=True):
        rw.RemoveAtom(i)
    out = rw.GetMol()
    out.UpdatePropertyCache(strict=False)
    return out, names


def _finish(mol: Chem.Mol, path: Path, source: str, sanitized: str, warnings: list[str],
            bond_orders_known: bool = True) -> Ligand:
    # RemoveHs keeps some hydrogens (e.g. 1nlo's); the graph is the heavy atoms only, re-perceived
    mol, metals = _without_metals(Chem.RemoveAllHs(mol, sanitize=sanitized == "full"))
    if metals:
        warnings.append(f"metal atom(s) {', '.join(metals)} left out of the ligand graph")
    if mol.GetNumAtoms() == 0:
        raise StructureError(path, "ligand has no heavy atom" + (" besides metals" if metals else ""))
    if mol.GetNumConformers() == 0:
        raise StructureError(path, "ligand has no coordinates")
    xyz = mol.GetConformer().GetPositions()  # [A, 3]
    if not np.isfinite(xyz).all():
        raise StructureError(path, "ligand has non-finite coordinates")
    if mol.GetNumAtoms() > 2 and not xyz[:, 2].any():
        raise StructureError(path, "ligand coordinates are 2D (every z is 0): a drawing, not a pose")
    return Ligand(mol, path, source, sanitized, bond_orders_known, tuple(warnings))


def read_ligand(path: PathLike, fallback: Optional[PathLike] = None) -> Ligand:
    """The ligand of an SDF (first molecule) or mol2 file, hydrogens removed, sanitised as far
    as RDKit allows (see module doc), else read from `fallback` (the other format).

    Raises:
        StructureError: naming the file(s) and RDKit's reason (missing, unreadable, empty, ...).
    """
    path = Path(path)
    reasons = []
    for p in [path] + ([Path(fallback)] if fallback is not None else []):
        if not p.is_file():
            reasons.append(f"{p}: file not found")
            continue
        if p.suffix.lower() not in (".sdf", ".mol2", ".mol"):
            reasons.append(f"{p}: not an .sdf / .mol / .mol2 ligand file")
            continue
        mols, log = _read_file(p, sanitize=True)
        if not mols:
            reasons.append(f"{p}: no molecule in the file")
            continue
        warnings = [f"{r} (used {p.name} instead)" for r in reasons]
        mol, sanitized = mols[0], "full"
        if mol is None:
            raw = _read_file(p, sanitize=False)[0]
            mol, why = _partial(raw[0] if raw else None)
            if mol is None:
                reasons.append(f"{p}: RDKit cannot read it: {log or 'unparsable'}; {why}")
                continue
            sanitized = "partial"
            warnings.append(f"RDKit sanitisation failed ({log}); partially sanitised (valences unchecked)")
        if len(mols) > 1:
            warnings.append(f"{len(mols)} molecules in {p.name}; the first is used")
        return _finish(mol, p, p.suffix.lower().lstrip("."), sanitized, warnings)
    if len(reasons) == 1:
        raise StructureError(path, reasons[0].split(": ", 1)[1])
    raise StructureError(path, "; ".join(reasons))


def _residue_pdb_block(path: Path, resname: str) -> tuple[str, list[str], list[str]]:
    """(PDB block of the first copy of residue `resname`, labels of all copies, residue names in
    the file) from a PDB / mmCIF file, with Biopython."""
    from Bio.PDB import PDBIO, MMCIFParser, PDBParser, Select

    text = read_structure_text(path)
    fmt = structure_format(path, text)
    parser = MMCIFParser(QUIET=True) if fmt == "cif" else PDBParser(QUIET=True)
    try:
        structure = parser.get_structure(path.stem, io.StringIO(text))
    except Exception as e:  # Biopython raises several types for a broken file
        raise StructureError(path, f"cannot parse the structure: {e}") from None
    model = next(iter(structure), None)
    names = [] if model is None else sorted({r.get_resname().strip() for r in model.get_residues()})
    copies = [] if model is None else [r for r in model.get_residues() if r.get_resname().strip().upper() == resname]
    labels = [f"{r.get_parent().id}:{r.id[1]}{r.id[2].strip()}" for r in copies]
    if not copies:
        return "", labels, names
    first = (copies[0].get_parent().id, copies[0].id)

    class _One(Select):
        def accept_residue(self, residue: Any) -> bool:
            return (residue.get_parent().id, residue.id) == first

    out = io.StringIO()
    pdbio = PDBIO()
    pdbio.set_structure(model)
    pdbio.save(out, _One(), write_end=True)
    return out.getvalue(), labels, names


def ligand_from_structure(path: PathLike, resname: str, smiles: Optional[str] = None) -> Ligand:
    """The ligand residue `resname` of a complex file (its first copy), bonds from distances and,
    with `smiles`, bond orders from that template; without, bond orders are unknown (module doc).

    Raises:
        StructureError: naming the file: residue not found, unreadable, SMILES not matching.
    """
    path = Path(path)
    name = resname.strip().upper()
    block, copies, names = _residue_pdb_block(path, name)
    if not copies:
        raise StructureError(path, f"ligand {name} not found (residues: {', '.join(names) or 'none'})")
    warnings = []
    if len(copies) > 1:
        warnings.append(f"{len(copies)} copies of {name} ({', '.join(copies)}); the first ({copies[0]}) is used")
    with rdBase.CaptureErrorLog() as log:
        mol = Chem.MolFromPDBBlock(block, removeHs=True, proximityBonding=True)
    sanitized = "full"
    if mol is None:
        mol, why = _partial(Chem.MolFromPDBBlock(block, sanitize=False, removeHs=False, proximityBonding=True))
        if mol is None:
            raise StructureError(path, f"RDKit cannot read ligand {name}: {_messages(log) or 'unparsable'}; {why}")
        sanitized = "partial"
        warnings.append(f"RDKit sanitisation of {name} failed ({_messages(log)}); partially sanitised")
    if smiles is None:
        warnings.append(f"no SMILES for {name}: only elements and connectivity are known (all bonds single)")
        return _finish(mol, path, f"hetatm:{name}", sanitized, warnings, bond_orders_known=False)
    template = Chem.MolFromSmiles(smiles)
    if template is None:
        raise StructureError(path, f"SMILES {smiles!r} of ligand {name} cannot be parsed by RDKit")
    template = Chem.RemoveHs(template)
    if template.GetNumAtoms() != mol.GetNumAtoms():
        raise StructureError(path, f"SMILES {smiles!r} has {template.GetNumAtoms()} heavy atoms, ligand {name} "
                                   f"{mol.GetNumAtoms()}")
    try:
        with rdBase.CaptureErrorLog():
            mol = AllChem.AssignBondOrdersFromTemplate(template, mol)
    except Exception as e:  # RDKit: ValueError "No matching found" and sanitisation errors
        raise StructureError(path, f"SMILES {smiles!r} does not match ligand {name} ({mol.GetNumAtoms()} heavy "
                                   f"atoms): {e}") from None
    return _finish(mol, path, f"hetatm:{name}", "full", warnings)


# ---------------------------------------------------------------------------- features
def _one_hot(values: Sequence[Any], choices: Sequence[Any]) -> np.ndarray:
    """[n, len(choices) + 1]: the index of each value in `choices`, or the last ('other')."""
    lookup = {c: i for i, c in enumerate(choices)}
    idx = np.asarray([lookup.get(v, len(choices)) for v in values], np.int64)
    return (idx[:, None] == np.arange(len(choices) + 1)).astype(_F32)


def atom_features(mol: Chem.Mol) -> np.ndarray:
    """[n_atoms, ATOM_FEATURE_DIM] float32 one-hot blocks (`ATOM_FEATURE_SLICES`)."""
    atoms = list(mol.GetAtoms())
    flag = lambda vals: np.asarray(vals, _F32)[:, None]  # noqa: E731
    return np.concatenate([
        _one_hot([a.GetSymbol() for a in atoms], ELEMENTS),
        _one_hot([a.GetDegree() for a in atoms], DEGREES),
        _one_hot([a.GetFormalCharge() for a in atoms], FORMAL_CHARGES),
        _one_hot([a.GetHybridization() for a in atoms], HYBRIDIZATIONS),
        flag([a.GetIsAromatic() for a in atoms]),
        flag([a.IsInRing() for a in atoms]),
        _one_hot([a.GetTotalNumHs() for a in atoms], NUM_HS),
        _one_hot([a.GetChiralTag() for a in atoms], CHIRAL_TAGS),
    ], axis=-1).reshape(len(atoms), ATOM_FEATURE_DIM)


def bond_features(mol: Chem.Mol) -> np.ndarray:
    """[n_atoms, n_atoms, BOND_FEATURE_DIM] float32, symmetric, zero where there is no bond."""
    n = mol.GetNumAtoms()
    out = np.zeros((n, n, BOND_FEATURE_DIM), _F32)
    bonds = list(mol.GetBonds())
    if not bonds:
        return out
    feat = np.concatenate([_one_hot([b.GetBondType() for b in bonds], BOND_TYPES),
                           np.asarray([[b.GetIsConjugated(), b.IsInRing()] for b in bonds], _F32)], axis=-1)
    i = np.asarray([b.GetBeginAtomIdx() for b in bonds])
    j = np.asarray([b.GetEndAtomIdx() for b in bonds])
    out[i, j] = feat
    out[j, i] = feat
    return out


def ligand_features(ligand: Ligand, config: LigandConfig = LigandConfig(),
                    n_atoms: Optional[int] = None) -> dict[str, np.ndarray]:
    """The ligand's features (module doc), padded to `n_atoms` or else to the smallest bucket.

    Raises:
        StructureError: more heavy atoms than the largest bucket (or than `n_atoms`).
    """
    n = ligand.num_atoms
    size = bucket_length(n, config.buckets) if n_atoms is None else (n_atoms if n <= n_atoms else None)
    if size is None:
        limit = config.buckets[-1] if n_atoms is None else n_atoms
        raise StructureError(ligand.path, f"ligand has {n} heavy atoms, more than the largest ligand bucket ({limit})")
    pad = size - n
    return {
        "ligand_atom_feat": np.pad(atom_features(ligand.mol), ((0, pad), (0, 0))),
        "ligand_bond_feat": np.pad(bond_features(ligand.mol), ((0, pad), (0, pad), (0, 0))),
        "ligand_positions": np.pad(ligand.positions, ((0, pad), (0, 0))),
        "ligand_mask": np.pad(np.ones(n, _F32), (0, pad)),
        "ligand_bond_orders_known": _F32(ligand.bond_orders_known),
    }


def ligand_pocket_mask(atom_positions: np.ndarray, atom_mask: np.ndarray, ligand_positions: np.ndarray,
                       cutoff: float = 8.0, path: PathLike = "<ligand>") -> np.ndarray:
    """[N] float32 pocket mask (as `features.pocket_mask`): residues with any heavy atom
    (`atom_mask` [N, 37]) within `cutoff` of a ligand heavy atom (`ligand_positions` [L, 3]).

    Raises:
        StructureError: naming `path` (the ligand file) when no residue is within `cutoff`.
    """
    dist = ligand_distance({"atom_positions": np.asarray(atom_positions), "atom_mask": np.asarray(atom_mask),
                            "ligand_positions": np.asarray(ligand_positions, _F32).reshape(-1, 3)})
    mask = (dist <= cutoff).astype(_F32)
    if not mask.any():
        nearest = float(dist.min()) if len(dist) else float("inf")
        raise StructureError(path, f"ligand is far from the protein: no residue within {cutoff:g} A of a ligand heavy "
                                   f"atom (nearest {nearest:.1f} A); wrong frame, or cropped away?")
    return mask
