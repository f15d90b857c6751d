"""Handedness check: does a model have the chirality of its reference, or of its mirror image?

lDDT compares distances only, so the mirror image of a perfect model scores lDDT 1.0
(design brief, section 4). A diffusion model can produce mirror images, so validation reports
this check next to lDDT (RMSD and TM-score also penalise a mirror image, but cannot say
whether a poor score comes from the handedness or from the fold).

Method: the signed volume ``V = (b - a) . ((c - a) x (d - a))`` of every quadruple of
consecutive atoms ``(i, i+1, i+2, i+3)`` (C3' trace: the local handedness of the backbone,
right-handed in A-form helices) is compared between model and reference. The score is the
fraction of quadruples whose volume has the same sign in both, counting only quadruples that
are clearly non-planar in the reference (``|V_ref| >= min_volume``). Mirroring a model flips
every sign, so a model with agreement ``a`` has a mirror image with agreement ``1 - a``:
a correct fold scores near 1, its mirror near 0, and a structureless model near 0.5.
Local quadruples make the check independent of how good the global fold is.
"""

from __future__ import annotations

import torch

__all__ = ["MIRROR_THRESHOLD", "chirality", "is_mirrored"]

#: Agreement below this flags a mirror image: the mirror of any model with agreement above
#: 0.65 (any plausible fold) is flagged, and random-handed models (about 0.5) are not.
MIRROR_THRESHOLD = 0.35


def _signed_volumes(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x[..., :-3, :], x[..., 1:-2, :], x[..., 2:-1, :], x[..., 3:, :]
    return ((b - a) * torch.linalg.cross(c - a, d - a, dim=-1)).sum(-1)


@torch.no_grad()
def chirality(
    model: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    *,
    min_volume: float = 1.0,
) -> torch.Tensor:
    """Fraction of local quadruples with the reference's handedness, (B,) in [0, 1].

    Parameters
    ----------
    model, reference : torch.Tensor
        (B, N, 3) coordinates in Angstrom of corresponding atoms in chain order (C3').
    mask : torch.Tensor
        (B, N) bool; a quadruple counts only when its four consecutive atoms are all present.
    min_volume : float
        Quadruples with ``|V_ref| < min_volume`` (A^3, scalar triple product) are ignored as
        nearly planar; consecutive C3' quadruples of A-form RNA have ``|V|`` of tens of A^3.

    Returns
    -------
    torch.Tensor
        (B,) float32 agreement; 0.5 (undecided) where no quadruple qualifies. Invariant under
        rigid motions of either structure; mirroring the model maps ``a`` to ``1 - a``.
    """
    if model.shape != reference.shape or model.shape[-1] != 3:
        raise ValueError(
            "model and reference must have the same shape (B, N, 3), but got "
            f"{tuple(model.shape)} and {tuple(reference.shape)}."
        )
    m = mask.bool()
    x = torch.where(m.unsqueeze(-1), model.double(), 0.0)
    y = torch.where(m.unsqueeze(-1), reference.double(), 0.0)
    if x.shape[-2] < 4:
        return torch.full(x.shape[:-2], 0.5, dtype=torch.float32, device=x.device)
    v_mod = _signed_volumes(x)
    v_ref = _signed_volumes(y)
    quad_ok = m[..., :-3] & m[..., 1:-2] & m[..., 2:-1] & m[..., 3:]
    used = quad_ok & (v_ref.abs() >= min_volume)
    agree = (torch.sign(v_mod) == torch.sign(v_ref)) & used
    n_used = used.sum(-1)
    out = torch.where(n_used > 0, agree.sum(-1) / n_used.clamp_min(1), 0.5)
    return out.float()


def is_mirrored(
    model: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = MIRROR_THRESHOLD,
    min_volume: float = 1.0,
) -> torch.Tensor:
    """(B,) bool: the model has the handedness of the reference's mirror image.

    True where :func:`chirality` is below ``threshold`` (default :data:`MIRROR_THRESHOLD`).
    """
    return chirality(model, reference, mask, min_volume=min_volume) < threshold
