"""Optimal rigid superposition (Kabsch) and RMSD, batched and masked.

Kabsch, W. (1976). A solution for the best rotation to relate two sets of vectors.
Acta Cryst. A32, 922-923. Kabsch, W. (1978). A discussion of the solution for the best rotation
to relate two sets of vectors. Acta Cryst. A34, 827-828.

Conventions (design brief, section 4):

- The rotation is forced to be proper (det = +1): ``R = V diag(1, 1, sign(det(V U^T))) U^T``
  from the SVD ``H = U S V^T`` of the covariance ``H = sum_i w_i (x_i - x_mean)(y_i - y_mean)^T``.
  A mirror image therefore cannot be superimposed onto its original and keeps an RMSD > 0.
- Superposition is kept separate from RMSD (as in ``biotite.structure.superimpose`` and
  ``biotite.structure.rmsd``): :func:`kabsch` returns the transform, :func:`superimpose` applies
  it, :func:`rmsd` measures.
- The 3x3 SVD runs in float64; coordinates are in Angstrom.
- Masked-out points may hold anything (including NaN): they never enter a sum.
"""

from __future__ import annotations

import torch

__all__ = ["kabsch", "rmsd", "superimpose"]


def _proper_rotation(h: torch.Tensor) -> torch.Tensor:
    """Proper rotation ``R`` (..., 3, 3) maximising ``trace(R H)`` for covariance ``H``.

    ``H = sum x y^T`` of centred mobile ``x`` and target ``y``; ``R x`` is then the best fit of
    ``y``. float64 in, float64 out.
    """
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(-1, -2)
    # sign(det(V U^T)) = sign(det V * det U); 0 (degenerate input) is treated as +1.
    d = torch.sign(torch.linalg.det(u) * torch.linalg.det(v))
    d = torch.where(d == 0, torch.ones_like(d), d)
    scale = torch.ones(d.shape + (3,), dtype=h.dtype, device=h.device)
    scale[..., 2] = d
    return (v * scale.unsqueeze(-2)) @ u.transpose(-1, -2)


def _fit_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kabsch fit from masked moments ``[n, sum x (3), sum y (3), sum x_i y_j (9)]`` (..., 16).

    Used by the superposition searches (TM-score, GDT), where the moments of thousands of
    candidate subsets come from one matrix product. Returns ``R`` (..., 3, 3) and ``t`` (..., 3)
    in float64 such that ``R x + t`` fits ``y``.
    """
    n = moments[..., 0].clamp_min(1e-12)
    mx = moments[..., 1:4] / n.unsqueeze(-1)
    my = moments[..., 4:7] / n.unsqueeze(-1)
    sxy = moments[..., 7:16].reshape(moments.shape[:-1] + (3, 3))
    h = sxy - n[..., None, None] * mx.unsqueeze(-1) * my.unsqueeze(-2)
    r = _proper_rotation(h)
    t = my - (r @ mx.unsqueeze(-1)).squeeze(-1)
    return r, t


def _weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask must have shape {tuple(x.shape[:-1])} (coordinates without the last axis), "
            f"but got mask.shape={tuple(mask.shape)}."
        )
    return mask.to(device=x.device, dtype=torch.float64)


def kabsch(
    mobile: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation ``R`` and translation ``t`` that move ``mobile`` onto ``target``.

    Parameters
    ----------
    mobile, target : torch.Tensor
        (..., N, 3) coordinates of corresponding points, in the same units (Angstrom).
    mask : torch.Tensor, optional
        (..., N) bool or float weights; points with weight 0 are ignored (their coordinates
        may be anything, NaN included). Default: all points, equal weights.

    Returns
    -------
    R : torch.Tensor
        (..., 3, 3) proper rotation (det = +1).
    t : torch.Tensor
        (..., 3) translation, such that ``mobile @ R.T + t`` is the weighted least-squares fit
        of ``target``.

    Notes
    -----
    The SVD runs in float64 for stability; outputs have the dtype of ``mobile``. Sets with
    fewer than 3 valid points give a well-defined (possibly non-unique) rotation and never NaN.
    """
    dtype = mobile.dtype
    w = _weights(mobile, mask)
    valid = (w != 0).unsqueeze(-1)
    x = torch.where(valid, mobile.double(), 0.0)
    y = torch.where(valid, target.double(), 0.0)
    w_sum = w.sum(-1, keepdim=True).clamp_min(1e-12)
    x_mean = (w.unsqueeze(-1) * x).sum(-2) / w_sum
    y_mean = (w.unsqueeze(-1) * y).sum(-2) / w_sum
    xc = (x - x_mean.unsqueeze(-2)) * w.unsqueeze(-1)
    yc = torch.where(valid, y - y_mean.unsqueeze(-2), 0.0)
    h = xc.transpose(-1, -2) @ yc  # (..., 3, 3) covariance sum_i w_i x_i y_i^T
    r = _proper_rotation(h)
    t = y_mean - (r @ x_mean.unsqueeze(-1)).squeeze(-1)
    return r.to(dtype), t.to(dtype)


def superimpose(
    mobile: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``mobile`` moved onto ``target`` by the Kabsch fit over ``mask`` (same shape as mobile).

    All points are moved, masked or not; only the fit ignores the masked-out ones.
    """
    r, t = kabsch(mobile, target, mask)
    return mobile @ r.transpose(-1, -2) + t.unsqueeze(-2)


def rmsd(
    model: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    superpose: bool = True,
) -> torch.Tensor:
    """Root-mean-square deviation between corresponding points, after optimal superposition.

    ``RMSD = sqrt(sum_i m_i |R x_i + t - y_i|^2 / sum_i m_i)`` with ``(R, t)`` the proper
    Kabsch fit of the model ``x`` onto the reference ``y`` over the same mask (equal weights;
    the design-brief convention and that of ``biotite.structure.superimpose`` + ``rmsd``).

    Parameters
    ----------
    model, reference : torch.Tensor
        (B, N, 3) or (N, 3) coordinates in Angstrom, rows corresponding.
    mask : torch.Tensor, optional
        (B, N) / (N,) bool: points that exist in both. Default: all.
    superpose : bool
        If False, the coordinates are compared as given (no fit).

    Returns
    -------
    torch.Tensor
        (B,) (or scalar) RMSD in Angstrom, computed in float64, returned in the dtype of
        ``model``. 0 where the mask is empty.
    """
    if model.shape != reference.shape or model.shape[-1] != 3:
        raise ValueError(
            "model and reference must have the same shape (..., N, 3), but got "
            f"{tuple(model.shape)} and {tuple(reference.shape)}."
        )
    w = _weights(model, mask)
    valid = (w != 0).unsqueeze(-1)
    x = torch.where(valid, model.double(), 0.0)
    y = torch.where(valid, reference.double(), 0.0)
    if superpose:
        x = superimpose(x, y, w)
    sq = ((x - y) ** 2).sum(-1) * w
    out = torch.sqrt(sq.sum(-1) / w.sum(-1).clamp_min(1e-12))
    return out.to(model.dtype if model.is_floating_point() else torch.float32)
