"""Score predicted structure files against a reference (``evaluate --predictions``).

Atoms are matched by (chain, residue number, insertion code, atom name) in reference order.
With ``--atoms all`` RMSD and lDDT use every heavy atom and GDT-TS / TM-score the C3' atoms
(one per nucleotide); with a single atom name every metric uses that atom. Reference atoms the
model lacks count against it (lDDT: not preserved; GDT/TM: never within a cutoff; the count is
logged); RMSD is over the atoms the model has (``n_compared``).
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


def score_model(model: AtomTable, reference: AtomTable, atoms: str) -> dict[str, float]:
    """One row of the CSV (without the file names)."""
    main_atom = None if atoms == "all" else atoms
    ref_keep = _select(reference, main_atom)
    mod_keep = _select(model, main_atom)
    match = match_atoms(_atom_keys(model, mod_keep), _atom_keys(reference, ref_keep))
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


def evaluate_external(
    predictions: str | Path, reference: str | Path, *, atoms: str = "all", output=None
) -> str:
    """Score every model file against ``reference``; write the CSV; return a text table.

    A model file that cannot be read is skipped with a warning and counted; the reference
    itself (when it sits among the predictions) is not scored against itself.
    """
    reference = Path(reference)
    ref_table, _ = read_structure(reference)
    rows, skipped = [], []
    for path in list_structure_files(Path(predictions)):
        if path.resolve() == reference.resolve():
            continue
        try:
            model_table, _ = read_structure(path)
        except DataError as exc:
            log.warning("skipping %s", exc)
            skipped.append(f"{path.name}: {exc}")
            continue
        row = score_model(model_table, ref_table, atoms)
        rows.append({"model": path.name, "reference": reference.name, "atoms": atoms, **row})
    if not rows:
        raise DataError(f"--predictions {predictions}: no readable model ({'; '.join(skipped)})")
    if output:
        with open(output, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row[k]) for k in CSV_COLUMNS})
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(_fmt(r[k]) for k in CSV_COLUMNS) for r in rows]
    if skipped:
        lines.append(f"# skipped {len(skipped)} unreadable file(s): " + "; ".join(skipped))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
