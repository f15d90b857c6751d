"""TM-score for RNA with a fixed residue correspondence, batched and masked.

Zhang, Y., Skolnick, J. (2004). Scoring function for automated assessment of protein structure
template quality. Proteins 57, 702-710.
Gong, S., Zhang, C., Zhang, Y. (2019). RNA-align: quick and accurate alignment of RNA 3D
structures based on size-independent TM-score_RNA. Bioinformatics 35, 4459-4461.
Zhang, C., Shine, M., Pyle, A. M., Zhang, Y. (2022). US-align: universal structure alignments
of proteins, nucleic acids, and macromolecular complexes. Nature Methods 19, 1109-1115.

Conventions (design brief, section 4):

- one representative atom per nucleotide (C3' by default upstream), residue ``i`` of the model
  corresponds to residue ``i`` of the reference (no structural re-alignment);
- ``TM = max over superpositions of (1 / L_ref) sum_i 1 / (1 + (d_i / d0)^2)`` with ``L_ref``
  the reference length (residues missing from the model contribute 0);
- RNA ``d0`` (:func:`rna_d0`): ``0.6 sqrt(L - 0.5) - 2.5`` for ``L >= 30``, and 0.3/0.4/0.5/
  0.6/0.7 A for ``L <= 11/15/19/23/29``;
- the superposition search re-implements US-align's ``TMscore8_search`` with
  ``simplify_step = 1`` and ``score_sum_method = 0`` (every residue scored), which is what
  ``USalign -TMscore 2 -mol RNA`` and the ``TMscore`` program report: fragment seeds of
  lengths ``L, L/2, L/4, ...`` (integer division, at most five halvings, then 4) at every start;
  after the seed fit keep residues with ``d < d0_search - 1``, then up to 20 refits keeping
  ``d < d0_search + 1`` (``d0_search = clamp(d0, 4.5, 8)``; a cutoff that keeps fewer than 3
  residues is relaxed by 0.5 A steps), stopping when the kept set repeats.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from pipeline.metrics._search import (
    DEFAULT_CHUNK_ELEMENTS,
    compact,
    reference_lengths,
    superposition_search,
    window_seeds,
)

__all__ = ["rna_d0", "tm_fragment_lengths", "tm_score"]


def rna_d0(length: float | int | torch.Tensor) -> float | torch.Tensor:
    """RNA TM-score distance scale ``d0(L)`` in Angstrom (Gong et al. 2019; US-align).

    ``0.6 sqrt(L - 0.5) - 2.5`` for ``L >= 30``; 0.3, 0.4, 0.5, 0.6, 0.7 for
    ``L <= 11, 15, 19, 23, 29`` (US-align ``parameter_set4final_C3prime``).

    Examples
    --------
    >>> round(rna_d0(46), 4)
    1.5472
    >>> rna_d0(20)
    0.6
    """
    if isinstance(length, torch.Tensor):
        ell = length.double()
        big = 0.6 * torch.sqrt((ell - 0.5).clamp_min(0.0)) - 2.5
        out = torch.where(ell < 30, torch.full_like(ell, 0.7), big)
        for upper, value in ((23, 0.6), (19, 0.5), (15, 0.4), (11, 0.3)):
            out = torch.where(ell <= upper, torch.full_like(ell, value), out)
        return out
    ell = float(length)
    for upper, value in ((11, 0.3), (15, 0.4), (19, 0.5), (23, 0.6)):
        if ell <= upper:
            return value
    if ell < 30:
        return 0.7
    return 0.6 * math.sqrt(ell - 0.5) - 2.5


def tm_fragment_lengths(n_aligned: int) -> list[int]:
    """Seed fragment lengths of US-align's ``TMscore8_search`` for ``n_aligned`` residues.

    ``L, L/2, L/4, ...`` (integer division) until a length ``<= 4`` (replaced by 4), at most
    six lengths, the last of which is then 4.

    Examples
    --------
    >>> tm_fragment_lengths(46)
    [46, 23, 11, 5, 4]
    >>> tm_fragment_lengths(500)
    [500, 250, 125, 62, 31, 4]
    """
    l_min = min(4, n_aligned)
    out: list[int] = []
    for i in range(5):
        frag = int(n_aligned / 2.0**i)
        if frag <= l_min:
            out.append(l_min)
            return out
        out.append(frag)
    out.append(l_min)
    return out


def _tm_sums(d2: torch.Tensor, inv_d02: torch.Tensor, inv_l: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) TM-score of every superposition: ``sum 1 / (1 + d^2 / d0^2) / L_ref``."""
    return ((1.0 / (1.0 + d2 * inv_d02)).sum(-1) * inv_l).unsqueeze(-1)


@torch.no_grad()
def tm_score(
    model: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_ref: int | torch.Tensor | None = None,
    max_seeds: int | None = None,
    n_iter: int = 20,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    solver: Literal["auto", "svd", "quaternion"] = "auto",
    compiled: bool = False,
) -> torch.Tensor:
    """TM-score of each model against its reference, maximised over superpositions.

    Parameters
    ----------
    model, reference : torch.Tensor
        (B, N, 3) coordinates in Angstrom of one representative atom per nucleotide (C3'),
        position ``i`` of the model corresponding to position ``i`` of the reference.
    mask : torch.Tensor
        (B, N) bool, residues present in both structures (the aligned pairs).
    n_ref : int or torch.Tensor, optional
        Reference length(s) ``L_ref`` that normalise the score and set ``d0``; default the
        number of residues in ``mask``. Pass the full reference length when the model lacks
        residues, so that they count against it.
    max_seeds : int, optional
        Cap on seed fragments per structure (starts thinned evenly). ``None`` = every start,
        as US-align. The exhaustive count is ``sum_l (L - l + 1)`` over
        :func:`tm_fragment_lengths` (about 4 L).
    n_iter : int
        Refits after each seed fit (US-align: 20).
    chunk_elements : int, optional
        Memory bound of the batched search (B x trajectories x N entries per chunk);
        ``None``: 2**26 on CUDA (about 3 GB at the peak), 2**22 on CPU.
    solver : {"auto", "svd", "quaternion"}
        Solver of the 3x3 fits: float64 SVD (Kabsch) or Horn's quaternion method, which give
        the same rotation; ``"auto"`` uses the quaternion method on CUDA (the batched SVD
        dominated the GPU time) and the SVD on CPU.
    compiled : bool
        Run the search's (B x trajectories x N) work in kernels generated by
        ``torch.compile`` (see :func:`pipeline.metrics._search.superposition_search`). The
        first call compiles (see :mod:`pipeline.metrics._fused`).

    Returns
    -------
    torch.Tensor
        (B,) TM-score in [0, 1] (float32); 0 where the mask is empty.

    Examples
    --------
    >>> x = torch.randn(1, 40, 3) * 10
    >>> tm_score(x, x, torch.ones(1, 40, dtype=torch.bool)).tolist()
    [1.0]
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be at least 0, but got n_iter={n_iter}.")
    if max_seeds is not None and max_seeds < 1:
        raise ValueError(f"max_seeds must be at least 1, but got max_seeds={max_seeds}.")
    x, y, valid, n_valid = compact(model, reference, mask)
    bsz, dev = x.shape[0], x.device
    l_ref = reference_lengths(n_ref, n_valid)
    d0 = rna_d0(l_ref)
    d0_search = d0.clamp(4.5, 8.0)

    start, width, ok = window_seeds(n_valid.tolist(), tm_fragment_lengths, max_seeds, dev)
    n_traj = start.shape[1]
    cut_first = (d0_search - 1.0).unsqueeze(1).expand(bsz, n_traj)
    cut_iter = (d0_search + 1.0).unsqueeze(1).expand(bsz, n_traj)
    inv_d02 = (1.0 / (d0 * d0))[:, None, None]
    inv_l = (1.0 / l_ref.clamp_min(1.0))[:, None]
    best = superposition_search(
        x, y, valid, start, width, ok, cut_first, cut_iter, _tm_sums, (inv_d02, inv_l),
        n_fits=n_iter + 1, relax=True, stop_below_three=False, chunk_elements=chunk_elements,
        solver=solver, compiled=compiled,
    )[:, 0]
    best = torch.where(torch.isfinite(best) & (n_valid > 0), best, 0.0)
    return best.to(model.dtype if model.is_floating_point() else torch.float32)
