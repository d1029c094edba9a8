"""Ligand reading and features (molfun_jax.data.ligand) on every real fixture ligand, against
RDKit's own atom / bond values and the files' coordinate blocks read independently here."""
import gzip
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from molfun_jax.data.errors import StructureError
from molfun_jax.data.features import pocket_mask
from molfun_jax.data.ligand import (ATOM_FEATURE_SLICES, BOND_FEATURE_SLICES, BOND_TYPES, CHIRAL_TAGS, DEGREES,
                                    ELEMENTS, FORMAL_CHARGES, HYBRIDIZATIONS, NUM_HS, LigandConfig,
                                    ligand_features, ligand_from_structure, ligand_pocket_mask, read_ligand)
from molfun_jax.data.parsing import parse_structure

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
PDBBIND = ROOT / "pdbbind"
COMPLEXES = ROOT / "structures" / "complexes"
LIGAND_FILES = sorted(PDBBIND.glob("*/*_ligand.sdf")) + sorted(PDBBIND.glob("*/*_ligand.mol2"))
SANITIZABLE = [p for p in LIGAND_FILES if p.parent.name != "2lyw"]
XK2_SMILES = "O=C1N(Cc2ccc3ccccc3c2)C(Cc2ccccc2)C(O)C(O)C(Cc2ccccc2)N1Cc1ccc2ccccc2c1"
pytestmark = pytest.mark.skipif(not LIGAND_FILES, reason="PDBbind fixtures not found")


def _file_atoms(path: Path) -> tuple[list[str], np.ndarray, list[tuple[int, int]]]:
    """Heavy atoms of an SDF (V2000) / mol2 file read as text: elements, coordinates and the
    heavy-heavy bonds (0-based indices among heavy atoms)."""
    lines = path.read_text().splitlines()
    if path.suffix == ".sdf":
        n_atoms, n_bonds = int(lines[3][:3]), int(lines[3][3:6])
        atoms = [(ln[31:34].strip(), [float(ln[0:10]), float(ln[10:20]), float(ln[20:30])])
                 for ln in lines[4:4 + n_atoms]]
        bonds = [(int(ln[0:3]) - 1, int(ln[3:6]) - 1) for ln in lines[4 + n_atoms:4 + n_atoms + n_bonds]]
    else:
        a0 = lines.index("@<TRIPOS>ATOM") + 1
        b0 = lines.index("@<TRIPOS>BOND") + 1
        atoms = []
        for ln in lines[a0:lines.index("@<TRIPOS>BOND")]:
            f = ln.split()
            atoms.append((f[5].split(".")[0], [float(f[2]), float(f[3]), float(f[4])]))
        bonds = []
        for ln in lines[b0:]:
            if ln.startswith("@"):
                break
            if ln.split():
                bonds.append((int(ln.split()[1]) - 1, int(ln.split()[2]) - 1))
    heavy = [i for i, (el, _) in enumerate(atoms) if el not in ("H", "D")]
    new = {old: k for k, old in enumerate(heavy)}
    heavy_bonds = sorted(tuple(sorted((new[i], new[j]))) for i, j in bonds if i in new and j in new)
    return [atoms[i][0] for i in heavy], np.asarray([atoms[i][1] for i in heavy]), heavy_bonds


def _rdkit_mol(path: Path) -> Chem.Mol:
    mol = Chem.MolFromMolFile(str(path)) if path.suffix == ".sdf" else Chem.MolFromMol2File(str(path))
    return Chem.RemoveAllHs(mol)


def _index(value, choices) -> int:
    return list(choices).index(value) if value in choices else len(choices)


def _decode(feat: np.ndarray, name: str) -> np.ndarray:
    block = feat[..., ATOM_FEATURE_SLICES[name]]
    assert np.all(block.sum(-1) == 1) or block.shape[-1] == 1
    return block.argmax(-1) if block.shape[-1] > 1 else block[..., 0]


@pytest.mark.parametrize("path", SANITIZABLE, ids=lambda p: p.name)
def test_features_equal_rdkit_and_file(path):
    lig = read_ligand(path)
    assert lig.sanitized == "full" and lig.warnings == ()
    feats = ligand_features(lig)
    mol = _rdkit_mol(path)
    n = mol.GetNumAtoms()
    elements, coords, bonds = _file_atoms(path)
    assert n == len(elements) == lig.num_atoms
    a = feats["ligand_atom_feat"][:n]
    atoms = list(mol.GetAtoms())
    assert [a.GetSymbol() for a in atoms] == elements
    np.testing.assert_array_equal(_decode(a, "element"), [_index(x.GetSymbol(), ELEMENTS) for x in atoms])
    np.testing.assert_array_equal(_decode(a, "degree"), [_index(x.GetDegree(), DEGREES) for x in atoms])
    np.testing.assert_array_equal(_decode(a, "formal_charge"),
                                  [_index(x.GetFormalCharge(), FORMAL_CHARGES) for x in atoms])
    np.testing.assert_array_equal(_decode(a, "hybridization"),
                                  [_index(x.GetHybridization(), HYBRIDIZATIONS) for x in atoms])
    np.testing.assert_array_equal(_decode(a, "aromatic"), [x.GetIsAromatic() for x in atoms])
    np.testing.assert_array_equal(_decode(a, "in_ring"), [x.IsInRing() for x in atoms])
    np.testing.assert_array_equal(_decode(a, "num_hs"), [_index(x.GetTotalNumHs(), NUM_HS) for x in atoms])
    np.testing.assert_array_equal(_decode(a, "chirality"), [_index(x.GetChiralTag(), CHIRAL_TAGS) for x in atoms])
    # coordinates: the file's heavy atoms (float32)
    np.testing.assert_allclose(feats["ligand_positions"][:n], coords, atol=1e-4)
    # bonds: RDKit's bonds, the file's heavy-heavy bond list, symmetric, zero elsewhere
    b = feats["ligand_bond_feat"]
    present = sorted(zip(*np.nonzero(np.triu(b[..., BOND_FEATURE_SLICES["bond_type"]].sum(-1)))))
    assert [tuple(map(int, p)) for p in present] == bonds
    np.testing.assert_array_equal(b, np.swapaxes(b, 0, 1))
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        assert b[i, j, BOND_FEATURE_SLICES["bond_type"]].argmax() == _index(bond.GetBondType(), BOND_TYPES)
        assert b[i, j, BOND_FEATURE_SLICES["conjugated"]][0] == bond.GetIsConjugated()
        assert b[i, j, BOND_FEATURE_SLICES["in_ring"]][0] == bond.IsInRing()
    # padding: bucket, mask, zeros
    size = len(feats["ligand_mask"])
    assert size == min(s for s in LigandConfig().buckets if s >= n)
    np.testing.assert_array_equal(feats["ligand_mask"], np.r_[np.ones(n), np.zeros(size - n)])
    assert not feats["ligand_atom_feat"][n:].any() and not b[n:].any() and not b[:, n:].any()
    assert feats["ligand_bond_orders_known"] == 1


def test_peptide_ligand_fits_largest_bucket():
    feats = ligand_features(read_ligand(PDBBIND / "1nlo" / "1nlo_ligand.sdf"))
    assert feats["ligand_mask"].shape == (128,) and feats["ligand_mask"].sum() == 84


def test_2lyw_partial_sanitisation():
    """2lyw's SDF has a 5-valent carbon: RDKit's sanitisation fails, the ligand is read partially
    sanitised (valences unchecked), with a warning giving RDKit's reason."""
    path = PDBBIND / "2lyw" / "2lyw_ligand.sdf"
    assert Chem.MolFromMolFile(str(path)) is None  # RDKit itself refuses it
    lig = read_ligand(path)
    assert lig.sanitized == "partial"
    assert any("Explicit valence for atom # 34 C, 5" in w for w in lig.warnings)
    elements, coords, bonds = _file_atoms(path)
    feats = ligand_features(lig)
    n = len(elements)
    assert lig.num_atoms == n == feats["ligand_mask"].sum()
    np.testing.assert_allclose(feats["ligand_positions"][:n], coords, atol=1e-4)
    np.testing.assert_array_equal(_decode(feats["ligand_atom_feat"][:n], "element"),
                                  [_index(e, ELEMENTS) for e in elements])
    degree = np.zeros(n, int)
    for i, j in bonds:
        degree[i] += 1
        degree[j] += 1
    np.testing.assert_array_equal(_decode(feats["ligand_atom_feat"][:n], "degree"), np.minimum(degree, len(DEGREES)))


def test_hetatm_ligand_with_and_without_smiles():
    path = COMPLEXES / "1hvr.pdb"
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("HETATM") and ln[17:20] == "XK2"]
    coords = np.asarray([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in lines
                         if ln[76:78].strip() not in ("H", "D")])
    plain = ligand_from_structure(path, "XK2")
    assert not plain.bond_orders_known and any("only elements and connectivity" in w for w in plain.warnings)
    feats = ligand_features(plain)
    assert feats["ligand_bond_orders_known"] == 0
    n = len(coords)
    np.testing.assert_allclose(feats["ligand_positions"][:n], coords, atol=1e-4)
    types = feats["ligand_bond_feat"][..., BOND_FEATURE_SLICES["bond_type"]]
    assert types.sum() > 0 and np.all(types[..., 1:].sum() == 0)  # every bond single
    typed = ligand_from_structure(path, "XK2", smiles=XK2_SMILES)
    assert typed.bond_orders_known and typed.warnings == ()
    template = Chem.MolFromSmiles(XK2_SMILES)
    assert Chem.MolToSmiles(typed.mol, isomericSmiles=False) == \
        Chem.MolToSmiles(template, isomericSmiles=False)
    np.testing.assert_allclose(typed.positions, coords, atol=1e-4)
    with pytest.raises(StructureError, match="has 6 heavy atoms, ligand XK2 46") as e:
        ligand_from_structure(path, "XK2", smiles="c1ccccc1")
    assert e.value.path == path
    wrong = XK2_SMILES.replace("C(O)C(O)", "C(F)C(O)")  # same size, another element
    with pytest.raises(StructureError, match="does not match ligand XK2"):
        ligand_from_structure(path, "XK2", smiles=wrong)
    with pytest.raises(StructureError, match="ligand ZZZ not found"):
        ligand_from_structure(path, "ZZZ")


def test_hetatm_multiple_copies_first_used():
    path = COMPLEXES / "1a28.pdb.gz"
    lig = ligand_from_structure(path, "STR")
    assert any("2 copies of STR" in w and "the first (A:" in w for w in lig.warnings)
    text = gzip.open(path, "rt").read().splitlines()
    chain_a = [ln for ln in text if ln.startswith("HETATM") and ln[17:20] == "STR" and ln[21] == "A"
               and ln[76:78].strip() not in ("H", "D")]
    np.testing.assert_allclose(lig.positions, [[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])]
                                               for ln in chain_a], atol=1e-4)


def test_pocket_mask_matches_hetatm_pocket_and_brute_force():
    # the same residues as today's pocket mask from HETATM records
    parsed = parse_structure(COMPLEXES / "1hvr.pdb", ligands=["XK2"])
    lig = ligand_from_structure(COMPLEXES / "1hvr.pdb", "XK2")
    np.testing.assert_array_equal(ligand_pocket_mask(parsed["atom_positions"], parsed["atom_mask"], lig.positions),
                                  pocket_mask(parsed))
    # a PDBbind entry: brute-force distances
    parsed = parse_structure(PDBBIND / "4x6p" / "4x6p_protein.pdb")
    lig = read_ligand(PDBBIND / "4x6p" / "4x6p_ligand.sdf")
    mask = ligand_pocket_mask(parsed["atom_positions"], parsed["atom_mask"], lig.positions)
    d = np.linalg.norm(parsed["atom_positions"][:, :, None] - lig.positions[None, None], axis=-1)
    d = np.where(parsed["atom_mask"][:, :, None] > 0, d, np.inf).min(axis=(1, 2))
    np.testing.assert_array_equal(mask, (d <= 8.0).astype(np.float32))
    assert 0 < mask.sum() < len(mask)


def test_metals_left_out(tmp_path):
    mol = Chem.AddHs(Chem.MolFromSmiles("CO.[Zn+2]"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    path = tmp_path / "zn.sdf"
    Chem.MolToMolFile(mol, str(path))
    lig = read_ligand(path)
    assert [a.GetSymbol() for a in lig.mol.GetAtoms()] == ["C", "O"]
    assert any("Zn3" in w and "left out" in w for w in lig.warnings)
    only = tmp_path / "zn_only.sdf"
    Chem.MolToMolFile(Chem.MolFromSmiles("[Zn+2]"), str(only))
    with pytest.raises(StructureError, match="no heavy atom besides metals"):
        read_ligand(only)


def test_multiple_molecules_first_used(tmp_path):
    path = tmp_path / "two.sdf"
    w = Chem.SDWriter(str(path))
    for smi in ("CCO", "c1ccccc1"):
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        assert AllChem.EmbedMolecule(m, randomSeed=0) == 0
        w.write(m)
    w.close()
    lig = read_ligand(path)
    assert lig.num_atoms == 3 and any("2 molecules" in w for w in lig.warnings)


def test_pdbbind_sdf_reads_quietly_and_a_2d_drawing_is_refused(tmp_path, capfd):
    """PDBbind's SDF headers say 2D over 3D coordinates: RDKit's warning about it stays off the
    console. A real 2D drawing (RDKit's depiction, every z = 0) is no pose: refused, by name."""
    sdf = PDBBIND / "1nlo" / "1nlo_ligand.sdf"
    capfd.readouterr()
    Chem.MolFromMolFile(str(sdf))
    assert "tagged as 2D" in capfd.readouterr().err  # the control: RDKit itself warns
    lig = read_ligand(sdf)
    assert np.ptp(lig.positions[:, 2]) > 1.0 and "Warning" not in capfd.readouterr().err
    Chem.MolFromMolFile(str(sdf))
    assert "tagged as 2D" in capfd.readouterr().err  # and warns again afterwards
    flat = Chem.MolFromSmiles(XK2_SMILES)
    AllChem.Compute2DCoords(flat)
    path = tmp_path / "drawing.sdf"
    Chem.MolToMolFile(flat, str(path))
    with pytest.raises(StructureError, match="2D .*not a pose") as e:
        read_ligand(path)
    assert e.value.path == path


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(StructureError, match="file not found") as e:
        read_ligand(tmp_path / "missing.sdf")
    assert e.value.path == tmp_path / "missing.sdf"
    bad_sdf = tmp_path / "bad.sdf"
    bad_sdf.write_text("junk\n\n\n  3  0  0  0  0  0  0  0  0  0999 V2000\n    1.0 x\n")
    with pytest.raises(StructureError, match="RDKit cannot read it") as e:
        read_ligand(bad_sdf)
    assert e.value.path == bad_sdf and str(bad_sdf) in str(e.value)
    bad_mol2 = tmp_path / "bad.mol2"
    bad_mol2.write_text("@<TRIPOS>MOLECULE\nx\n 2 1 0 0 0\nSMALL\n\n@<TRIPOS>ATOM\n 1 C1 0 0 0 Q.9 1 X 0\n")
    with pytest.raises(StructureError, match="RDKit cannot read it") as e:
        read_ligand(bad_mol2)
    assert e.value.path == bad_mol2
    empty = tmp_path / "empty.sdf"
    empty.write_text("empty\n  RDKit\n\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n$$$$\n")
    with pytest.raises(StructureError, match="no heavy atom") as e:
        read_ligand(empty)
    assert e.value.path == empty
    nothing = tmp_path / "nothing.sdf"
    nothing.write_text("")
    with pytest.raises(StructureError, match="no molecule"):
        read_ligand(nothing)
    with pytest.raises(StructureError, match="more than the largest ligand bucket \\(64\\)") as e:
        ligand_features(read_ligand(PDBBIND / "1nlo" / "1nlo_ligand.sdf"), LigandConfig(buckets=(32, 64)))
    assert e.value.path == PDBBIND / "1nlo" / "1nlo_ligand.sdf"
    parsed = parse_structure(PDBBIND / "4x6p" / "4x6p_protein.pdb")
    lig = read_ligand(PDBBIND / "4x6p" / "4x6p_ligand.sdf")
    with pytest.raises(StructureError, match="far from the protein") as e:
        ligand_pocket_mask(parsed["atom_positions"], parsed["atom_mask"], lig.positions + 50.0, path=lig.path)
    assert e.value.path == lig.path


def test_fallback_to_other_format(tmp_path):
    bad_sdf = tmp_path / "4x6p_ligand.sdf"
    bad_sdf.write_text("junk\n\n\n  3  0  0  0  0  0  0  0  0  0999 V2000\n    1.0 x\n")
    mol2 = PDBBIND / "4x6p" / "4x6p_ligand.mol2"
    lig = read_ligand(bad_sdf, fallback=mol2)
    assert lig.path == mol2 and lig.source == "mol2" and lig.num_atoms == 40
    assert any(str(bad_sdf) in w for w in lig.warnings)
    with pytest.raises(StructureError, match="file not found") as e:
        read_ligand(bad_sdf, fallback=tmp_path / "missing.mol2")
    assert "RDKit cannot read it" in str(e.value)
