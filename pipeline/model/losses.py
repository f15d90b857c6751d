"""Masked training losses, one value per structure (and per diffusion sample where it applies).

All functions take float32 inputs and must run with autocast disabled: distances, the Kabsch
SVD and the cross-entropies lose too much in bf16. Padding residues and atoms missing from the
native are excluded through ``atom_mask`` and never contribute; their coordinates may hold
anything, NaN included (they are replaced by 0 before any arithmetic, so that no NaN reaches a
sum or a gradient).

Shapes: B structures, S diffusion samples per structure, L residues, A atoms per residue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from pipeline.data.features import REPRESENTATIVE_ATOM
from pipeline.metrics import kabsch, lddt_to_bins, plddt_target
from pipeline.model.layers import pairwise_distances

#: Thresholds in A of lDDT, used for smooth lDDT too (AF3 Algorithm 27).
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def aligned_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    atom_mask: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float,
) -> torch.Tensor:
    """EDM-weighted MSE after rigid alignment of the target onto the prediction (AF3 4.3.1).

    The alignment (Kabsch, proper rotation) is computed without gradient, so the loss pulls the
    prediction towards the target's pose closest to it and does not depend on the target's own
    rigid placement.

    Parameters
    ----------
    pred : (B, S, L, A, 3) denoised coordinates in A.
    target : (B, S, L, A, 3) noised-from targets in A (any rigid placement).
    atom_mask : (B, L, A) bool, atoms present in the native (and in a real residue).
    sigma : (B, S) noise level in A.

    Returns
    -------
    (B, S) ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2 * mean_atoms |pred - aligned|^2 / 3``
    in units of 1 (A^2 / A^2); 0 where no atom is present.
    """
    m5 = atom_mask[:, None, ..., None]
    pred = torch.where(m5, pred, 0.0)
    target = torch.where(m5, target, 0.0)
    m = atom_mask[:, None].expand(pred.shape[:-1]).flatten(-2)  # (B, S, N)
    mobile = target.flatten(2, 3)
    with torch.no_grad():
        rot, shift = kabsch(mobile, pred.detach().flatten(2, 3), m)
    aligned = mobile @ rot.transpose(-1, -2) + shift[..., None, :]
    sq = ((pred.flatten(2, 3) - aligned) ** 2).sum(-1)
    mf = m.to(sq.dtype)
    mse = (sq * mf).sum(-1) / (3 * mf.sum(-1).clamp_min(1))
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight * mse


def smooth_lddt_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    atom_mask: torch.Tensor,
    radius: float,
    *,
    max_chunk_elements: int = 2**26,
) -> torch.Tensor:
    """``1 - smooth lDDT`` over all present atom pairs (AF3 Algorithm 27).

    Each distance test is ``sigmoid(threshold - |d_target - d_pred|)``, averaged over the
    thresholds 0.5/1/2/4 A; pairs count when the target distance is below ``radius``. Self pairs
    are excluded, pairs within one residue are kept (they carry the local geometry). Invariant
    to rigid motions of either structure.

    The (B, S, N, N) pair tensors grow fast (N = 5 L atoms: 3.4 GB per float32 tensor for
    L = 1024, S = 32), so samples are processed in chunks of at most ``max_chunk_elements`` pair
    entries, each recomputed in backward (activation checkpointing) when there is more than one.

    Parameters
    ----------
    pred : (B, S, L, A, 3) in A; target : (B, L, A, 3) in A; atom_mask : (B, L, A) bool.

    Returns
    -------
    (B, S) in [0, 1]; 0 where a structure has no pair to score.
    """
    pred = torch.where(atom_mask[:, None, ..., None], pred, 0.0)
    target = torch.where(atom_mask[..., None], target, 0.0)
    m = atom_mask.flatten(1)  # (B, N)
    b, n_samples, n = pred.shape[0], pred.shape[1], m.shape[-1]
    with torch.no_grad():
        d_target = pairwise_distances(target.flatten(1, 2))
        eye = torch.eye(n, dtype=torch.bool, device=m.device)
        pairs = m[:, :, None] & m[:, None, :] & ~eye & (d_target < radius)
        weight = pairs.to(torch.float32)
        count = weight.sum((-1, -2))[:, None]  # (B, 1)
        # Normalise once so that each chunk returns its mean directly.
        weight = weight / count[..., None].clamp_min(1)
    pred = pred.flatten(2, 3)  # (B, S, N, 3)
    chunk = max(1, max_chunk_elements // max(1, b * n * n))
    if chunk >= n_samples:
        smooth = _smooth_lddt(pred, d_target, weight)
    else:
        smooth = torch.cat(
            [
                torch.utils.checkpoint.checkpoint(
                    _smooth_lddt, pred[:, i : i + chunk], d_target, weight, use_reentrant=False
                )
                for i in range(0, n_samples, chunk)
            ],
            dim=1,
        )
    return torch.where(count > 0, 1 - smooth, torch.zeros_like(smooth))


def _smooth_lddt(pred: torch.Tensor, d_target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Smooth lDDT (B, S) of ``pred`` (B, S, N, 3) against distances (B, N, N), pair weights
    (B, N, N) summing to 1 per structure."""
    delta = (d_target[:, None] - pairwise_distances(pred)).abs()
    score = sum(torch.sigmoid(t - delta) for t in LDDT_THRESHOLDS)
    return (score * weight[:, None]).sum((-1, -2)) / len(LDDT_THRESHOLDS)


def representative_distances(coords: torch.Tensor) -> torch.Tensor:
    """(..., L, A, 3) -> (..., L, L) distances in A between representative (C3') atoms."""
    return pairwise_distances(coords[..., REPRESENTATIVE_ATOM, :])


def distogram_loss(
    logits: torch.Tensor,
    coords: torch.Tensor,
    atom_mask: torch.Tensor,
    edges: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the distogram against binned native C3'-C3' distances.

    Parameters
    ----------
    logits : (B, L, L, n_bins); coords : (B, L, A, 3) native, A; atom_mask : (B, L, A) bool.
    edges : (n_bins - 1,) inner bin edges in A.

    Returns
    -------
    (B,) mean over ordered pairs i != j whose C3' atoms are both present; 0 where none.
    """
    present = atom_mask[..., REPRESENTATIVE_ATOM]
    length = present.shape[-1]
    with torch.no_grad():
        coords = torch.where(atom_mask[..., None], coords, 0.0)
        target = torch.bucketize(representative_distances(coords), edges)
    eye = torch.eye(length, dtype=torch.bool, device=present.device)
    pairs = (present[:, :, None] & present[:, None, :] & ~eye).to(torch.float32)
    ce = F.cross_entropy(logits.float().permute(0, 3, 1, 2), target, reduction="none")
    return (ce * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)


def plddt_targets(
    pred: torch.Tensor, target: torch.Tensor, atom_mask: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binned per-residue C3' lDDT of each predicted structure, and where it is defined.

    The same target as evaluation uses (:func:`pipeline.metrics.plddt_target`: 15 A inclusion
    radius in the native, thresholds 0.5/1/2/4 A; :func:`pipeline.metrics.lddt_to_bins`). A
    residue is scored when its C3' is present and has a native C3' neighbour within the radius.

    Parameters
    ----------
    pred : (B, S, L, A, 3) predicted structures in A; target : (B, L, A, 3) native in A.
    atom_mask : (B, L, A) bool.

    Returns
    -------
    bins : (B, S, L) int64 in [0, n_bins); valid : (B, L) bool.
    """
    b, n_samples, length = pred.shape[:3]
    with torch.no_grad():
        present = atom_mask[..., REPRESENTATIVE_ATOM].repeat_interleave(n_samples, dim=0)
        native = target[..., REPRESENTATIVE_ATOM, :].float().repeat_interleave(n_samples, dim=0)
        model = pred[..., REPRESENTATIVE_ATOM, :].float().flatten(0, 1)
        per_residue, defined = plddt_target(model, native, present)
        bins = lddt_to_bins(per_residue, n_bins).view(b, n_samples, length)
    # Whether a residue has a native neighbour does not depend on the sample.
    return bins, defined.view(b, n_samples, length)[:, 0]


def plddt_loss(logits: torch.Tensor, bins: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B,) of pLDDT logits (B, S, L, n_bins) against ``bins`` (B, S, L),
    averaged over samples and valid residues ``valid`` (B, L); 0 where none is valid."""
    n_samples = logits.shape[1]
    ce = F.cross_entropy(logits.float().flatten(0, 1).transpose(1, 2), bins.flatten(0, 1),
                         reduction="none").view(bins.shape)
    v = valid[:, None].to(ce.dtype)
    return (ce * v).sum((1, 2)) / (n_samples * v.sum((1, 2))).clamp_min(1)
