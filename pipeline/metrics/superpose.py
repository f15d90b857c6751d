"""Optimal rigid superposition (Kabsch), batched and masked.

Kabsch, W. (1976). A solution for the best rotation to relate two sets of vectors.
Acta Cryst. A32, 922-923. The rotation is forced to be proper (det = +1), so a mirror image
cannot be superimposed onto its original: RMSD after superposition stays > 0 for it.
"""

from __future__ import annotations

import torch


def kabsch(
    mobile: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation ``R`` and translation ``t`` that move ``mobile`` onto ``target``.

    Parameters
    ----------
    mobile, target : (..., N, 3) tensors in the same units (Angstrom).
    mask : (..., N) bool or float weights; points with mask 0 are ignored.

    Returns
    -------
    R : (..., 3, 3) proper rotation, t : (..., 3), such that ``mobile @ R.T + t`` is the
    least-squares fit of ``target``. The SVD runs in float64 for stability; outputs have the
    dtype of ``mobile``. Sets with fewer than 3 valid points give a well-defined (possibly
    non-unique) rotation and never NaN.
    """
    dtype = mobile.dtype
    x = mobile.double()
    y = target.double()
    if mask is None:
        w = torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    else:
        w = mask.to(torch.float64)
    w_sum = w.sum(-1, keepdim=True).clamp_min(1e-12)
    x_mean = (w.unsqueeze(-1) * x).sum(-2) / w_sum
    y_mean = (w.unsqueeze(-1) * y).sum(-2) / w_sum
    xc = (x - x_mean.unsqueeze(-2)) * w.unsqueeze(-1)
    yc = y - y_mean.unsqueeze(-2)
    h = xc.transpose(-1, -2) @ yc  # (..., 3, 3) covariance
    u, _, vh = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(d.shape + (3,), dtype=torch.float64, device=x.device)
    diag[..., 2] = d
    r = vh.transpose(-1, -2) @ torch.diag_embed(diag) @ u.transpose(-1, -2)
    t = y_mean - (r @ x_mean.unsqueeze(-1)).squeeze(-1)
    return r.to(dtype), t.to(dtype)


def superimpose(
    mobile: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``mobile`` moved onto ``target`` by the Kabsch fit over ``mask`` (same shape as mobile)."""
    r, t = kabsch(mobile, target, mask)
    return mobile @ r.transpose(-1, -2) + t.unsqueeze(-2)
