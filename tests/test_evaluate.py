"""``python -m pipeline evaluate``: external predictions against RNA-Puzzles puzzle 1, bad
inputs through the command line, and sampling that never sees the native coordinates.

References for puzzle 1 are the shared ``predictions/rp01/reference_metrics.csv`` (biotite
lDDT, US-align TM-score, LGA-like GDT-TS; see ``reference_metrics.md`` beside it) and the
published ``rmsds.csv``. They are parsed here, never copied into the test.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.data import collate, generate_synthetic
from pipeline.evaluation import predict
from pipeline.model import ModelConfig, build_model

NATIVE = "1_solution_0_rpr.pdb"
SANTALUCIA = "1_santalucia_1_rpr.pdb"
COLUMNS = ["model", "reference", "atoms", "n_compared", "rmsd", "lddt", "gdt_ts", "tm_score"]
REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def rp01(rna_puzzles: Path) -> Path:
    return rna_puzzles / "predictions" / "rp01"


@pytest.fixture(scope="module")
def references(rp01: Path) -> dict[str, dict]:
    """``reference_metrics.csv`` rows by model file name."""
    _, rows = _read_csv(rp01 / "reference_metrics.csv")
    return {row["model"]: row for row in rows}


@pytest.fixture(scope="module")
def published(rp01: Path) -> dict[str, float]:
    """The puzzle's published all-atom RMSDs (``rmsds.csv``), by file name."""
    _, rows = _read_csv(rp01 / "rmsds.csv")
    return {row["fn"].strip(): float(row["rmsd_all"]) for row in rows}


def _evaluate(rp01: Path, out: Path, atoms: str) -> tuple[list[str], list[dict]]:
    code = main(
        ["evaluate", "--predictions", str(rp01), "--reference", str(rp01 / NATIVE),
         "--atoms", atoms, "--output", str(out)]
    )
    assert code == 0
    return _read_csv(out)


@pytest.fixture(scope="module")
def scored_all(rp01: Path, tmp_path_factory) -> tuple[list[str], list[dict]]:
    return _evaluate(rp01, tmp_path_factory.mktemp("eval") / "all.csv", "all")


@pytest.fixture(scope="module")
def scored_c3(rp01: Path, tmp_path_factory) -> tuple[list[str], list[dict]]:
    return _evaluate(rp01, tmp_path_factory.mktemp("eval") / "c3.csv", "C3'")


def _kept_lddt(note: str) -> float:
    """The lDDT the note gives for unmatched native atoms counted as not preserved."""
    match = re.search(r"counted as not preserved would be ([0-9.]+)", note)
    assert match, f"note has no lDDT with the unmatched atoms kept: {note!r}"
    return float(match.group(1))


# --------------------------------------------------------------------------- puzzle 1 scores


def test_csv_has_one_row_per_model_and_not_the_native(scored_all, references, rp01):
    columns, rows = scored_all
    assert columns == COLUMNS
    models = sorted(p.name for p in rp01.glob("*.pdb") if p.name != NATIVE)
    assert len(rows) == 14 == len(models)
    assert sorted(r["model"] for r in rows) == models == sorted(references)
    assert {r["reference"] for r in rows} == {NATIVE}
    assert {r["atoms"] for r in rows} == {"all"}
    for row in rows:
        assert int(row["n_compared"]) == int(references[row["model"]]["n_atoms"]), row["model"]


def test_all_atom_scores_match_the_references(scored_all, references, published):
    _, rows = scored_all
    worst = dict.fromkeys(("rmsd", "rmsd_published", "lddt", "tm_score", "gdt_ts"), 0.0)
    for row in rows:
        ref = references[row["model"]]
        deviations = {
            "rmsd": abs(float(row["rmsd"]) - float(ref["rmsd_all"])),
            "rmsd_published": abs(float(row["rmsd"]) - published[row["model"]]),
            "tm_score": abs(float(row["tm_score"]) - float(ref["tm_c3"])),
            "gdt_ts": abs(float(row["gdt_ts"]) - float(ref["gdt_ts_c3"])),
        }
        if row["model"] == SANTALUCIA:
            # Its 4 native atoms with no same-name model atom count against it (nothing is
            # dropped silently): the reference is the lDDT its note gives for that convention.
            expected_lddt = _kept_lddt(ref["note"])
            assert abs(expected_lddt - float(ref["lddt_all"])) > 0.005  # the conventions differ
        else:
            assert "not preserved" not in ref["note"]
            expected_lddt = float(ref["lddt_all"])
        deviations["lddt"] = abs(float(row["lddt"]) - expected_lddt)
        for key, value in deviations.items():
            worst[key] = max(worst[key], value)
    assert worst["rmsd"] <= 0.01, worst
    assert worst["rmsd_published"] <= 0.01, worst
    assert worst["lddt"] <= 0.001, worst
    assert worst["tm_score"] <= 0.005, worst
    assert worst["gdt_ts"] <= 0.01, worst


def test_c3_scores_match_the_references(scored_c3, references):
    columns, rows = scored_c3
    assert columns == COLUMNS
    assert len(rows) == 14 and {r["atoms"] for r in rows} == {"C3'"}
    for row in rows:
        ref = references[row["model"]]
        assert int(row["n_compared"]) == int(ref["n_res"]), row["model"]
        assert float(row["rmsd"]) == pytest.approx(float(ref["rmsd_c3"]), abs=0.01), row["model"]
        assert float(row["lddt"]) == pytest.approx(float(ref["lddt_c3"]), abs=0.001), row["model"]
        assert float(row["tm_score"]) == pytest.approx(float(ref["tm_c3"]), abs=0.005)
        assert float(row["gdt_ts"]) == pytest.approx(float(ref["gdt_ts_c3"]), abs=0.01)


# --------------------------------------------------------------------------- bad inputs


def _pdb_line(serial, name, res, chain, num, xyz, element) -> str:
    atom = f" {name:<3s}" if len(name) < 4 else name
    x, y, z = xyz
    return (
        f"ATOM  {serial:5d} {atom} {res:>3s} {chain}{num:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
        f"  1.00  0.00          {element:>2s}\n"
    )


def _protein_only_pdb() -> str:
    atoms = [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"), ("CB", "C")]
    lines = [
        _pdb_line(5 * r + i + 1, name, res, "A", r + 1, (1.5 * i, 3.8 * r, 0.5 * i), element)
        for r, res in enumerate(("ALA", "GLY", "SER"))
        for i, (name, element) in enumerate(atoms)
    ]
    return "".join(lines) + "END\n"


def _junk_bytes() -> bytes:
    rng = random.Random(1)
    return b"\x00junk" + bytes(rng.randrange(256) for _ in range(2000))


def _edit_columns(text: str, start: int, stop: int, new) -> str:
    """Rewrite columns ``[start, stop)`` of every ATOM/HETATM line with ``new(old_value)``."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(("ATOM  ", "HETATM")):
            line = line[:start] + new(line[start:stop]) + line[stop:]
        out.append(line)
    return "".join(out)


def _rename_chains(text: str) -> str:
    return _edit_columns(text, 21, 22, lambda _: "Z")


def _other_sequence(text: str) -> str:
    swap = {"A": "C", "C": "G", "G": "U", "U": "A"}
    return _edit_columns(text, 17, 20, lambda old: f"{swap[old.strip()]:>3s}")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *names: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "file not found"),
        ("empty", "empty file"),
        ("garbage_text", "no atoms"),
        ("junk_bytes", ""),
        ("truncated_pdb", "no atoms"),
        ("truncated_gzip", "truncated or corrupt gzip"),
        ("protein_only", "no RNA chain"),
    ],
)
def test_unusable_reference_is_one_line_exit_2(kind, reason, tmp_path, rp01, capsys):
    native = (rp01 / NATIVE).read_bytes()
    reference = tmp_path / f"{kind}.pdb"
    if kind == "empty":
        reference.write_bytes(b"")
    elif kind == "garbage_text":
        reference.write_text("this is not a structure file\n" * 3)
    elif kind == "junk_bytes":
        reference.write_bytes(_junk_bytes())
    elif kind == "truncated_pdb":  # cut inside the REMARK header, before the first atom
        reference.write_bytes(native[: native.index(b"ATOM") - 10])
    elif kind == "truncated_gzip":
        reference = tmp_path / "native.pdb.gz"
        packed = gzip.compress(native)
        reference.write_bytes(packed[: len(packed) // 2])
    elif kind == "protein_only":
        reference.write_text(_protein_only_pdb())
    code, out, err = _run(capsys, "--predictions", str(rp01), "--reference", str(reference))
    line = _assert_one_line_error(code, err, str(reference), "--reference")
    assert reason in line
    assert out == ""


def test_bad_predictions_argument_is_one_line_exit_2(tmp_path, rp01, capsys):
    reference = str(rp01 / NATIVE)
    missing = tmp_path / "no_such_dir"
    code, _, err = _run(capsys, "--predictions", str(missing), "--reference", reference)
    assert "no such file or directory" in _assert_one_line_error(code, err, str(missing))

    empty_dir = tmp_path / "nothing_here"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("models go here\n")
    code, _, err = _run(capsys, "--predictions", str(empty_dir), "--reference", reference)
    assert "no structure files" in _assert_one_line_error(code, err, str(empty_dir))


def test_inconsistent_options_are_one_line_exit_2(tmp_path, rp01, capsys):
    code, _, err = _run(capsys, "--predictions", str(rp01))
    assert "--reference is required" in _assert_one_line_error(code, err, "--reference")

    checkpoint = tmp_path / "model.pt"
    code, _, err = _run(
        capsys, "--checkpoint", str(checkpoint), "--predictions", str(rp01),
        "--reference", str(rp01 / NATIVE),
    )
    _assert_one_line_error(code, err, "--checkpoint", "--predictions")


@pytest.fixture
def mixed_dir(tmp_path: Path, rp01: Path) -> Path:
    """Three usable models (one with 4 point differences) and four unusable files."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("1_das_1_rpr.pdb", "1_das_3_rpr.pdb", SANTALUCIA):
        (folder / name).write_bytes((rp01 / name).read_bytes())
    good = (rp01 / "1_das_1_rpr.pdb").read_text()
    (folder / "garbage.pdb").write_bytes(_junk_bytes())
    (folder / "empty.pdb").write_bytes(b"")
    (folder / "chain_z.pdb").write_text(_rename_chains(good))
    (folder / "other_sequence.pdb").write_text(_other_sequence(good))
    return folder


def test_batch_skips_unusable_models_and_scores_the_rest(
    mixed_dir, rp01, references, tmp_path, capsys, caplog
):
    out_csv = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.external"):
        code, out, err = _run(
            capsys, "--predictions", str(mixed_dir), "--reference", str(rp01 / NATIVE),
            "--output", str(out_csv),
        )
    assert code == 0, err
    columns, rows = _read_csv(out_csv)
    assert columns == COLUMNS
    scored = {r["model"]: r for r in rows}
    assert sorted(scored) == ["1_das_1_rpr.pdb", "1_das_3_rpr.pdb", SANTALUCIA]
    for name, row in scored.items():
        ref = references[name]
        assert float(row["rmsd"]) == pytest.approx(float(ref["rmsd_all"]), abs=0.01)
        assert int(row["n_compared"]) == int(ref["n_atoms"])
    # the printed table carries the same rows, then the skipped files with their reasons
    lines = out.strip().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert sorted(line.split(",")[0] for line in lines[1:4]) == sorted(scored)
    assert lines[4] == "# skipped 4 of 7 model file(s):"
    reasons = dict(line.removeprefix("#   ").split(": ", 1) for line in lines[5:])
    assert sorted(reasons) == ["chain_z.pdb", "empty.pdb", "garbage.pdb", "other_sequence.pdb"]
    assert reasons["chain_z.pdb"] == "no atoms in common with the reference"
    assert reasons["other_sequence.pdb"] == "sequence differs from the reference at 46 of 46 residues"
    assert reasons["empty.pdb"] == "empty file"
    assert reasons["garbage.pdb"]  # whatever the reader says, it is given
    # the 4 point differences of the scored model are named in a warning
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        SANTALUCIA in m and "sequence differs from the reference at 4 of 46 residues" in m
        and "A15:C->U" in m and "B18:U->C" in m
        for m in messages
    ), messages
    assert sum("skipped" in m for m in messages) == 4


def test_batch_with_no_usable_model_is_one_line_exit_2(mixed_dir, rp01, capsys):
    for name in ("1_das_1_rpr.pdb", "1_das_3_rpr.pdb", SANTALUCIA):
        (mixed_dir / name).unlink()
    code, out, err = _run(
        capsys, "--predictions", str(mixed_dir), "--reference", str(rp01 / NATIVE)
    )
    line = _assert_one_line_error(code, err, str(mixed_dir), "chain_z.pdb", "other_sequence.pdb")
    assert "no usable model file (4 skipped" in line
    assert out == ""


@pytest.mark.parametrize(
    "name, reason",
    [
        ("chain_z.pdb", "no atoms in common with the reference"),
        ("other_sequence.pdb", "sequence differs from the reference at 46 of 46 residues"),
        ("empty.pdb", "empty file"),
    ],
)
def test_single_unusable_model_is_one_line_exit_2(name, reason, mixed_dir, rp01, capsys):
    model = mixed_dir / name
    code, out, err = _run(capsys, "--predictions", str(model), "--reference", str(rp01 / NATIVE))
    assert _assert_one_line_error(code, err, str(model)) == f"error: {model}: {reason}"
    assert out == ""


def test_single_model_error_is_one_line_on_the_real_stderr(mixed_dir, rp01):
    """Run as a process, where log records go to stderr too: the error is still one line."""
    model = mixed_dir / "chain_z.pdb"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", "--predictions", str(model),
         "--reference", str(rp01 / NATIVE)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {model}: no atoms in common with the reference"
    ]
    assert result.stdout == ""


def test_single_good_model_is_scored(rp01, references, capsys):
    model = rp01 / "1_das_1_rpr.pdb"
    code, out, err = _run(capsys, "--predictions", str(model), "--reference", str(rp01 / NATIVE))
    assert code == 0, err
    header, row = out.strip().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert values["model"] == model.name
    assert float(values["rmsd"]) == pytest.approx(float(references[model.name]["rmsd_all"]), abs=0.01)


# --------------------------------------------------------------------------- no native leakage


def test_prediction_never_uses_native_coordinates():
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    batch = collate(generate_synthetic(2, seed=0, min_length=24, max_length=32))
    scrambled = dict(batch)
    generator = torch.Generator().manual_seed(123)
    scrambled["coords"] = 1000 * torch.randn(batch["coords"].shape, generator=generator)
    scrambled["atom_mask"] = ~batch["atom_mask"]
    native = batch["coords"].clone()

    first = predict(model, batch, n_samples=2, n_steps=3, seed=0)
    second = predict(model, scrambled, n_samples=2, n_steps=3, seed=0)
    assert torch.equal(first["coords"], second["coords"])
    assert torch.equal(first["plddt"], second["plddt"])
    assert torch.equal(batch["coords"], native)  # the batch itself is left alone

    # the comparison is not vacuous: real structures, and another seed gives others
    n = int(batch["lengths"][0])
    assert first["coords"].shape[:3] == (2, 2, batch["coords"].shape[1])
    assert torch.isfinite(first["coords"]).all() and first["coords"][0, :, :n].abs().sum() > 0
    other = predict(model, batch, n_samples=2, n_steps=3, seed=1)
    assert not torch.equal(first["coords"], other["coords"])
