"""PDBbind index parser and folder layout, on the real fixture folder."""
from pathlib import Path

import pytest

from molfun_jax.data.errors import DataError, EntryError
from molfun_jax.data.pdbbind import is_pdbbind_index, read_index, resolve_entry

PDBBIND = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "pdbbind"
INDEX = PDBBIND / "INDEX_general_PL_data.2016"
pytestmark = pytest.mark.skipif(not INDEX.is_file(), reason="PDBbind fixtures not found")


def test_index_every_field():
    entries, bad = read_index(INDEX)
    assert bad == []
    # independent reading: every non-comment line of the file is one entry, in order
    lines = [ln for ln in INDEX.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert [e.pdb_id for e in entries] == [ln.split()[0] for ln in lines]
    assert len(entries) == 7
    by_id = {e.pdb_id: e for e in entries}
    # hand-written from the file's lines
    e = by_id["1nlo"]  # 1nlo   NMR  1997   5.47  Kd=3.4uM      // 1nlo.pdf (11-mer)
    assert (e.resolution, e.year, e.affinity, e.kind, e.relation, e.value, e.unit, e.reference, e.ligand_name) == \
        (None, 1997, 5.47, "Kd", "=", 3.4, "uM", "1nlo.pdf", "11-mer")
    assert e.line == 5 and e.measurement == "Kd=3.4uM"
    e = by_id["1y6r"]  # 1y6r  2.20  2005  10.11  Ki=77pM       // 1y6r.pdf (MTM)
    assert (e.resolution, e.year, e.affinity, e.kind, e.value, e.unit, e.reference, e.ligand_name) == \
        (2.20, 2005, 10.11, "Ki", 77.0, "pM", "1y6r.pdf", "MTM")
    assert e.molar == pytest.approx(77e-12)
    e = by_id["4qf8"]  # 4qf8  1.65  2014   7.51  Kd=31nM       // 4qem.pdf (SPD)
    assert (e.resolution, e.year, e.affinity, e.kind, e.unit, e.reference, e.ligand_name) == \
        (1.65, 2014, 7.51, "Kd", "nM", "4qem.pdf", "SPD")
    assert sum(e.resolution is None for e in entries) == 3  # 1nlo, 1nlp, 2lyw are NMR
    assert sorted({e.kind for e in entries}) == ["Kd", "Ki"]


def test_index_relations_and_bad_lines(tmp_path):
    f = tmp_path / "INDEX_refined_data.2016"
    f.write_text("# PDB code, resolution, release year, -logKd/Ki, Kd/Ki, reference, ligand name\n"
                 "1abc  2.10  2001   6.00  Ki<1uM        // 1abc.pdf (ABC)\n"
                 "1abd  1.90  2002   5.00  IC50~10uM     // 1abd.pdf (ABD) \n"
                 "1abe  1.90  2002   5.00  Kd>=10mM      // 1abe.pdf\n"
                 "1abf  1.90  200x   5.00  Kd=1nM        // 1abf.pdf (ABF)\n"
                 "1abg  1.90  2003   5.00  Kx=1nM        // 1abg.pdf (ABG)\n")
    assert is_pdbbind_index(f)
    entries, bad = read_index(f)
    assert [(e.pdb_id, e.kind, e.relation, e.value, e.unit) for e in entries] == [
        ("1abc", "Ki", "<", 1.0, "uM"), ("1abd", "IC50", "~", 10.0, "uM"), ("1abe", "Kd", ">=", 10.0, "mM")]
    assert entries[2].ligand_name == "" and entries[2].reference == "1abe.pdf"
    assert [(b.row, b.pdb_id) for b in bad] == [(5, "1abf"), (6, "1abg")]
    assert all(isinstance(b, EntryError) and b.path == f for b in bad)
    assert "measurement 'Kx=1nM'" in bad[1].reason


def test_index_recognised_by_content(tmp_path):
    assert is_pdbbind_index(INDEX)
    csv = tmp_path / "INDEX_general_PL_data.2016.csv"
    csv.write_text("pdb_id,affinity\n1nlo,5.47\n")
    assert not is_pdbbind_index(csv)
    assert not is_pdbbind_index(tmp_path / "missing")
    with pytest.raises(DataError, match="not found"):
        read_index(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n")
    with pytest.raises(DataError, match="no data line"):
        read_index(empty)


def test_resolve_pdbbind_layout():
    f = resolve_entry(PDBBIND, "4x6p")
    assert f.layout == "pdbbind" and not f.used_pocket
    assert f.protein == PDBBIND / "4x6p" / "4x6p_protein.pdb"
    assert f.ligand == PDBBIND / "4x6p" / "4x6p_ligand.sdf"
    assert f.ligand_fallback == PDBBIND / "4x6p" / "4x6p_ligand.mol2"
    assert f.pocket == PDBBIND / "4x6p" / "4x6p_pocket.pdb"
    f = resolve_entry(PDBBIND, "2lyw")  # sdf only
    assert f.ligand.name == "2lyw_ligand.sdf" and f.ligand_fallback is None


def test_resolve_missing_protein_and_pocket_option():
    with pytest.raises(EntryError, match="no protein file 1ps3_protein.pdb; only the pocket file") as e:
        resolve_entry(PDBBIND, "1ps3")
    assert e.value.path == PDBBIND / "1ps3"
    f = resolve_entry(PDBBIND, "1ps3", use_pocket_files=True)
    assert f.used_pocket and f.protein == PDBBIND / "1ps3" / "1ps3_pocket.pdb"
    # the pocket file only when asked: an entry with a protein keeps it
    assert resolve_entry(PDBBIND, "4qf8", use_pocket_files=True).protein.name == "4qf8_protein.pdb"


def test_resolve_flat_and_missing(tmp_path):
    (tmp_path / "1abc.pdb").write_text("END\n")
    (tmp_path / "1abc_ligand.mol2").write_text("")
    f = resolve_entry(tmp_path, "1abc")
    assert f.layout == "flat" and f.protein == tmp_path / "1abc.pdb" and f.ligand == tmp_path / "1abc_ligand.mol2"
    (tmp_path / "1abd.cif.gz").write_bytes(b"")
    assert resolve_entry(tmp_path, "1abd").ligand is None  # HETATM ligand of the complex
    with pytest.raises(EntryError, match="no structure file 9xyz"):
        resolve_entry(tmp_path, "9xyz")
    (tmp_path / "9xyz").mkdir()
    with pytest.raises(EntryError, match="no protein file 9xyz_protein.pdb \\(nor a pocket file\\)"):
        resolve_entry(tmp_path, "9xyz")
    (tmp_path / "9xyz" / "9xyz_protein.pdb").write_text("END\n")
    with pytest.raises(EntryError, match="no ligand file 9xyz_ligand.sdf"):
        resolve_entry(tmp_path, "9xyz")
