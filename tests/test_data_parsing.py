"""Structure parsing against OpenFold's own parsers on real PDB entries, and the clean errors
of broken inputs (shared/fixtures/structures)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from molfun_jax.data import StructureError, make_features, parse_structure
from molfun_jax.np import residue_constants as rc

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "structures"
if not FIXTURES.is_dir():
    pytest.skip(f"structure fixtures not found at {FIXTURES}", allow_module_level=True)

CHAINS = sorted(p.name for p in (FIXTURES / "chains").glob("*.pdb.gz"))
# 3PWP.pdb.gz is left out: OpenFold's PDB parser refuses its insertion codes; it is checked
# against OpenFold's mmCIF parser and against its own mmCIF below.
PDB_COMPLEXES = ["1hvr.pdb", "1a28.pdb.gz", "5a7u.pdb", "adk_open.pdb"]
MMCIF = ["1YJP.cif", "3PWP.cif.gz", "5PTI.cif.gz", "7ETN.cif.gz"]


def text_of(path: Path) -> str:
    return (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)).read()


@pytest.fixture(scope="module")
def of():
    from tests.reference import openfold_data
    return openfold_data()


def _pdb_records(text: str) -> dict[tuple[str, int], str]:
    """(chain letter, residue number) -> record type, from ATOM/HETATM lines."""
    out = {}
    for line in text.splitlines():
        if line.startswith(("ATOM  ", "HETATM")):
            out.setdefault((line[21], int(line[22:26])), line[:6].strip())
    return out


@pytest.mark.parametrize("name", [f"chains/{c}" for c in CHAINS] + [f"complexes/{c}" for c in PDB_COMPLEXES])
def test_pdb_matches_openfold_from_pdb_string(of, name):
    """aatype, residue numbers, atom37 positions and masks equal `protein.from_pdb_string`
    exactly (modified residues as X, as OpenFold's PDB parser maps them). OpenFold also turns
    waters and ligand atoms with atom37 names into X residues: those, and only those, we leave out."""
    path = FIXTURES / name
    text = text_of(path)
    ours = parse_structure(path, modified_residues="unknown")
    if name.endswith("adk_open.pdb"):  # no chain id: OpenFold maps chain ids through A-Z only
        text = "\n".join(l[:21] + "A" + l[22:] if l.startswith(("ATOM", "HETATM")) else l for l in text.splitlines())
    ref = of.protein.from_pdb_string(text)
    letters = [c if c.strip() else "A" for c in ours["chain_ids"]]
    ref_keys = [("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[c], int(n)) for c, n in zip(ref.chain_index, ref.residue_index)]
    our_keys = [(letters[c], int(n)) for c, n in zip(ours["chain_index"], ours["residue_index"])]
    rows = {k: i for i, k in enumerate(ref_keys)}
    idx = np.asarray([rows[k] for k in our_keys])
    assert np.all(np.diff(idx) > 0), "residue order differs"
    np.testing.assert_array_equal(ours["aatype"], ref.aatype[idx])
    np.testing.assert_array_equal(ours["residue_index"], ref.residue_index[idx])
    np.testing.assert_array_equal(ours["atom_mask"], ref.atom_mask[idx])
    np.testing.assert_array_equal(ours["atom_positions"], ref.atom_positions[idx])
    np.testing.assert_array_equal(ours["b_factors"], ref.b_factors[idx].astype(np.float32))
    records = _pdb_records(text)
    dropped = sorted(set(range(len(ref_keys))) - set(idx.tolist()))
    assert all(ref.aatype[i] == rc.unk_restype_index and records[ref_keys[i]] == "HETATM" for i in dropped), \
        "a residue OpenFold keeps was dropped that is not a hetero (water / ligand) residue"
    if "chains/" in name:
        assert not dropped


@pytest.mark.parametrize("name", MMCIF)
def test_mmcif_matches_openfold_mmcif_parsing(of, name):
    """Per protein chain, the observed residues of `mmcif_parsing.get_atom_coords` (SEQRES rows
    with coordinates): aatype from the SEQRES letters, author numbers and insertion codes from
    `seqres_to_structure`, positions and masks: all equal (3PWP: altlocs, insertion codes)."""
    path = FIXTURES / "complexes" / name
    mm = of.mmcif_parsing.parse(file_id=name[:4], mmcif_string=text_of(path)).mmcif_object
    ours = parse_structure(path)
    assert ours["chain_ids"] == list(mm.chain_to_seqres)
    for ci, chain in enumerate(ours["chain_ids"]):
        pos, mask = of.mmcif_parsing.get_atom_coords(mm, chain)
        seqres, mapping = mm.chain_to_seqres[chain], mm.seqres_to_structure[chain]
        rows = [i for i in range(len(seqres)) if not mapping[i].is_missing and mask[i].sum() > 0]
        sel = ours["chain_index"] == ci
        np.testing.assert_array_equal(ours["aatype"][sel], [rc.restype_order_with_x.get(seqres[i], 20) for i in rows])
        np.testing.assert_array_equal(ours["residue_index"][sel], [mapping[i].position.residue_number for i in rows])
        np.testing.assert_array_equal(ours["insertion_code"][sel],
                                      [mapping[i].position.insertion_code.strip() for i in rows])
        np.testing.assert_array_equal(ours["atom_positions"][sel], pos[rows])
        np.testing.assert_array_equal(ours["atom_mask"][sel], mask[rows])


def test_3pwp_pdb_and_mmcif_give_the_same_features():
    pdb = parse_structure(FIXTURES / "complexes" / "3PWP.pdb.gz")
    cif = parse_structure(FIXTURES / "complexes" / "3PWP.cif.gz")
    assert len(pdb["aatype"]) == 829 and pdb["chain_ids"] == ["A", "B", "C", "D", "E"]
    assert "A" in pdb["insertion_code"]
    for k in ("aatype", "atom_positions", "atom_mask", "residue_index", "insertion_code", "chain_index",
              "chain_ids", "sequence", "ligand_names", "resolution", "release_date"):
        np.testing.assert_array_equal(pdb[k], cif[k], err_msg=k)
    fp, fc = make_features(pdb), make_features(cif)
    assert fp.keys() == fc.keys()
    for k in fp:
        np.testing.assert_array_equal(fp[k], fc[k], err_msg=k)


def test_modified_residue_and_ligand_1hvr():
    """CSO 67 (S-hydroxycysteine, HETATM in the chain) is Cys by default and X as OpenFold's PDB
    parser has it; the inhibitor XK263 is the ligand, not a residue."""
    path = FIXTURES / "complexes" / "1hvr.pdb"
    parent, unknown = parse_structure(path), parse_structure(path, modified_residues="unknown")
    assert parent["chain_ids"] == ["A", "B"] and len(parent["aatype"]) == 198
    cso = np.flatnonzero(parent["residue_index"] == 67)
    assert len(cso) == 2
    assert np.all(parent["aatype"][cso] == rc.restype_order["C"])
    assert np.all(unknown["aatype"][cso] == rc.unk_restype_index)
    sg = rc.atom_order["SG"]
    assert np.all(parent["atom_mask"][cso, sg] == 1)
    np.testing.assert_array_equal(parent["atom_positions"], unknown["atom_positions"])
    assert parent["ligand_names"] == ["XK2"] and parent["ligand_positions"].shape == (46, 3)
    assert parse_structure(path, ligands=["xk2"])["ligand_positions"].shape == (46, 3)


def test_waters_and_ligand_1a28():
    p = parse_structure(FIXTURES / "complexes" / "1a28.pdb.gz")
    assert len(p["aatype"]) == 500 and p["ligand_names"] == ["STR"]
    assert rc.unk_restype_index not in p["aatype"]  # no water or steroid became a residue


def test_nonstandard_hydrogens_are_ignored():
    """wrong_hydrogens: CHARMM-style hydrogen names (HN, HB1, HT1 ...) and a C-terminal N-methyl
    amide cap (NT, CAT) are not atom37 atoms: the two residues keep exactly their heavy atoms."""
    p = parse_structure(FIXTURES / "edge" / "wrong_hydrogens.pdb.gz")
    assert p["sequence"] == "FS"
    for i, res in enumerate(("PHE", "SER")):
        expected = {a for a in rc.residue_atoms[res]} - {"OXT"}
        assert {rc.atom_types[j] for j in np.flatnonzero(p["atom_mask"][i])} == expected


def test_chain_selection():
    path = FIXTURES / "complexes" / "3PWP.cif.gz"
    p = parse_structure(path, chains=["C", "A"])
    assert p["chain_ids"] == ["A", "C"] and len(p["aatype"]) == 275 + 9
    with pytest.raises(StructureError, match="chain 'Z' not in the file"):
        parse_structure(path, chains=["Z"])


EDGE_ERRORS = {
    "1YJP_invalid.cif.gz": ["invalid atom record type(s) WRONG", "unknown element 'X' for atom 1 (X of GLY A1)"],
    "fullerene.pdb.gz": ["no protein chain", "small molecules (MOL)"],
    "incomplete.pdb": ["CA-only trace", "no residue of 3 has a complete N-CA-C backbone"],
    "nucl_res.pdb": ["no protein chain", "nucleic-acid residues (A, ADE"],
    "water_methane_acetic-acid_ammonia.pdb": ["no protein chain", "water (HOH)", "small molecules (ACA)"],
}


@pytest.mark.parametrize("name", sorted(EDGE_ERRORS))
def test_edge_fixture_errors(name):
    path = FIXTURES / "edge" / name
    with pytest.raises(StructureError) as e:
        parse_structure(path)
    assert e.value.path == path
    assert str(e.value).startswith(str(path))
    for part in EDGE_ERRORS[name]:
        assert part in e.value.reason


def test_user_mistakes(tmp_path):
    good = (FIXTURES / "chains" / "2cviA.pdb.gz").read_bytes()
    cases = {
        "missing.pdb": (None, "file not found"),
        "empty.pdb": (b"", "empty file"),
        "blank.cif": (b"\n  \n", "empty file"),
        "empty.pdb.gz": (gzip.compress(b""), "empty file (after gunzip)"),
        "truncated.pdb.gz": (good[: len(good) // 2], "truncated gzip file"),
        "corrupt.pdb.gz": (good[:10] + b"\x00" * 200, "corrupt gzip file"),
        "text.pdb": (b"hello, this is not a structure\n", "no atoms"),
        "garbage.cif": (b"data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1\n", "cannot be parsed as mmCIF"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(StructureError) as e:
            parse_structure(path)
        assert reason in e.value.reason, (name, e.value.reason)
        assert e.value.path == path
    with pytest.raises(StructureError, match="ligand XYZ not found"):
        parse_structure(FIXTURES / "complexes" / "1hvr.pdb", ligands=["XYZ"])


def test_altlocs_take_the_most_occupied_conformer(tmp_path):
    """Per atom, the altloc of highest occupancy (the first on ties), as Biopython selects and
    OpenFold's parsers use (3PWP's altlocs are compared with OpenFold above)."""
    lines = [l for l in text_of(FIXTURES / "chains" / "2cviA.pdb.gz").splitlines() if l.startswith("ATOM")][:12]
    cb, sd = lines[4], lines[6]

    def conformer(line: str, alt: str, occ: float, dx: float) -> str:
        return f"{line[:16]}{alt}{line[17:30]}{float(line[30:38]) + dx:8.3f}{line[38:54]}{occ:6.2f}{line[60:]}"

    lines[4:5] = [conformer(cb, "A", 0.3, 0.0), conformer(cb, "B", 0.7, 1.0)]
    lines[7:8] = [conformer(sd, "A", 0.5, 0.0), conformer(sd, "B", 0.5, 1.0)]
    path = tmp_path / "alt.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")
    p = parse_structure(path)
    assert p["sequence"] == "MV"
    assert p["atom_positions"][0, rc.atom_order["CB"], 0] == pytest.approx(float(cb[30:38]) + 1.0)
    assert p["atom_positions"][0, rc.atom_order["SD"], 0] == pytest.approx(float(sd[30:38]))
