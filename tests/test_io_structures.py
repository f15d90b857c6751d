"""Reading and writing structures: the 18 RNA-Puzzles natives, broken inputs, round trips."""

from __future__ import annotations

import gzip
from pathlib import Path

import gemmi
import numpy as np
import pytest

from pipeline.data.features import ATOM_NAMES
from pipeline.errors import DataError
from pipeline.io.structures import (
    StructureFileError,
    read_structure,
    residue_kind,
    table_to_sample,
    write_structure,
)

#: The table of ../shared/data/rna_puzzles/README.md: file -> (residues, chains).
NATIVES = {
    "1_solution_0_rpr.pdb": (46, "AB"),
    "3_solution_0_rpr.pdb": (84, "A"),
    "4_solution_0_rpr.pdb": (126, "A"),
    "5_solution_0_rpr.pdb": (188, "A"),
    "6_solution_0_rpr.pdb": (158, "A"),
    "8_solution_0_rpr.pdb": (96, "A"),
    "9_solution_0_rpr.pdb": (71, "A"),
    "10_solution_0_rpr.pdb": (157, "AB"),
    "solution_5iem_rpr.pdb": (57, "A"),
    "13_solution_0_rpr.pdb": (60, "A"),
    "14_solution_bound_0_rpr.pdb": (61, "A"),
    "14_solution_free_0_rpr.pdb": (58, "A"),
    "15_solution_0_rpr.pdb": (68, "AB"),
    "17_solution_0_rpr.pdb": (58, "A"),
    "18_solution_0_rpr.pdb": (71, "A"),
    "19_solution_0_rpr.pdb": (62, "AB"),
    "21_solution_2_rpr.pdb": (41, "A"),
    "R1107_solution_0_7qr4_rpr.pdb": (69, "A"),
}


@pytest.fixture(scope="module")
def native_1(rna_puzzles: Path) -> Path:
    return rna_puzzles / "natives" / "1_solution_0_rpr.pdb"


def _pdb_atom(serial: int, name: str, res: str, chain: str, num: int, xyz, element: str,
              altloc: str = " ", occ: float = 1.0, record: str = "ATOM") -> str:
    """One fixed-column PDB ATOM/HETATM record."""
    padded = f" {name:<3}" if len(name) < 4 else name
    return (
        f"{record:<6}{serial:5d} {padded:<4}{altloc}{res:>3} {chain}{num:4d}    "
        f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{occ:6.2f}{20.0:6.2f}          {element:>2}"
    )


def _renamed_copy(src: Path, dst: Path, names: dict[int, str]) -> Path:
    """``src`` with residue ``num`` of chain A renamed to ``names[num]`` (written via gemmi)."""
    st = gemmi.read_structure(str(src))
    for residue in st[0]["A"]:
        if residue.seqid.num in names:
            residue.name = names[residue.seqid.num]
            residue.het_flag = "H"
    st.write_pdb(str(dst))
    return dst


@pytest.mark.parametrize("filename", sorted(NATIVES))
def test_every_native_parses_with_the_documented_residues_and_chains(
    rna_puzzles: Path, filename: str
):
    n_res, chains = NATIVES[filename]
    table, report = read_structure(rna_puzzles / "natives" / filename)
    sample = table_to_sample(table, filename)
    assert len(sample) == n_res == report.n_residues
    assert "".join(dict.fromkeys(table.chain.tolist())) == chains
    assert report.n_chains == len(chains)
    assert sample.chain_index.max() == len(chains) - 1  # two-chain files keep both chains
    assert set(sample.sequence) <= set("ACGU")
    assert sample.atom_mask.all()  # the natives are complete at ATOM_NAMES resolution
    for c in range(len(chains)):
        assert np.all(np.diff(sample.residue_index[sample.chain_index == c]) > 0)
    # the glycosidic N is bonded to C1' (1.47 A), whichever base it is
    c1, n = ATOM_NAMES.index("C1'"), ATOM_NAMES.index("N")
    bond = np.linalg.norm(sample.coords[:, c1] - sample.coords[:, n], axis=-1)
    assert np.all(np.abs(bond - 1.47) < 0.1)


def test_heavy_atoms_only_and_elements(native_1: Path):
    table, report = read_structure(native_1)
    assert report.hydrogens_dropped == 0
    assert set(table.element.tolist()) <= {"C", "N", "O", "P"}
    assert table.coords.dtype == np.float64 and table.coords.shape == (len(table), 3)
    assert len(table) == 978  # all heavy atoms of puzzle 1, as in rmsds.csv


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"hello, this is not a structure\n", "no_atoms"),
        (b"\x00\x01\x02binary\xff\xfe", "no_atoms"),
    ],
)
def test_unusable_content_is_a_one_line_data_error(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "bad.pdb"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_structure(path)
    assert isinstance(info.value, StructureFileError) and info.value.reason == reason
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file(tmp_path: Path):
    with pytest.raises(StructureFileError, match="file not found") as info:
        read_structure(tmp_path / "nope.cif")
    assert info.value.reason == "missing"


def test_truncated_pdb_mmcif_and_gzip(tmp_path: Path, native_1: Path):
    text = native_1.read_text()
    cut = text.index("ATOM    489")  # in the middle of a record
    pdb = tmp_path / "cut.pdb"
    pdb.write_text(text[: cut + 17])
    with pytest.raises(StructureFileError, match="truncated or unparseable pdb") as info:
        read_structure(pdb)
    assert info.value.reason == "unparseable"

    st = gemmi.read_structure(str(native_1))
    st.setup_entities()
    cif_text = st.make_mmcif_document().as_string()
    cif = tmp_path / "cut.cif"
    cif.write_text(cif_text[: len(cif_text) // 2])
    with pytest.raises(StructureFileError, match="truncated or unparseable mmcif") as info:
        read_structure(cif)
    assert info.value.reason == "unparseable"

    packed = gzip.compress(text.encode())
    gz = tmp_path / "cut.pdb.gz"
    gz.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(StructureFileError, match="gzip") as info:
        read_structure(gz)
    assert info.value.reason == "corrupt_gzip"


def test_gzip_and_mmcif_read_like_the_pdb(tmp_path: Path, native_1: Path):
    table, _ = read_structure(native_1)
    gz = tmp_path / "n1.pdb.gz"
    gz.write_bytes(gzip.compress(native_1.read_bytes()))
    st = gemmi.read_structure(str(native_1))
    st.setup_entities()
    cif = tmp_path / "n1.whatever"  # the format is recognised from the content, not the suffix
    cif.write_text(st.make_mmcif_document().as_string())
    for other in (gz, cif):
        again, report = read_structure(other)
        assert report.fmt == ("mmcif" if other == cif else "pdb")
        assert np.array_equal(again.atom_name, table.atom_name)
        assert np.allclose(again.coords, table.coords, atol=1e-3)


def test_dna_only_and_protein_only_files_have_no_rna_chain(tmp_path: Path, native_1: Path):
    dna = _renamed_copy(native_1, tmp_path / "dna.pdb", {n: "DC" for n in range(1, 24)})
    st = gemmi.read_structure(str(dna))
    st[0].remove_chain("B")
    st.write_pdb(str(dna))
    with pytest.raises(StructureFileError, match="no RNA chain") as info:
        read_structure(dna)
    assert info.value.reason == "no_rna_chain" and "dna: 1" in str(info.value)

    protein = tmp_path / "protein.pdb"
    lines = []
    for k, num in enumerate(range(1, 4)):
        for j, (atom, element) in enumerate((("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"))):
            xyz = (3.8 * k + j, 0.0, 0.0)
            lines.append(_pdb_atom(4 * k + j + 1, atom, "ALA", "P", num, xyz, element))
    protein.write_text("\n".join(lines + ["END", ""]))
    with pytest.raises(StructureFileError, match="protein: 1") as info:
        read_structure(protein)
    assert info.value.reason == "no_rna_chain"


def test_mixed_file_keeps_rna_and_counts_the_rest(tmp_path: Path, native_1: Path):
    lines = native_1.read_text().rstrip("\n").splitlines()
    first_b = next(i for i, line in enumerate(lines) if line.startswith("ATOM") and line[21] == "B")
    ion_in_a = _pdb_atom(2004, "MG", "MG", "A", 901, (61.0, 0, 0), "MG", record="HETATM")
    lines.insert(first_b, ion_in_a)  # inside chain A, before chain B starts
    extra = [
        _pdb_atom(2001, "CA", "ALA", "P", 1, (50.0, 0, 0), "C"),
        _pdb_atom(2002, "CA", "GLY", "P", 2, (53.8, 0, 0), "C"),
        _pdb_atom(2003, "O", "HOH", "W", 1, (60.0, 0, 0), "O", record="HETATM"),
        _pdb_atom(2005, "S", "SO4", "L", 1, (70.0, 0, 0), "S", record="HETATM"),
    ]
    path = tmp_path / "mixed.pdb"
    path.write_text("\n".join(lines + extra) + "\nEND\n")
    table, report = read_structure(path)
    assert dict(report.skipped_chains) == {"protein": 1, "water": 1, "ligand": 1}
    assert dict(report.skipped_residues) == {"ligand": 1}  # the ion inside RNA chain A
    assert report.n_chains == 2 and report.n_residues == 46
    assert set(table.res_name.tolist()) <= set("ACGU")


def test_modified_nucleotides_map_to_parents_or_are_counted(tmp_path: Path, native_1: Path):
    # chain A of puzzle 1 is CCGCCGCGCCAUGCCUGUGGCGG: 12 is U, 1 is C, 3 is G
    path = _renamed_copy(native_1, tmp_path / "mod.pdb", {12: "PSU", 1: "5MC", 3: "2MG", 5: "I"})
    table, report = read_structure(path)
    assert dict(report.modified_mapped) == {"PSU->U": 1, "5MC->C": 1, "2MG->G": 1}
    assert dict(report.modified_skipped) == {"I": 1}  # inosine has no A/C/G/U parent
    sample = table_to_sample(table, "mod")
    assert len(sample) == 45
    assert sample.sequence[:11] == "CCGC" + "GCGCCAU"  # residue 5 (inosine) left out
    # pseudouridine's glycosidic atom is C5 (the C-glycoside), not N1
    psu = table.orig_res_name == "PSU"
    c5 = table.coords[psu & (table.atom_name == "C5")][0]
    row = int(np.nonzero(sample.residue_index[sample.chain_index == 0] == 12)[0][0])
    assert np.allclose(sample.coords[row, ATOM_NAMES.index("N")], c5)


def test_residue_kinds():
    assert residue_kind("A") == ("rna", "A")
    assert residue_kind("PSU") == ("rna", "U")
    assert residue_kind("OMG") == ("rna", "G")
    assert residue_kind("DT")[0] == "dna"
    assert residue_kind("LYS")[0] == "protein"
    assert residue_kind("HOH")[0] == "water"
    assert residue_kind("SO4")[0] == "ligand"


def test_altlocs_keep_highest_occupancy_and_hydrogens_are_dropped(tmp_path: Path, native_1: Path):
    lines = native_1.read_text().splitlines()
    out = []
    for line in lines:
        if line.startswith("ATOM") and line[12:16] == " C1'" and line[21:26] == "A   1":
            out.append(line[:16] + "A" + line[17:54] + "  0.40" + line[60:])
            moved = f"{float(line[30:38]) + 1.0:8.3f}"
            out.append(line[:16] + "B" + line[17:30] + moved + line[38:54] + "  0.60" + line[60:])
            out.append(_pdb_atom(9999, "H1'", "C", "A", 1, (0.0, 0.0, 0.0), "H"))
        else:
            out.append(line)
    path = tmp_path / "alt.pdb"
    path.write_text("\n".join(out) + "\n")
    table, report = read_structure(path)
    assert report.altlocs_resolved == 1 and report.hydrogens_dropped == 1
    ref, _ = read_structure(native_1)
    pick = (table.chain == "A") & (table.res_num == 1) & (table.atom_name == "C1'")
    ref_pick = (ref.chain == "A") & (ref.res_num == 1) & (ref.atom_name == "C1'")
    assert pick.sum() == 1
    assert np.allclose(table.coords[pick][0], ref.coords[ref_pick][0] + [1.0, 0.0, 0.0], atol=1e-3)


def test_insertion_codes_keep_residue_index_increasing(tmp_path: Path):
    lines = []
    serial = 1
    for k, (num, icode) in enumerate(((10, " "), (10, "A"), (10, "B"), (11, " "))):
        for atom, element in (("P", "P"), ("C4'", "C"), ("C3'", "C"), ("C1'", "C"), ("N9", "N")):
            rec = _pdb_atom(serial, atom, "A", "A", num, (6.0 * k, serial * 0.3, 0.0), element)
            lines.append(rec[:26] + icode + rec[27:])
            serial += 1
    path = tmp_path / "icode.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")
    table, _ = read_structure(path)
    assert table.icode.tolist().count("A") == 5
    sample = table_to_sample(table, "icode")
    assert sample.residue_index.tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("suffix", [".pdb", ".cif", ".mmcif", ".pdb.gz", ".cif.gz"])
def test_write_read_round_trip(tmp_path: Path, native_1: Path, suffix: str):
    table, _ = read_structure(native_1)
    sample = table_to_sample(table, "n1")
    mask = sample.atom_mask.copy()
    mask[3, ATOM_NAMES.index("P")] = False  # a missing atom is not written
    plddt = np.linspace(10.0, 95.0, len(sample))
    chains = np.where(sample.chain_index == 0, "A", "B")
    numbers = sample.residue_index + 100
    path = write_structure(
        tmp_path / f"out{suffix}", sample.sequence, sample.coords,
        atom_mask=mask, plddt=plddt, chain_ids=chains, residue_numbers=numbers,
    )
    again_table, report = read_structure(path)
    again = table_to_sample(again_table, "again")
    assert report.fmt == ("mmcif" if ".cif" in suffix or ".mmcif" in suffix else "pdb")
    assert again.sequence == sample.sequence
    assert np.array_equal(again.atom_mask, mask)
    assert np.allclose(again.coords[mask], sample.coords[mask], atol=1e-3)
    assert np.array_equal(again.residue_index, numbers)
    assert np.array_equal(again.chain_index, sample.chain_index)
    # the glycosidic N is N9 for purines and N1 for pyrimidines, with element N
    st = gemmi.read_structure(str(path))
    for residue in st[0]["A"]:
        expected = "N9" if residue.name in "AG" else "N1"
        assert residue.find_atom(expected, "*") is not None
        assert residue.find_atom(expected, "*").element.name == "N"
        phosphorus = residue.find_atom("P", "*")
        assert phosphorus is None or phosphorus.element.name == "P"
        # pLDDT goes to the B-factor column
        i = int(np.nonzero(numbers == residue.seqid.num)[0][0])
        assert all(abs(atom.b_iso - plddt[i]) < 0.01 for atom in residue)


def test_write_rejects_wrong_shapes_and_unknown_suffixes(tmp_path: Path):
    with pytest.raises(ValueError, match="coords must have shape"):
        write_structure(tmp_path / "x.pdb", "ACG", np.zeros((2, len(ATOM_NAMES), 3)))
    with pytest.raises(ValueError, match="suffix"):
        write_structure(tmp_path / "x.xyz", "ACG", np.zeros((3, len(ATOM_NAMES), 3)))
