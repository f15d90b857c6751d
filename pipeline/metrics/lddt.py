"""Local Distance Difference Test (lDDT), batched and masked.

Mariani, V., Biasini, M., Barbato, A., Schwede, T. (2013). lDDT: a local superposition-free
score for comparing protein structures and models using distance difference tests.
Bioinformatics 29, 2722-2728.

Conventions (design brief, section 4; identical to ``biotite.structure.lddt`` with its
defaults, which the tests use as the independent reference):

- thresholds 0.5/1/2/4 A; a distance is preserved at threshold ``t`` when
  ``|d_model - d_reference| <= t``;
- a pair is a contact when its distance in the *reference* is ``<= 15 A`` (inclusion radius;
  asymmetric: contacts come from the reference only unless ``symmetric``);
- pairs of atoms within one residue are excluded (``residue_index``);
- the global score is the mean over all (contact, threshold) tests, i.e. pair-weighted;
- atoms present in the reference but missing from the model (``model_mask`` False) keep their
  contacts, which then count as not preserved at every threshold.

Distances are computed directly (not through the ``|a|^2 + |b|^2 - 2ab`` expansion, which loses
about 1e-3 A at 100 A coordinates in float32) so that threshold decisions match a direct
computation.
"""

from __future__ import annotations

import torch

from pipeline.metrics._fused import broadcast_distances as _broadcast_distances
from pipeline.metrics._fused import fused, lddt_pair_sums

__all__ = ["DEFAULT_THRESHOLDS", "lddt", "lddt_per_residue"]

DEFAULT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


#: Rows of the (B, rows, N) distance blocks are chosen to keep B x rows x N below this, so
#: that all-atom inputs of large RNAs do not materialise several (B, N, N) matrices.
_BLOCK_ELEMENTS = 1 << 24

#: Absent atoms are moved this far apart (see :func:`_lddt_sums`); radius and thresholds must
#: stay far below it.
_FAR = 1.0e6


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., M, N) Euclidean distances between the rows of ``a`` (..., M, 3) and ``b`` (..., N, 3).

    On the CPU ``torch.cdist`` (direct mode); elsewhere :func:`_broadcast_distances`: CUDA's
    direct-mode cdist kernel reduces each of the M x N three-term sums with a thread block of
    its own, and was most of lDDT's time on the H100 (64 x 500 nt: cdist 19.7 ms, broadcast
    differences 0.46 ms; docs/benchmarks.md).
    """
    if a.device.type == "cpu":
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return _broadcast_distances(a, b)


def _far_apart(coords: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``coords`` (float32) with each absent atom moved to its own point on a far line.

    Atom ``i`` goes to ``(_FAR * (i + 1), 0, 0)``: at least ``_FAR`` from every other atom,
    present or absent. Its distances then exceed any radius, so it makes no contact, and
    differ from the other structure's by more than any threshold, so its contacts fail every
    test. This replaces three (B, N, N) pair masks with one (B, N, 3) ``where``.
    """
    n = coords.shape[-2]
    line = torch.zeros(n, 3, dtype=torch.float32, device=coords.device)
    line[:, 0] = _FAR * torch.arange(1, n + 1, dtype=torch.float32, device=coords.device)
    return torch.where(present.unsqueeze(-1), coords.float(), line)


def _lddt_sums(
    model: torch.Tensor,
    reference: torch.Tensor,
    ref_mask: torch.Tensor,
    model_mask: torch.Tensor | None,
    residue_index: torch.Tensor | None,
    radius: float,
    thresholds: tuple[float, ...],
    symmetric: bool,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom sums of preserved fractions and contact counts, both (B, N) float32.

    Masks are folded into the coordinates (:func:`_far_apart`): an atom absent from the
    reference is never within the radius; one absent from the model (present in the
    reference) keeps its reference contacts, and its model distances, ~``_FAR``, fail every
    threshold. What is left per (B, rows, N) block: two distance matrices, the contact test,
    one ``bucketize`` for all thresholds and two sums. The self pair (distance 0 in both, a
    contact passing every threshold) is subtracted afterwards rather than masked.
    ``compiled``: the same sums from one fused kernel
    (:func:`pipeline.metrics._fused.lddt_pair_sums`), with no (B, rows, N) block.
    """
    if model.shape != reference.shape or model.shape[-1] != 3:
        raise ValueError(
            "model and reference must have the same shape (B, N, 3), but got "
            f"{tuple(model.shape)} and {tuple(reference.shape)}."
        )
    if ref_mask.shape != reference.shape[:-1]:
        raise ValueError(
            f"ref_mask must have shape {tuple(reference.shape[:-1])}, "
            f"but got {tuple(ref_mask.shape)}."
        )
    if residue_index is not None and residue_index.shape != ref_mask.shape:
        raise ValueError(
            f"residue_index must have shape {tuple(ref_mask.shape)}, "
            f"but got {tuple(residue_index.shape)}."
        )
    if len(thresholds) == 0:
        raise ValueError("thresholds must not be empty.")
    if not 0 <= radius < _FAR / 100 or not all(0 <= t < _FAR / 100 for t in thresholds):
        raise ValueError(
            f"radius and thresholds must lie in [0, {_FAR / 100:g}) A, but got "
            f"radius={radius} and thresholds={thresholds}."
        )
    ref_mask = ref_mask.bool()
    model_mask = ref_mask if model_mask is None else model_mask.bool() & ref_mask
    # Absent atoms may hold NaN or garbage: they are replaced, so no NaN reaches a sum.
    ref = _far_apart(reference, ref_mask)
    mod = _far_apart(model, model_mask)
    n_thresholds = len(thresholds)
    if compiled:
        passed, count = fused(lddt_pair_sums)(
            mod, ref, residue_index, float(radius), tuple(float(t) for t in thresholds),
            symmetric,
        )
    else:
        passed, count = _blocked_pair_sums(mod, ref, residue_index, radius, thresholds, symmetric)
    if residue_index is None:  # the self pair: a contact that passes every threshold
        count = count - 1
        passed = passed - n_thresholds
    return passed.float() / n_thresholds, count.float()


def _blocked_pair_sums(
    mod: torch.Tensor,
    ref: torch.Tensor,
    residue_index: torch.Tensor | None,
    radius: float,
    thresholds: tuple[float, ...],
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom (passed tests, contacts), (B, N) int32, self pair included, computed in
    (B, rows, N) blocks: two distance matrices, the contact test, one ``bucketize`` for all
    thresholds and two sums per block."""
    n = ref.shape[-2]
    n_thresholds = len(thresholds)
    bounds = torch.tensor(sorted(thresholds), dtype=torch.float32, device=ref.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, ref[..., 0].numel()))
    passed, count = [], []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        d_ref = _distances(ref[..., lo:hi, :], ref)  # (B, rows, N)
        d_mod = _distances(mod[..., lo:hi, :], mod)
        contacts = d_ref <= radius
        if symmetric:
            contacts |= d_mod <= radius
        if residue_index is not None:  # same-residue pairs, the self pair among them
            same = residue_index[..., lo:hi].unsqueeze(-1) == residue_index.unsqueeze(-2)
            contacts &= same.logical_not_()
        count.append(contacts.sum(-1, dtype=torch.int32))
        # Thresholds passed: those >= |d_ref - d_mod|, i.e. all but the ones below it (one
        # bucketize for all thresholds); a non-contact gets an infinite difference, below all.
        diff = d_mod.sub_(d_ref).abs_().masked_fill_(contacts.logical_not_(), float("inf"))
        below = torch.bucketize(diff, bounds, out_int32=True).sum(-1, dtype=torch.int32)
        passed.append(n_thresholds * n - below)
    return torch.cat(passed, -1), torch.cat(count, -1)


def lddt(
    model: torch.Tensor,
    reference: torch.Tensor,
    ref_mask: torch.Tensor,
    *,
    model_mask: torch.Tensor | None = None,
    residue_index: torch.Tensor | None = None,
    radius: float = 15.0,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    symmetric: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and per-atom lDDT (Mariani et al. 2013), batched and masked.

    Parameters
    ----------
    model, reference : torch.Tensor
        (B, N, 3) coordinates of corresponding atoms, Angstrom.
    ref_mask : torch.Tensor
        (B, N) atoms present in the reference; only these define contacts.
    model_mask : torch.Tensor, optional
        (B, N) atoms present in the model (default: ``ref_mask``). A contact with an atom
        absent from the model scores 0 on every threshold (it is *not* dropped).
    residue_index : torch.Tensor, optional
        (B, N) integer residue id of each atom; pairs with equal ids are excluded. For
        all-atom inputs the id must identify (chain, residue number, insertion code, residue
        name), e.g. from :func:`pipeline.metrics.residue_index_from_keys`. ``None`` means one
        atom per residue (only the self pair is excluded).
    radius : float
        Inclusion radius in Angstrom, measured in the reference (``<=``, as biotite).
    thresholds : tuple of float
        Distance-difference thresholds in Angstrom.
    symmetric : bool
        Also take contacts from the model (``<= radius`` in the model, both atoms present).
    compiled : bool
        Compute the pair sums in one kernel generated by ``torch.compile`` (see
        :mod:`pipeline.metrics._fused`; seconds to compile on the first call) instead of in
        (B, rows, N) blocks of eager operations.

    Returns
    -------
    global_lddt : torch.Tensor
        (B,) float32, mean over all (contact, threshold) tests; 0 where no contact exists.
    per_atom : torch.Tensor
        (B, N) float32, the same mean over the contacts of each atom (biotite
        ``aggregation="atom"``); 0 where an atom has no contact.

    Examples
    --------
    >>> x = torch.randn(2, 30, 3) * 8
    >>> g, per_atom = lddt(x, x, torch.ones(2, 30, dtype=torch.bool))
    >>> g.tolist()
    [1.0, 1.0]
    """
    score_sum, count = _lddt_sums(
        model, reference, ref_mask, model_mask, residue_index, radius, thresholds, symmetric,
        compiled,
    )
    per_atom = torch.where(count > 0, score_sum / count.clamp_min(1), 0.0)
    total = count.sum(-1)
    global_lddt = torch.where(total > 0, score_sum.sum(-1) / total.clamp_min(1), 0.0)
    return global_lddt, per_atom


def lddt_per_residue(
    model: torch.Tensor,
    reference: torch.Tensor,
    ref_mask: torch.Tensor,
    residue_index: torch.Tensor,
    *,
    n_residues: int | None = None,
    model_mask: torch.Tensor | None = None,
    radius: float = 15.0,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    symmetric: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-residue lDDT: the mean over all (contact, threshold) tests of a residue's atoms.

    Equal to ``biotite.structure.lddt(..., aggregation="residue")`` (contacts of every atom of
    the residue, same-residue pairs excluded). With one atom per residue (C3') this is the
    per-residue lDDT that the pLDDT head is trained to predict.

    Parameters
    ----------
    model, reference, ref_mask, model_mask, radius, thresholds, symmetric, compiled
        As in :func:`lddt`.
    residue_index : torch.Tensor
        (B, N) int64 residue id of each atom in ``[0, n_residues)``; also used to exclude
        same-residue pairs.
    n_residues : int, optional
        Number of residue slots R; default ``residue_index.max() + 1``.

    Returns
    -------
    per_residue : torch.Tensor
        (B, R) float32 lDDT in [0, 1]; 0 where a residue has no contact.
    has_contacts : torch.Tensor
        (B, R) bool, residues with at least one contact (biotite gives NaN for the others):
        use it as the mask of a pLDDT loss or of a calibration.
    """
    residue_index = residue_index.long()
    score_sum, count = _lddt_sums(
        model, reference, ref_mask, model_mask, residue_index, radius, thresholds, symmetric,
        compiled,
    )
    if n_residues is None:
        n_residues = int(residue_index.max().item()) + 1 if residue_index.numel() else 0
    idx = torch.where(ref_mask.bool(), residue_index, 0).clamp(0, max(n_residues - 1, 0))
    shape = residue_index.shape[:-1] + (n_residues,)
    res_sum = torch.zeros(shape, dtype=score_sum.dtype, device=score_sum.device)
    res_count = torch.zeros_like(res_sum)
    res_sum.scatter_add_(-1, idx, score_sum)
    res_count.scatter_add_(-1, idx, count)
    has_contacts = res_count > 0
    per_residue = torch.where(has_contacts, res_sum / res_count.clamp_min(1), 0.0)
    return per_residue, has_contacts
