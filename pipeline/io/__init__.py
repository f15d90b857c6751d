"""Structure file input and output (PDB, mmCIF) through gemmi."""

from __future__ import annotations

from pipeline.io.structures import (
    AtomTable,
    ReadReport,
    StructureFileError,
    read_structure,
    residue_kind,
    table_to_sample,
    write_structure,
)

__all__ = [
    "AtomTable",
    "ReadReport",
    "StructureFileError",
    "read_structure",
    "residue_kind",
    "table_to_sample",
    "write_structure",
]
