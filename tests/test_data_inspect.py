"""The pre-training report on a folder of structures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import DataConfig
from pipeline.data.inspect import check_path, format_report
from pipeline.errors import DataError


def test_report_counts_usable_and_skipped_files(tmp_path: Path, rna_puzzles: Path):
    natives = rna_puzzles / "natives"
    for name in ("1_solution_0_rpr.pdb", "5_solution_0_rpr.pdb", "21_solution_2_rpr.pdb"):
        (tmp_path / name).symlink_to(natives / name)
    (tmp_path / "empty.cif").write_bytes(b"")
    (tmp_path / "junk.pdb").write_text("nothing here\n")
    report = check_path(tmp_path, DataConfig(crop_length=64))
    assert report["files"] == 5 and report["usable"] == 3
    assert report["chains"] == 4 and report["residues"] == 46 + 188 + 41
    assert report["skipped_files"] == {"empty": 1, "no_atoms": 1}
    assert report["longer_than_crop"] == 1  # puzzle 5, 188 nucleotides
    assert report["length_histogram"]["25-49"] == 2 and report["length_histogram"]["100-199"] == 1
    assert (report["min_length"], report["max_length"]) == (41, 188)
    text = format_report(report)
    assert f"{tmp_path}: 5 structure files, 3 usable" in text
    assert "empty: 1" in text and "junk.pdb" in text
    assert "longer than the crop (64): 1" in text


def test_short_chains_are_reported(rna_puzzles: Path):
    report = check_path(rna_puzzles / "natives", DataConfig(min_chain_length=30))
    # puzzle 1 has two chains of 23 (file skipped); puzzles 15 and 19 lose a short chain B
    assert report["skipped_files"] == {"chains_too_short": 1}
    assert report["skipped_chains"] == {"too_short": 4}
    assert report["usable"] == 17


def test_missing_path_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        check_path(tmp_path / "missing", DataConfig())
