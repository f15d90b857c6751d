"""Structure metrics for validation batches and for external predictions.

Two entry points:

- :func:`score_batch` (and :func:`score_predictions` for a data-contract batch): the validation
  metric set on one representative atom per nucleotide (C3'), batched on the device. Keys are
  the names logged as ``val/<key>``.
- :func:`match_atoms` + :func:`score_matched`: all-atom (or one-atom) comparison of a model
  read from a file with its native, atoms matched by (chain, residue number, insertion code,
  atom name) in native order. Atoms the model lacks are reported and count against it.

Conventions are those of design brief section 4, as implemented (and documented) by
:func:`~pipeline.metrics.rmsd`, :func:`~pipeline.metrics.lddt`,
:func:`~pipeline.metrics.tm_score`, :func:`~pipeline.metrics.gdt` and
:func:`~pipeline.metrics.chirality`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.features import REPRESENTATIVE_ATOM
from pipeline.metrics._search import DEFAULT_CHUNK_ELEMENTS
from pipeline.metrics.chirality import chirality
from pipeline.metrics.gdt import GDT_TS_CUTOFFS, gdt
from pipeline.metrics.lddt import lddt, lddt_per_residue
from pipeline.metrics.superpose import rmsd
from pipeline.metrics.tm_score import tm_score

__all__ = [
    "VALIDATION_METRICS",
    "AtomMatch",
    "match_atoms",
    "plddt_target",
    "representative_atoms",
    "residue_index_from_keys",
    "score_batch",
    "score_matched",
    "score_predictions",
]

logger = logging.getLogger(__name__)

#: Keys of :func:`score_batch`, logged as ``val/<key>``.
VALIDATION_METRICS = ("rmsd", "lddt", "gdt_ts", "tm_score", "chirality")

AtomKey = tuple[str, int, str, str]


def representative_atoms(
    coords: torch.Tensor,
    atom_mask: torch.Tensor,
    residue_mask: torch.Tensor | None = None,
    *,
    atom: int = REPRESENTATIVE_ATOM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One atom per nucleotide (C3' by default) from per-residue atom coordinates.

    Parameters
    ----------
    coords : torch.Tensor
        (B, L, A, 3) coordinates in the ``ATOM_NAMES`` order of :mod:`pipeline.data.features`.
    atom_mask : torch.Tensor
        (B, L, A) atoms present.
    residue_mask : torch.Tensor, optional
        (B, L) real (not padding) residues.
    atom : int
        Index into ``ATOM_NAMES`` (default C3').

    Returns
    -------
    (B, L, 3) coordinates and (B, L) bool mask of residues that have that atom.
    """
    mask = atom_mask[..., atom].bool()
    if residue_mask is not None:
        mask = mask & residue_mask.bool()
    return coords[..., atom, :], mask


@torch.no_grad()
def score_batch(
    pred: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_ref: int | torch.Tensor | None = None,
    gdt_max_seeds: int | None = None,
    tm_max_seeds: int | None = None,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """Validation metrics of predicted vs native structures on one atom per nucleotide.

    Parameters
    ----------
    pred, ref : torch.Tensor
        (B, L, 3) C3' coordinates in Angstrom, residue ``i`` corresponding.
    mask : torch.Tensor
        (B, L) bool, residues whose C3' exists in the native (and the prediction).
    n_ref : int or torch.Tensor, optional
        Reference length(s) for TM-score and GDT; default ``mask.sum(-1)``.
    gdt_max_seeds, tm_max_seeds : int, optional
        Search budgets of :func:`~pipeline.metrics.gdt` and :func:`~pipeline.metrics.tm_score`
        (``None`` = exhaustive, the reference algorithms). Measured on an H100 for 64 x 500 nt:
        25 ms per structure exhaustive, 5.5 ms with ``gdt_max_seeds=512`` (GDT-TS lower by
        0.002 on average, at most 0.006), 2.2 GiB peak memory; see
        ``benchmarks/bench_metrics.py``.
    chunk_elements : int, optional
        Memory bound of the superposition searches (see :func:`~pipeline.metrics.gdt`).
    compiled : bool
        Use the fused kernels of :mod:`pipeline.metrics._fused` (``torch.compile``) for
        RMSD, lDDT and the searches. Measured on an H100: lDDT 2.2x faster, RMSD and the
        searches no faster (docs/benchmarks.md); the first call compiles (see
        :mod:`pipeline.metrics._fused`).

    Returns
    -------
    dict
        (B,) float32 tensors on the input device: ``rmsd`` (A, proper Kabsch), ``lddt``
        (global C3' lDDT, 15 A, 0.5/1/2/4 A), ``gdt_ts`` (fraction), ``tm_score`` (RNA d0),
        ``chirality`` (fraction of local quadruples with the native's handedness; a mirror
        image scores near 0 while its lDDT stays high).
    """
    mask = mask.bool()
    return {
        "rmsd": rmsd(pred, ref, mask, compiled=compiled).float(),
        "lddt": lddt(pred, ref, mask, compiled=compiled)[0].float(),
        "gdt_ts": gdt(
            pred, ref, mask, cutoffs=GDT_TS_CUTOFFS, n_ref=n_ref, max_seeds=gdt_max_seeds,
            chunk_elements=chunk_elements, compiled=compiled,
        ).score.float(),
        "tm_score": tm_score(
            pred, ref, mask, n_ref=n_ref, max_seeds=tm_max_seeds, chunk_elements=chunk_elements,
            compiled=compiled,
        ).float(),
        "chirality": chirality(pred, ref, mask),
    }


def score_predictions(pred_coords: torch.Tensor, batch: dict, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`score_batch` of sampled structures against a data-contract batch.

    ``pred_coords`` is (B, L, A, 3) in ``ATOM_NAMES`` order or already (B, L, 3) C3';
    ``batch`` holds the native ``coords``, ``atom_mask`` and ``residue_mask`` (see
    :mod:`pipeline.data.features`). Keyword arguments go to :func:`score_batch`.
    """
    ref, mask = representative_atoms(batch["coords"], batch["atom_mask"], batch["residue_mask"])
    pred = pred_coords[..., REPRESENTATIVE_ATOM, :] if pred_coords.dim() == 4 else pred_coords
    return score_batch(pred.to(ref.device), ref, mask, **kwargs)


@torch.no_grad()
def plddt_target(
    pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """True per-residue lDDT on C3' atoms: the target of the pLDDT head.

    Parameters
    ----------
    pred, ref : torch.Tensor
        (B, L, 3) C3' coordinates (prediction, native), Angstrom.
    mask : torch.Tensor
        (B, L) bool, residues whose C3' exists in the native.

    Returns
    -------
    lddt : torch.Tensor
        (B, L) float32 in [0, 1] (0 where undefined).
    defined : torch.Tensor
        (B, L) bool, residues with at least one C3' within 15 A in the native; mask the loss
        and any calibration with it.
    """
    bsz, n = mask.shape
    residue = torch.arange(n, device=mask.device).expand(bsz, n)
    return lddt_per_residue(pred, ref, mask, residue, n_residues=n)


def _normalise_key(key: Sequence) -> AtomKey:
    if len(key) != 4:
        raise ValueError(
            f"an atom key must be (chain, residue number, insertion code, atom name), "
            f"but got {key!r}."
        )
    chain, resnum, icode, name = key
    return (str(chain).strip(), int(resnum), str(icode).strip(), str(name).strip())


@dataclass(frozen=True)
class AtomMatch:
    """Correspondence between the atoms of a model and of its reference.

    Attributes
    ----------
    ref_index, model_index : np.ndarray
        (M,) int64, matched pairs in reference order (``ref_index`` ascending).
    missing : np.ndarray
        Reference atoms with no model atom of the same key; they count against the model.
    extra : np.ndarray
        Model atoms whose key is not in the reference (not scored; reported).
    duplicates : np.ndarray
        Model atoms repeating the key of an earlier model atom (the first one is used).
    n_reference : int
        Number of reference atoms.
    """

    ref_index: np.ndarray
    model_index: np.ndarray
    missing: np.ndarray
    extra: np.ndarray
    duplicates: np.ndarray
    n_reference: int

    @property
    def n_matched(self) -> int:
        return int(len(self.ref_index))

    def model_in_reference_order(self, model_coords) -> tuple[torch.Tensor, torch.Tensor]:
        """Model coordinates laid out on the reference atoms: (n_reference, 3) and a present mask.

        Missing atoms get coordinates 0 and ``present`` False.
        """
        xyz = torch.as_tensor(np.asarray(model_coords), dtype=torch.float64)
        out = torch.zeros(self.n_reference, 3, dtype=torch.float64)
        present = torch.zeros(self.n_reference, dtype=torch.bool)
        out[torch.from_numpy(self.ref_index)] = xyz[torch.from_numpy(self.model_index)]
        present[torch.from_numpy(self.ref_index)] = True
        return out, present


def match_atoms(model_keys: Iterable[Sequence], ref_keys: Iterable[Sequence]) -> AtomMatch:
    """Match model atoms to reference atoms by (chain, residue number, insertion code, name).

    Parameters
    ----------
    model_keys, ref_keys : iterable of 4-sequences
        One ``(chain_id, res_id, ins_code, atom_name)`` per atom, in file order. Strings are
        stripped and residue numbers cast to ``int``; no other normalisation (no OP1/OP2
        symmetry, no sequence re-alignment), as in the RNA-Puzzles reference evaluation.

    Returns
    -------
    AtomMatch
        Pairs in reference order, plus every reference atom the model lacks, every model atom
        not in the reference and every repeated model key: nothing is dropped silently.

    Raises
    ------
    ValueError
        If a key repeats within the reference (the correspondence would be ambiguous).

    Examples
    --------
    >>> m = match_atoms([("A", 1, "", "P"), ("A", 1, "", "C3'")],
    ...                 [("A", 1, "", "C3'"), ("A", 1, "", "N1"), ("A", 1, "", "P")])
    >>> m.ref_index.tolist(), m.model_index.tolist(), m.missing.tolist()
    ([0, 2], [1, 0], [1])
    """
    ref = [_normalise_key(k) for k in ref_keys]
    ref_pos: dict[AtomKey, int] = {}
    for i, k in enumerate(ref):
        if k in ref_pos:
            raise ValueError(f"reference atom key {k} appears twice (atoms {ref_pos[k]} and {i}).")
        ref_pos[k] = i
    model_pos: dict[AtomKey, int] = {}
    extra, duplicates = [], []
    for j, k in enumerate(_normalise_key(k) for k in model_keys):
        if k in model_pos:
            duplicates.append(j)
        else:
            model_pos[k] = j
            if k not in ref_pos:
                extra.append(j)
    pairs = [(i, model_pos[k]) for i, k in enumerate(ref) if k in model_pos]
    missing = [i for i, k in enumerate(ref) if k not in model_pos]
    ref_index = np.array([p[0] for p in pairs], dtype=np.int64)
    model_index = np.array([p[1] for p in pairs], dtype=np.int64)
    match = AtomMatch(
        ref_index, model_index, np.array(missing, dtype=np.int64),
        np.array(extra, dtype=np.int64), np.array(duplicates, dtype=np.int64), len(ref),
    )
    if missing or extra or duplicates:
        logger.info(
            "atom matching: %d of %d reference atoms matched, %d missing from the model, "
            "%d model atoms not in the reference, %d repeated model keys",
            match.n_matched, len(ref), len(missing), len(extra), len(duplicates),
        )
    return match


def residue_index_from_keys(residue_keys: Iterable[Hashable]) -> np.ndarray:
    """Per-atom integer residue ids from per-atom residue keys, in order of first appearance.

    Use keys ``(chain, residue number, insertion code, residue name)`` for the lDDT
    same-residue exclusion (biotite's residue definition).
    """
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in residue_keys], dtype=np.int64)


@torch.no_grad()
def score_matched(
    model_coords,
    reference_coords,
    match: AtomMatch,
    *,
    residue_index=None,
    gdt_max_seeds: int | None = None,
    tm_max_seeds: int | None = None,
) -> dict[str, float]:
    """Score one model against its reference after :func:`match_atoms`.

    Parameters
    ----------
    model_coords : array-like
        (n_model_atoms, 3) model coordinates in model file order, Angstrom.
    reference_coords : array-like
        (n_reference, 3) reference coordinates.
    match : AtomMatch
        From :func:`match_atoms`.
    residue_index : array-like, optional
        (n_reference,) residue id of each reference atom (:func:`residue_index_from_keys`),
        for the lDDT same-residue exclusion. ``None``: one atom per residue.
    gdt_max_seeds, tm_max_seeds : int, optional
        Search budgets (``None`` = exhaustive).

    Returns
    -------
    dict
        ``n_compared`` (matched atoms), ``n_reference``, ``rmsd`` (A, over the matched atoms:
        a missing atom has no position to measure; NaN if none matched), ``lddt`` (all
        reference atoms; contacts of missing atoms count as not preserved), and ``gdt_ts`` /
        ``tm_score`` normalised by the reference atom count (missing atoms count 0). GDT-TS
        and TM-score are defined on one atom per residue: with several atoms per residue they
        are NaN (score the C3' atoms for them).
    """
    ref = torch.as_tensor(np.asarray(reference_coords), dtype=torch.float64)
    if ref.shape != (match.n_reference, 3):
        raise ValueError(
            f"reference_coords must have shape ({match.n_reference}, 3), "
            f"but got {tuple(ref.shape)}."
        )
    mod, present = match.model_in_reference_order(model_coords)
    res = None
    one_atom_per_residue = True
    if residue_index is not None:
        res = torch.as_tensor(np.asarray(residue_index), dtype=torch.int64)
        one_atom_per_residue = bool(torch.unique(res).numel() == res.numel())
        res = res[None]
    ref_b, mod_b, present_b = ref[None], mod[None], present[None]
    all_ref = torch.ones_like(present_b)
    out: dict[str, float] = {
        "n_compared": match.n_matched,
        "n_reference": match.n_reference,
        "rmsd": float(rmsd(mod_b, ref_b, present_b)[0]) if match.n_matched else float("nan"),
        "lddt": float(lddt(mod_b, ref_b, all_ref, model_mask=present_b, residue_index=res)[0][0]),
    }
    if one_atom_per_residue:
        out["gdt_ts"] = float(
            gdt(mod_b, ref_b, present_b, n_ref=match.n_reference, max_seeds=gdt_max_seeds).score[0]
        )
        out["tm_score"] = float(
            tm_score(mod_b, ref_b, present_b, n_ref=match.n_reference, max_seeds=tm_max_seeds)[0]
        )
    else:
        out["gdt_ts"] = float("nan")
        out["tm_score"] = float("nan")
    return out
