"""Score predicted structure files against a reference (``evaluate --predictions``).

Atoms are matched by (chain, residue number, insertion code, atom name) in reference order.
With ``--atoms all`` RMSD and lDDT use every heavy atom and GDT-TS / TM-score the C3' atoms
(one per nucleotide); with a single atom name every metric uses that atom. Reference atoms the
model lacks count against it (lDDT: not preserved; GDT/TM: never within a cutoff; the count is
logged); RMSD is over the atoms the model has (``n_compared``).

A model is unusable, and skipped with its reason (or, when it is the only file given, reported
as a one-line error), when it cannot be read, when it has no atom in common with the reference
(e.g. other chain names), or when its residue names differ from the reference's at more than
half of the residues they share (a model of another molecule). Fewer differences (point
mutations, a differently modelled base) are scored, with a warning naming them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io.structures import AtomTable, read_structure
from pipeline.metrics import match_atoms, residue_index_from_keys, score_matched

log = logging.getLogger(__name__)

CSV_COLUMNS = ("model", "reference", "atoms", "n_compared", "rmsd", "lddt", "gdt_ts", "tm_score")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz")


def _atom_keys(table: AtomTable, keep: np.ndarray) -> list[tuple]:
    return list(
        zip(
            table.chain[keep].tolist(),
            table.res_num[keep].tolist(),
            table.icode[keep].tolist(),
            table.atom_name[keep].tolist(),
        )
    )


def _select(table: AtomTable, atom: str | None) -> np.ndarray:
    if atom is None:
        return np.ones(len(table), dtype=bool)
    return table.atom_name == atom


class UnusableModel(DataError):
    """A model file that was read but cannot be compared with the reference."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source


def _residue_names(table: AtomTable) -> dict[tuple[str, int, str], str]:
    """``(chain, residue number, insertion code) -> residue name`` (first atom of each residue)."""
    keys = zip(table.chain.tolist(), table.res_num.tolist(), table.icode.tolist())
    names: dict[tuple[str, int, str], str] = {}
    for key, name in zip(keys, table.res_name.tolist()):
        names.setdefault(key, name)
    return names


def sequence_differences(model: AtomTable, reference: AtomTable) -> tuple[list[str], int]:
    """Residues the model shares with the reference whose names differ, and the shared count.

    Returns
    -------
    differences : ``"A15:C->U"`` (chain, number, insertion code, reference -> model name) in
        reference order.
    n_shared : number of residues present in both (same chain, number and insertion code).
    """
    ref_names, mod_names = _residue_names(reference), _residue_names(model)
    shared = [key for key in ref_names if key in mod_names]
    differences = [
        f"{chain}{num}{icode}:{ref_names[(chain, num, icode)]}->{mod_names[(chain, num, icode)]}"
        for chain, num, icode in shared
        if ref_names[(chain, num, icode)] != mod_names[(chain, num, icode)]
    ]
    return differences, len(shared)


def score_model(model: AtomTable, reference: AtomTable, atoms: str) -> dict[str, float]:
    """One row of the CSV (without the file names).

    Raises
    ------
    UnusableModel
        No atom of the selected set in common with the reference, or residue names that differ
        from the reference at more than half of the shared residues.
    """
    main_atom = None if atoms == "all" else atoms
    ref_keep = _select(reference, main_atom)
    mod_keep = _select(model, main_atom)
    model_keys, ref_keys = _atom_keys(model, mod_keep), _atom_keys(reference, ref_keep)
    # Both checks come before matching, so that an unusable model logs nothing but its error.
    if set(model_keys).isdisjoint(ref_keys):
        raise UnusableModel(model.source, "no atoms in common with the reference")
    differences, n_shared = sequence_differences(model, reference)
    if 2 * len(differences) > n_shared:
        raise UnusableModel(
            model.source,
            f"sequence differs from the reference at {len(differences)} of {n_shared} residues",
        )
    if differences:
        shown = ", ".join(differences[:10]) + (", ..." if len(differences) > 10 else "")
        log.warning(
            "%s: sequence differs from the reference at %d of %d residues (%s); scored",
            model.source, len(differences), n_shared, shown,
        )
    match = match_atoms(model_keys, ref_keys)
    residues = list(
        zip(
            reference.chain[ref_keep].tolist(),
            reference.res_num[ref_keep].tolist(),
            reference.icode[ref_keep].tolist(),
            reference.res_name[ref_keep].tolist(),
        )
    )
    row = score_matched(
        model.coords[mod_keep],
        reference.coords[ref_keep],
        match,
        residue_index=residue_index_from_keys(residues),
    )
    if len(match.missing):
        log.warning(
            "%s: %d of %d reference atoms missing from the model (counted against it)",
            model.source,
            len(match.missing),
            match.n_reference,
        )
    if atoms == "all":  # GDT-TS and TM-score on one atom per nucleotide (C3')
        c3 = score_matched(
            model.coords[_select(model, "C3'")],
            reference.coords[_select(reference, "C3'")],
            match_atoms(
                _atom_keys(model, _select(model, "C3'")),
                _atom_keys(reference, _select(reference, "C3'")),
            ),
        )
        row["gdt_ts"], row["tm_score"] = c3["gdt_ts"], c3["tm_score"]
    return row


def list_structure_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--predictions {path}: no such file or directory")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(STRUCTURE_SUFFIXES)
    )
    if not files:
        raise DataError(f"--predictions {path}: no structure files (.pdb, .cif, ...) found")
    return files


def _reason(exc: DataError) -> str:
    """The message of a model error without its leading file path (the row names the file)."""
    text = str(exc)
    for path in (getattr(exc, "path", None), getattr(exc, "source", None)):
        if path and text.startswith(f"{path}: "):
            return text[len(path) + 2 :]
    return text


def _read_reference(reference: Path) -> AtomTable:
    try:
        table, _ = read_structure(reference)
    except DataError as exc:
        raise DataError(f"--reference {exc}") from None
    return table


def evaluate_external(
    predictions: str | Path, reference: str | Path, *, atoms: str = "all", output=None
) -> str:
    """Score every model file against ``reference``; write the CSV; return a text table.

    With a directory, a model file that cannot be used (unreadable, no atom in common with the
    reference, another sequence) is skipped: it is logged, and counted with its reason in
    ``# skipped`` lines under the table. The reference itself (when it sits among the
    predictions) is not scored against itself. With a single file, an unusable model is an
    error.

    Raises
    ------
    DataError
        The reference cannot be read; ``predictions`` is missing or holds no structure file;
        a single model file is unusable; no file of a directory is usable.
    """
    reference = Path(reference)
    predictions = Path(predictions)
    ref_table = _read_reference(reference)
    single = predictions.is_file()
    files = list_structure_files(predictions)
    rows, skipped = [], []
    for path in files:
        if path.resolve() == reference.resolve():
            continue
        try:
            model_table, _ = read_structure(path)
            row = score_model(model_table, ref_table, atoms)
        except DataError as exc:
            if single:
                raise
            skipped.append((path.name, _reason(exc)))
            continue
        rows.append({"model": path.name, "reference": reference.name, "atoms": atoms, **row})
    if not rows:
        if single:
            raise DataError(f"--predictions {predictions}: this is the reference; nothing to score")
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise DataError(
            f"--predictions {predictions}: no usable model file"
            + (f" ({len(skipped)} skipped: {reasons})" if skipped else " besides the reference")
        )
    for name, why in skipped:
        log.warning("skipped %s: %s", predictions / name, why)
    if output:
        with open(output, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row[k]) for k in CSV_COLUMNS})
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(_fmt(r[k]) for k in CSV_COLUMNS) for r in rows]
    if skipped:
        lines.append(f"# skipped {len(skipped)} of {len(rows) + len(skipped)} model file(s):")
        lines += [f"#   {name}: {why}" for name, why in skipped]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
