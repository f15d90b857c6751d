"""Optimal rigid superposition (Kabsch) and RMSD, batched and masked.

Kabsch, W. (1976). A solution for the best rotation to relate two sets of vectors.
Acta Cryst. A32, 922-923. Kabsch, W. (1978). A discussion of the solution for the best rotation
to relate two sets of vectors. Acta Cryst. A34, 827-828.
Horn, B. K. P. (1987). Closed-form solution of absolute orientation using unit quaternions.
J. Opt. Soc. Am. A 4, 629-642. Theobald, D. L. (2005). Rapid calculation of RMSDs using a
quaternion-based characteristic polynomial. Acta Cryst. A61, 478-480.

Conventions (design brief, section 4):

- The rotation is forced to be proper (det = +1): ``R = V diag(1, 1, sign(det(V U^T))) U^T``
  from the SVD ``H = U S V^T`` of the covariance ``H = sum_i w_i (x_i - x_mean)(y_i - y_mean)^T``.
  A mirror image therefore cannot be superimposed onto its original and keeps an RMSD > 0.
- Superposition is kept separate from RMSD (as in ``biotite.structure.superimpose`` and
  ``biotite.structure.rmsd``): :func:`kabsch` returns the transform, :func:`superimpose` applies
  it, :func:`rmsd` measures.
- The 3x3 SVD runs in float64; coordinates are in Angstrom.
- The superposition searches of TM-score and GDT solve millions of 3x3 fits; on CUDA the
  batched SVD dominated their time (86 %), so there they use Horn's quaternion solution of the
  same least-squares problem (largest eigenvector of a 4x4 symmetric matrix, eigenvalue by
  Newton's method on its characteristic polynomial as in Theobald's QCP), which is elementwise
  and always gives a proper rotation. Both solvers return the same rotation to ~1e-12 whenever
  it is unique (checked in the tests); for degenerate point sets (collinear, fewer than
  3 points) any optimal rotation may be returned by either.
- Masked-out points may hold anything (including NaN): they never enter a sum.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from pipeline.metrics._fused import fused

__all__ = ["kabsch", "rmsd", "superimpose"]


def _det3(a: torch.Tensor) -> torch.Tensor:
    """Determinant of (..., 3, 3) matrices as a triple product (no batched LU needed)."""
    return (a[..., 0, :] * torch.linalg.cross(a[..., 1, :], a[..., 2, :], dim=-1)).sum(-1)


def _proper_rotation(h: torch.Tensor) -> torch.Tensor:
    """Proper rotation ``R`` (..., 3, 3) maximising ``trace(R H)`` for covariance ``H``.

    ``H = sum x y^T`` of centred mobile ``x`` and target ``y``; ``R x`` is then the best fit of
    ``y``. float64 in, float64 out.
    """
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(-1, -2)
    # sign(det(V U^T)) = sign(det V * det U); 0 (degenerate input) is treated as +1.
    d = torch.sign(_det3(u) * _det3(v))
    d = torch.where(d == 0, torch.ones_like(d), d)
    scale = torch.ones(d.shape + (3,), dtype=h.dtype, device=h.device)
    scale[..., 2] = d
    return (v * scale.unsqueeze(-2)) @ u.transpose(-1, -2)


# Rows / columns kept in the 3x3 minors of a 4x4 matrix, and the cofactor signs.
_MINOR_INDEX = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))
_COFACTOR_SIGN = ((1.0, -1.0, 1.0, -1.0), (-1.0, 1.0, -1.0, 1.0)) * 2


def _quaternion_rotation(
    h: torch.Tensor, upper: torch.Tensor | None = None, *, max_newton: int = 100
) -> torch.Tensor:
    """Proper rotation maximising ``trace(R H)`` by Horn's quaternion method, (..., 3, 3).

    ``H = sum x y^T`` (centred mobile ``x``, target ``y``), float64. The optimal unit
    quaternion is the eigenvector of the largest eigenvalue of Horn's symmetric 4x4 matrix
    ``K(H)``; the eigenvalue comes from Newton's method on ``det(K - l I) = l^4 + c2 l^2 + c1 l
    + c0``, started above it (``sqrt(3) ||H||_F`` bounds the nuclear norm of ``H``, which bounds
    the eigenvalue; ``upper``, if given, is a tighter bound such as Theobald's
    ``(G_x + G_y) / 2``), so that it decreases monotonically onto the largest root; the
    eigenvector is the largest column of the adjugate of ``K - l I``.
    """
    tables = _cofactor_tables(h)
    k, coefficients, lam = _horn_polynomial(h, upper, tables)
    for it in range(max_newton):
        lam, step = _newton_step(lam, *coefficients)
        # Convergence check every 4 steps (each check is a device sync on CUDA).
        if it % 4 == 3 and bool((step <= _NEWTON_TOL * lam).all()):
            break
    return _rotation_at_root(k, lam, tables)


#: Newton has converged when a step is below this fraction of the eigenvalue.
_NEWTON_TOL = 1e-15
#: Newton steps of the fused fit (:func:`_fused_quaternion_fit`) before its one convergence
#: check. On the benchmark structures (8 x 500 nt, exhaustive GDT-TS and TM-score) no fit
#: needed more; after 12 steps every fit of more than 3 points was within 3e-9 of the SVD's.
_FUSED_NEWTON_STEPS = 16


def _cofactor_tables(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`_MINOR_INDEX` and :data:`_COFACTOR_SIGN` as tensors on ``like``'s device."""
    return _cofactor_tables_on(like.device, like.dtype)


@functools.cache
def _cofactor_tables_on(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # Made once per device: on CUDA each is a host-to-device copy, which waits for the
    # device (a sync per fit when they were made per fit).
    return (
        torch.tensor(_MINOR_INDEX, device=device),
        torch.tensor(_COFACTOR_SIGN, dtype=dtype, device=device),
    )


def _horn_polynomial(
    h: torch.Tensor, upper: torch.Tensor | None, tables: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Horn's matrix ``K(H)`` (..., 4, 4), the coefficients ``(c2, c1, c0)`` of its
    characteristic polynomial and Newton's starting point above the largest root."""
    sxx, sxy, sxz = h[..., 0, 0], h[..., 0, 1], h[..., 0, 2]
    syx, syy, syz = h[..., 1, 0], h[..., 1, 1], h[..., 1, 2]
    szx, szy, szz = h[..., 2, 0], h[..., 2, 1], h[..., 2, 2]
    k = torch.stack(
        [
            torch.stack([sxx + syy + szz, syz - szy, szx - sxz, sxy - syx], -1),
            torch.stack([syz - szy, sxx - syy - szz, sxy + syx, szx + sxz], -1),
            torch.stack([szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy], -1),
            torch.stack([sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz], -1),
        ],
        -2,
    )
    idx, sign = tables
    fro2 = (h * h).sum((-1, -2))
    c2 = -2.0 * fro2
    c1 = -8.0 * _det3(h)
    first_row_minors = k[..., idx[0][None, :, None], idx[:, None, :]]  # (..., 4, 3, 3)
    c0 = (k[..., 0, :] * sign[0] * _det3(first_row_minors)).sum(-1)  # det K
    lam = torch.sqrt(3.0 * fro2)
    if upper is not None:
        lam = torch.minimum(lam, upper * (1.0 + 1e-12))
    return k, (c2, c1, c0), lam


def _newton_step(
    lam: torch.Tensor, c2: torch.Tensor, c1: torch.Tensor, c0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step down onto the largest root of ``l^4 + c2 l^2 + c1 l + c0``: the new
    ``lam`` and the step taken (never negative, so ``lam`` stays above the root)."""
    p = ((lam * lam + c2) * lam + c1) * lam + c0
    dp = (4.0 * lam * lam + 2.0 * c2) * lam + c1
    step = torch.where(dp > 0, p / dp.clamp_min(1e-300), 0.0).clamp_min(0.0)
    return lam - step, step


def _rotation_at_root(
    k: torch.Tensor, lam: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The rotation of the unit quaternion in the null space of ``K - lam I`` (largest column
    of its adjugate; the identity where that is 0)."""
    idx, sign = tables
    a = k - lam[..., None, None] * torch.eye(4, dtype=k.dtype, device=k.device)
    adj = _det3(a[..., idx[:, None, :, None], idx[None, :, None, :]]) * sign
    j = torch.diagonal(adj, dim1=-2, dim2=-1).abs().argmax(-1, keepdim=True)
    q = torch.gather(adj, -1, j.unsqueeze(-1).expand(adj.shape[:-1] + (1,))).squeeze(-1)
    norm = q.norm(dim=-1, keepdim=True)
    identity = torch.eye(4, dtype=k.dtype, device=k.device)[0]  # made on the device: no copy
    q = torch.where(norm > 0, q / norm.clamp_min(1e-300), identity)
    w, x, y, z = q.unbind(-1)
    ww, xx, yy, zz = w * w, x * x, y * y, z * z
    xy, xz, yz, wx, wy, wz = x * y, x * z, y * z, w * x, w * y, w * z
    return torch.stack(
        [
            torch.stack([ww + xx - yy - zz, 2 * (xy - wz), 2 * (xz + wy)], -1),
            torch.stack([2 * (xy + wz), ww - xx + yy - zz, 2 * (yz - wx)], -1),
            torch.stack([2 * (xz - wy), 2 * (yz + wx), ww - xx - yy + zz], -1),
        ],
        -2,
    )


def _centred_covariance(
    moments: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From moments (..., 18) (see :func:`_fit_from_moments`): the centred covariance ``H``
    (..., 3, 3), the means of ``x`` and ``y`` (..., 3) and Theobald's bound ``(G_x + G_y) / 2``
    on the optimum of ``trace(R H)`` (within half the fit's residual of it, so Newton needs few
    steps for subsets that fit well)."""
    n = moments[..., 0].clamp_min(1e-12)
    mx = moments[..., 1:4] / n.unsqueeze(-1)
    my = moments[..., 4:7] / n.unsqueeze(-1)
    sxy = moments[..., 7:16].reshape(moments.shape[:-1] + (3, 3))
    h = sxy - n[..., None, None] * mx.unsqueeze(-1) * my.unsqueeze(-2)
    g_sum = moments[..., 16] + moments[..., 17] - n * ((mx * mx).sum(-1) + (my * my).sum(-1))
    return h, mx, my, 0.5 * g_sum


def _translation(r: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
    """``t`` (..., 3) that moves the mean ``mx`` of the rotated points onto ``my``."""
    return my - (r @ mx.unsqueeze(-1)).squeeze(-1)


def _fused_quaternion_fit(
    moments: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quaternion fit with a fixed number of Newton steps and no device sync, written for
    :func:`pipeline.metrics._fused.fused` (``idx``, ``sign``: :func:`_cofactor_tables`):
    ``R``, ``t``, the eigenvalue reached and whether Newton had converged there, (...,)
    bool."""
    h, mx, my, upper = _centred_covariance(moments)
    tables = (idx, sign)
    k, coefficients, lam = _horn_polynomial(h, upper, tables)
    step = lam
    for _ in range(_FUSED_NEWTON_STEPS):
        lam, step = _newton_step(lam, *coefficients)
    r = _rotation_at_root(k, lam, tables)
    return r, _translation(r, mx, my), lam, step <= _NEWTON_TOL * lam


def quaternion_fit_unchecked(
    moments: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_fused_quaternion_fit` compiled, without the convergence check (no device
    sync): ``R``, ``t``, the eigenvalue reached and the (...,) bool ``converged``. A caller
    that uses ``R`` where ``converged`` is False must redo those fits (as
    :func:`_fit_from_moments` does, or the searches, which check once at the end)."""
    return fused(_fused_quaternion_fit)(moments, *_cofactor_tables(moments))


def _fit_from_moments(
    moments: torch.Tensor, *, solver: str = "svd", compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kabsch fit from masked moments (..., 18) of point pairs ``(x, y)``.

    The moments are ``[n, sum x (3), sum y (3), sum x_i y_j (9), sum |x|^2, sum |y|^2]``. Used by
    the superposition searches (TM-score, GDT), where the moments of thousands of candidate
    subsets come from one matrix product. ``solver`` is ``"svd"`` or ``"quaternion"``. Returns
    ``R`` (..., 3, 3) and ``t`` (..., 3) in float64 such that ``R x + t`` fits ``y``.

    ``compiled`` (quaternion only): the whole fit in kernels generated by ``torch.compile``,
    with a fixed number of Newton steps and one convergence check after them; fits not
    converged by then (none seen on the benchmark structures) continue eagerly from where they
    stopped. Eagerly, the fit is a few hundred small kernel launches (most of them the Newton
    loop's), which bound the searches' time on a GPU.
    """
    if solver == "quaternion" and compiled:
        r, t, lam, done = quaternion_fit_unchecked(moments)
        if bool(done.all()):
            return r, t
        h, mx, my, _ = _centred_covariance(moments)
        r_more = _quaternion_rotation(h, lam)  # Newton goes on from lam, still above the root
        r = torch.where(done[..., None, None], r, r_more)
        return r, _translation(r, mx, my)
    h, mx, my, upper = _centred_covariance(moments)
    r = _quaternion_rotation(h, upper) if solver == "quaternion" else _proper_rotation(h)
    return r, _translation(r, mx, my)


def _weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask must have shape {tuple(x.shape[:-1])} (coordinates without the last axis), "
            f"but got mask.shape={tuple(mask.shape)}."
        )
    return mask.to(device=x.device, dtype=torch.float64)


class _Moments(NamedTuple):
    covariance: torch.Tensor  # H = sum_i w_i (x_i - x_mean)(y_i - y_mean)^T, (..., 3, 3)
    x_mean: torch.Tensor  # (..., 3)
    y_mean: torch.Tensor  # (..., 3)


def _centred_moments(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> _Moments:
    """Weighted moments of point pairs in float64; points with weight 0 never enter a sum."""
    valid = (w != 0).unsqueeze(-1)
    x = torch.where(valid, x.double(), 0.0)
    y = torch.where(valid, y.double(), 0.0)
    w_sum = w.sum(-1)
    w_col = w.unsqueeze(-1)
    x_mean = (w_col * x).sum(-2) / w_sum.clamp_min(1e-12).unsqueeze(-1)
    y_mean = (w_col * y).sum(-2) / w_sum.clamp_min(1e-12).unsqueeze(-1)
    xc = x - x_mean.unsqueeze(-2)  # finite at masked points (x is 0 there); weighted to 0 below
    wxc = xc * w_col
    yc = torch.where(valid, y - y_mean.unsqueeze(-2), 0.0)
    return _Moments(wxc.transpose(-1, -2) @ yc, x_mean, y_mean)


def kabsch(
    mobile: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    solver: str = "svd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation ``R`` and translation ``t`` that move ``mobile`` onto ``target``.

    Parameters
    ----------
    mobile, target : torch.Tensor
        (..., N, 3) coordinates of corresponding points, in the same units (Angstrom).
    mask : torch.Tensor, optional
        (..., N) bool or float weights; points with weight 0 are ignored (their coordinates
        may be anything, NaN included). Default: all points, equal weights.
    solver : str
        ``"svd"`` (the 3x3 SVD) or ``"quaternion"`` (Horn's method, elementwise, with a host
        sync every few Newton steps); the same rotation whenever it is unique. The SVD is the
        default on every device: for one fit per structure it is the faster of the two on the
        H100 too (64 x 500 points: 0.87 ms against 3.3 ms, ``benchmarks/bench_metrics.py``,
        docs/benchmarks.md). The superposition searches of GDT-TS and TM-score, with thousands
        of fits per structure, pick their own solver per device.

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
    h, x_mean, y_mean = _centred_moments(mobile, target, _weights(mobile, mask))
    if solver == "svd":
        r = _proper_rotation(h)
    elif solver == "quaternion":
        r = _quaternion_rotation(h)
    else:
        raise ValueError(f"solver must be 'svd' or 'quaternion', but got {solver!r}")
    t = _translation(r, x_mean, y_mean)
    return r.to(dtype), t.to(dtype)


def superimpose(
    mobile: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    solver: str = "svd",
) -> torch.Tensor:
    """``mobile`` moved onto ``target`` by the Kabsch fit over ``mask`` (same shape as mobile).

    All points are moved, masked or not; only the fit ignores the masked-out ones. ``solver``
    as in :func:`kabsch`.
    """
    r, t = kabsch(mobile, target, mask, solver=solver)
    return mobile @ r.transpose(-1, -2) + t.unsqueeze(-2)


def rmsd(
    model: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    superpose: bool = True,
    compiled: bool = False,
) -> torch.Tensor:
    """Root-mean-square deviation between corresponding points, after optimal superposition.

    ``RMSD = sqrt(sum_i m_i |R x_i + t - y_i|^2 / sum_i m_i)`` with ``(R, t)`` the proper
    Kabsch fit of the model ``x`` onto the reference ``y`` over the same mask (equal weights;
    the design-brief convention and that of ``biotite.structure.superimpose`` + ``rmsd``).

    The fitted coordinates are never formed: with centred coordinates the residual is
    ``G_x + G_y - 2 max_R trace(R H)``, and over proper rotations that maximum is
    ``s_1 + s_2 + sign(det H) s_3`` for the singular values ``s`` of the covariance ``H``
    (Kabsch 1978; Theobald 2005 uses the same identity). All moments come from one matrix
    product on the input's device; the 43 numbers per structure then go to the CPU, where the
    3x3 SVDs are solved (:func:`_rmsd_from_moments`), and the result comes back: a device
    sync, which validation can afford, instead of CUDA's batched SVD. 64 x 500 points on one
    core of the development machine: 1.8-3.8 ms against 5.6-6.1 ms for the previous version
    (centred moments, ``svdvals`` on the device); on the H100 no faster than it (0.70-1.08 ms
    against 0.81-0.83 ms, docs/benchmarks.md). In float64 the cancellation in the
    difference costs ~1e-16 of ``G``: ~1e-6 A for 500 points spread over 100 A, wherever
    they lie (the origin is moved to the mean of the valid points first; tested 5000 A away).

    Parameters
    ----------
    model, reference : torch.Tensor
        (B, N, 3) or (N, 3) coordinates in Angstrom, rows corresponding.
    mask : torch.Tensor, optional
        (B, N) / (N,) bool: points that exist in both. Default: all.
    superpose : bool
        If False, the coordinates are compared as given (no fit).
    compiled : bool
        Form the moments with a kernel generated by ``torch.compile`` (see
        :mod:`pipeline.metrics._fused`) rather than eager operations; the 3x3 SVDs stay on
        the CPU. The first call compiles (see :mod:`pipeline.metrics._fused`).

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
    dtype = model.dtype if model.is_floating_point() else torch.float32
    if not superpose:
        diff = torch.where(valid, model.double() - reference.double(), 0.0)
        sq = (diff * diff).sum(-1) * w
        return torch.sqrt(sq.sum(-1) / w.sum(-1).clamp_min(1e-12)).to(dtype)
    if compiled:  # the moments from one fused kernel and one product
        moments = fused(_rmsd_moments)(model.contiguous(), reference.contiguous(), w)
    else:
        moments = _rmsd_moments(model, reference, w)
    return _rmsd_from_moments(moments.cpu()).to(device=model.device, dtype=dtype)


def _rmsd_moments(model: torch.Tensor, reference: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """All moments of the pairs that :func:`rmsd` needs, (..., 43) float64, from one product.

    ``[x y]^T W [x y]`` (6 x 6), the weighted sums of ``x`` and ``y`` and the weight, after
    moving the origin near the centroid (the mean of the valid points) so that the raw
    moments keep their precision in float64.
    """
    valid = (w != 0).unsqueeze(-1)
    points = torch.where(valid, torch.cat([model, reference], -1).double(), 0.0)
    count = valid.sum(-2, keepdim=True).clamp_min(1)
    points = points - points.sum(-2, keepdim=True) / count  # the mean of the valid points
    weighted = points * w.unsqueeze(-1)
    products = weighted.transpose(-1, -2) @ points
    return torch.cat([products.flatten(-2), weighted.sum(-2), w.sum(-1, keepdim=True)], -1)


def _rmsd_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """RMSD after the best proper fit, from the moments of :func:`rmsd` (..., 43), float64.

    With centred coordinates the residual is ``G_x + G_y - 2 (s_1 + s_2 + sign(det H) s_3)``
    (``s`` the singular values of the covariance ``H``). This runs on the CPU whatever the
    input's device: a 3x3 SVD is about a microsecond there (64 in ~100 us on the development
    machine), while on CUDA each of these small steps is a kernel launch and the SVD a
    cuSOLVER call.
    """
    n = moments[..., 42].clamp_min(1e-12)
    products = moments[..., :36].unflatten(-1, (6, 6))
    x_mean = moments[..., 36:39] / n.unsqueeze(-1)
    y_mean = moments[..., 39:42] / n.unsqueeze(-1)
    h = products[..., :3, 3:] - n[..., None, None] * x_mean.unsqueeze(-1) * y_mean.unsqueeze(-2)
    diagonal = torch.diagonal(products, dim1=-2, dim2=-1)
    spread = diagonal.sum(-1) - n * ((x_mean * x_mean).sum(-1) + (y_mean * y_mean).sum(-1))
    s = torch.linalg.svdvals(h)  # descending
    fit = s[..., 0] + s[..., 1] + torch.where(_det3(h) < 0, -s[..., 2], s[..., 2])
    return torch.sqrt((spread - 2.0 * fit).clamp_min(0.0) / n)
