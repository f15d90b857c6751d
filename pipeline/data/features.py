"""The data contract shared by the data layer, the model, the trainer and evaluation.

A *sample* is one RNA structure (:class:`RNASample`, numpy arrays, unpadded). A *batch* is a
dict of padded tensors made by :func:`pipeline.data.collate`:

================  =======================  ===================================================
key               shape / dtype            meaning
================  =======================  ===================================================
``aatype``        (B, L) int64             nucleotide index into ``NUCLEOTIDES``; 4 = unknown
``residue_index`` (B, L) int64             residue number (for relative positions)
``chain_index``   (B, L) int64             chain number 0, 1, ... within the structure
``residue_mask``  (B, L) bool              real (not padding) residues
``coords``        (B, L, A, 3) float32     native coordinates in A of ``ATOM_NAMES`` (targets)
``atom_mask``     (B, L, A) bool           atoms present in the native
``lengths``       (B,) int64               residues per structure
``names``         list[str]                structure ids (not a tensor)
================  =======================  ===================================================

``coords`` and ``atom_mask`` are *targets*: :data:`FEATURE_KEYS` lists what a model may see
when it predicts (sampling never receives the native coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUCLEOTIDES = "ACGU"
UNKNOWN_NUCLEOTIDE = 4
#: Atoms predicted per nucleotide; "N" is the glycosidic nitrogen (N9 for purines, N1 for
#: pyrimidines).
ATOM_NAMES = ("P", "C4'", "C3'", "C1'", "N")
#: Index of the representative atom (C3') used for TM-score, GDT-TS and C3' lDDT.
REPRESENTATIVE_ATOM = ATOM_NAMES.index("C3'")
FEATURE_KEYS = ("aatype", "residue_index", "chain_index", "residue_mask", "lengths")
TARGET_KEYS = ("coords", "atom_mask")


@dataclass
class RNASample:
    """One RNA structure, unpadded. ``L`` residues, ``A = len(ATOM_NAMES)`` atoms each."""

    name: str
    sequence: str  # one letter per residue, from NUCLEOTIDES or "N"
    coords: np.ndarray  # (L, A, 3) float32, A
    atom_mask: np.ndarray  # (L, A) bool
    residue_index: np.ndarray  # (L,) int64
    chain_index: np.ndarray  # (L,) int64

    def __len__(self) -> int:
        return len(self.sequence)


def encode_sequence(sequence: str) -> np.ndarray:
    """Nucleotide indices (L,) int64; anything outside ACGU maps to ``UNKNOWN_NUCLEOTIDE``."""
    table = {c: i for i, c in enumerate(NUCLEOTIDES)}
    return np.array([table.get(c, UNKNOWN_NUCLEOTIDE) for c in sequence.upper()], dtype=np.int64)


def features_only(batch: dict) -> dict:
    """The part of a batch a model may see at prediction time (no native coordinates)."""
    return {k: batch[k] for k in FEATURE_KEYS if k in batch}
