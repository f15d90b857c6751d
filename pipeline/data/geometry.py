"""Geometry statistics of RNA structures at the resolution of ``ATOM_NAMES``.

The same functions measure the real structures (the RNA-Puzzles natives) and the synthetic
ones, so that the two can be compared number by number (``docs/data.md`` lists both; a test
keeps the synthetic numbers inside ranges around the native ones). Distances in Angstrom.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.features import ATOM_NAMES, RNASample

if TYPE_CHECKING:
    from pipeline.io.structures import AtomTable

P, C4, C3, C1, NG = (ATOM_NAMES.index(a) for a in ("P", "C4'", "C3'", "C1'", "N"))
#: Closest approach (A) of two atoms of different residues that are not bonded; the one
#: chemically bonded-through pair among ``ATOM_NAMES`` is C3'(i)..P(i+1) (via O3', 2.6 A).
CLASH_DISTANCE = 3.0
#: Hydrogen-bond donor/acceptor pairs that define a cis Watson-Crick (or G-U wobble) pair,
#: keyed by (residue i, residue j); all must be within ``PAIR_HBOND_CUTOFF``.
_PAIR_HBONDS = {
    ("G", "C"): (("N1", "N3"), ("O6", "N4"), ("N2", "O2")),
    ("A", "U"): (("N1", "N3"), ("N6", "O4")),
    ("G", "U"): (("N1", "O2"), ("O6", "N3")),
}
PAIR_HBOND_CUTOFF = 3.2
#: Fewest residues between two paired residues of one chain (a hairpin loop has >= 3).
MIN_LOOP = 3


def consecutive_mask(sample: RNASample) -> np.ndarray:
    """(L-1,) bool: residue i+1 follows residue i in the same chain (numbers differ by 1)."""
    same_chain = sample.chain_index[1:] == sample.chain_index[:-1]
    adjacent = np.diff(sample.residue_index) == 1
    return same_chain & adjacent


def step_distances(sample: RNASample, atom_i: str = "C3'", atom_j: str = "C3'") -> np.ndarray:
    """Distances (A) from ``atom_i`` of residue i to ``atom_j`` of residue i+1, chain-consecutive
    residues with both atoms present."""
    a, b = ATOM_NAMES.index(atom_i), ATOM_NAMES.index(atom_j)
    ok = consecutive_mask(sample) & sample.atom_mask[:-1, a] & sample.atom_mask[1:, b]
    d = np.linalg.norm(sample.coords[1:, b] - sample.coords[:-1, a], axis=-1)
    return d[ok].astype(np.float64)


def intra_distances(sample: RNASample, atom_a: str, atom_b: str) -> np.ndarray:
    """Distances (A) between two atoms of the same residue, where both are present."""
    a, b = ATOM_NAMES.index(atom_a), ATOM_NAMES.index(atom_b)
    ok = sample.atom_mask[:, a] & sample.atom_mask[:, b]
    return np.linalg.norm(sample.coords[ok, a] - sample.coords[ok, b], axis=-1).astype(np.float64)


def pair_distances(
    sample: RNASample, pairs: Iterable[tuple[int, int]], atom: str = "C1'"
) -> np.ndarray:
    """Distances (A) between ``atom`` of the two residues of each base pair (residue indices)."""
    a = ATOM_NAMES.index(atom)
    pairs = [(i, j) for i, j in pairs if sample.atom_mask[i, a] and sample.atom_mask[j, a]]
    if not pairs:
        return np.zeros(0)
    i, j = np.array(pairs).T
    return np.linalg.norm(sample.coords[i, a] - sample.coords[j, a], axis=-1).astype(np.float64)


def nonbonded_distances(sample: RNASample, cutoff: float = 4.0) -> np.ndarray:
    """Distances (A) below ``cutoff`` between atoms of different residues, bonded pairs excluded.

    The excluded pair is C3'(i)..P(i+1) of chain-consecutive residues (joined through O3').
    """
    n_res, n_atoms = sample.atom_mask.shape
    xyz = sample.coords.reshape(-1, 3).astype(np.float64)
    present = sample.atom_mask.reshape(-1)
    residue = np.repeat(np.arange(n_res), n_atoms)
    slot = np.tile(np.arange(n_atoms), n_res)
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    keep = (residue[:, None] < residue[None]) & present[:, None] & present[None] & (d < cutoff)
    link = np.zeros(n_res, dtype=bool)
    link[:-1] = consecutive_mask(sample)
    bonded = (
        (slot[:, None] == C3)
        & (slot[None] == P)
        & (residue[None] == residue[:, None] + 1)
        & link[residue][:, None]
    )
    return d[keep & ~bonded]


def clash_count(sample: RNASample, threshold: float = CLASH_DISTANCE) -> int:
    """Number of non-bonded atom pairs of different residues closer than ``threshold`` (A)."""
    return int((nonbonded_distances(sample, cutoff=threshold)).size)


def find_base_pairs(
    residue_atoms: Sequence[dict[str, np.ndarray]],
    residue_names: Sequence[str],
    chain_index: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Canonical base pairs (Watson-Crick and G-U wobble) from full-atom coordinates.

    A pair (i, j) needs every hydrogen bond of its type (``_PAIR_HBONDS``) between donor and
    acceptor within ``PAIR_HBOND_CUTOFF`` A, and, within one chain, at least ``MIN_LOOP``
    residues between i and j (neighbours that stack can bring N1..N3 within 3.5 A).

    Parameters
    ----------
    residue_atoms : per residue, atom name -> (3,) coordinates in A (all heavy atoms).
    residue_names : per residue, the parent nucleotide letter.
    chain_index : (L,) chain number per residue; the ``MIN_LOOP`` rule applies within a chain.

    Returns
    -------
    Sorted list of (i, j) with i < j.
    """
    n = len(residue_atoms)
    chains = np.zeros(n, dtype=np.int64) if chain_index is None else np.asarray(chain_index)
    pairs: list[tuple[int, int]] = []
    for i in range(n):
        for j in range(i + 1, n):
            if chains[i] == chains[j] and j - i <= MIN_LOOP:
                continue
            for p, q in ((i, j), (j, i)):
                hbonds = _PAIR_HBONDS.get((residue_names[p], residue_names[q]))
                atoms_p, atoms_q = residue_atoms[p], residue_atoms[q]
                if hbonds and all(_within(atoms_p, atoms_q, a, b) for a, b in hbonds):
                    pairs.append((i, j))
                    break
    return pairs


def pairs_from_table(table: AtomTable) -> list[tuple[int, int]]:
    """Canonical base pairs of a full-atom table, as residue indices of ``table_to_sample``."""
    keys = table.residue_keys()
    index_of = {key: i for i, key in enumerate(keys)}
    atoms: list[dict[str, np.ndarray]] = [{} for _ in keys]
    names = [""] * len(keys)
    for row in range(len(table)):
        i = index_of[(table.chain[row], int(table.res_num[row]), table.icode[row])]
        atoms[i][str(table.atom_name[row])] = table.coords[row]
        names[i] = str(table.res_name[row])
    chain_names = list(dict.fromkeys(k[0] for k in keys))
    chains = np.array([chain_names.index(k[0]) for k in keys])
    return find_base_pairs(atoms, names, chains)


def _within(atoms_p: dict, atoms_q: dict, name_p: str, name_q: str) -> bool:
    if name_p not in atoms_p or name_q not in atoms_q:
        return False
    return float(np.linalg.norm(atoms_p[name_p] - atoms_q[name_q])) <= PAIR_HBOND_CUTOFF


def describe(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, 5th/50th/95th percentile and count of a sample of values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "p5": float("nan"),
                "median": float("nan"), "p95": float("nan")}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {"n": int(values.size), "mean": float(values.mean()), "sd": float(values.std()),
            "p5": float(p5), "median": float(median), "p95": float(p95)}


def geometry_summary(
    samples: Sequence[RNASample], pairs: Sequence[Iterable[tuple[int, int]]]
) -> dict[str, dict[str, float] | float]:
    """Geometry statistics over a set of structures.

    Parameters
    ----------
    samples : structures.
    pairs : per structure, its canonical base pairs as residue indices.

    Returns
    -------
    dict with :func:`describe` summaries (A) of ``c3_step`` (C3'(i)..C3'(i+1)), ``p_step``,
    ``link`` (C3'(i)..P(i+1)), ``c1_pair`` (C1'..C1' of base pairs), intra-residue ``p_c4``,
    ``c4_c3``, ``c3_c1``, ``c1_n``; and ``clashes_per_100_residues`` (non-bonded pairs of
    different residues closer than ``CLASH_DISTANCE``) and ``min_nonbonded`` (A).
    """
    collect: dict[str, list[np.ndarray]] = {k: [] for k in (
        "c3_step", "p_step", "link", "c1_pair", "p_c4", "c4_c3", "c3_c1", "c1_n")}
    n_clash = 0
    n_res = 0
    min_nb = np.inf
    for sample, sample_pairs in zip(samples, pairs):
        collect["c3_step"].append(step_distances(sample, "C3'", "C3'"))
        collect["p_step"].append(step_distances(sample, "P", "P"))
        collect["link"].append(step_distances(sample, "C3'", "P"))
        collect["c1_pair"].append(pair_distances(sample, sample_pairs, "C1'"))
        collect["p_c4"].append(intra_distances(sample, "P", "C4'"))
        collect["c4_c3"].append(intra_distances(sample, "C4'", "C3'"))
        collect["c3_c1"].append(intra_distances(sample, "C3'", "C1'"))
        collect["c1_n"].append(intra_distances(sample, "C1'", "N"))
        close = nonbonded_distances(sample, cutoff=6.0)
        n_clash += int((close < CLASH_DISTANCE).sum())
        if close.size:
            min_nb = min(min_nb, float(close.min()))
        n_res += len(sample)
    out: dict[str, dict[str, float] | float] = {
        k: describe(np.concatenate(v) if v else np.zeros(0)) for k, v in collect.items()
    }
    out["clashes_per_100_residues"] = 100.0 * n_clash / max(n_res, 1)
    out["min_nonbonded"] = float(min_nb)
    return out
