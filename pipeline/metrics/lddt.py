"""Local Distance Difference Test (lDDT), batched and masked.

Mariani, V., Biasini, M., Barbato, A., Schwede, T. (2013). lDDT: a local superposition-free
score for comparing protein structures and models using distance difference tests.
Bioinformatics 29, 2722-2728.

Conventions (design brief, section 4): thresholds 0.5/1/2/4 A; a pair is scored when its
distance in the *reference* is within the inclusion radius (15 A; asymmetric: contacts from the
reference only); pairs of atoms within one residue are excluded; the global score is the mean
over all (pair, threshold) tests. Atoms missing from the model count as not preserved when the
caller passes them in ``ref_mask`` but not in ``model_mask``.
"""

from __future__ import annotations

import torch

DEFAULT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and per-atom lDDT.

    Parameters
    ----------
    model, reference : (B, N, 3) coordinates of corresponding atoms.
    ref_mask : (B, N) atoms present in the reference; only these define contacts.
    model_mask : (B, N) atoms present in the model (default: ``ref_mask``). A contact with an
        atom absent from the model scores 0 on every threshold.
    residue_index : (B, N) residue id of each atom; pairs with equal ids are excluded. ``None``
        means one atom per residue (no pair is excluded but the self pair).
    radius : inclusion radius in A, measured in the reference (and in the model too when
        ``symmetric``).

    Returns
    -------
    global_lddt : (B,) mean over all (contact, threshold) tests; 0 where no contact exists.
    per_atom : (B, N) the same mean restricted to contacts of each atom; 0 where none.
    """
    if model_mask is None:
        model_mask = ref_mask
    ref_mask = ref_mask.bool()
    model_mask = model_mask.bool()
    d_ref = torch.cdist(reference.float(), reference.float())
    d_mod = torch.cdist(model.float(), model.float())
    n = reference.shape[-2]
    pair = ref_mask.unsqueeze(-1) & ref_mask.unsqueeze(-2)
    if residue_index is None:
        pair = pair & ~torch.eye(n, dtype=torch.bool, device=reference.device)
    else:
        pair = pair & (residue_index.unsqueeze(-1) != residue_index.unsqueeze(-2))
    within = d_ref < radius
    if symmetric:
        within = within | (d_mod < radius)
    contacts = pair & within
    both_present = model_mask.unsqueeze(-1) & model_mask.unsqueeze(-2)
    diff = (d_ref - d_mod).abs()
    passed = torch.zeros_like(diff)
    for t in thresholds:
        passed = passed + (diff <= t).to(diff.dtype)
    passed = passed / len(thresholds) * both_present.to(diff.dtype)
    c = contacts.to(diff.dtype)
    score_sum = (passed * c).sum(-1)
    count = c.sum(-1)
    per_atom = torch.where(count > 0, score_sum / count.clamp_min(1), torch.zeros_like(count))
    total = count.sum(-1)
    global_lddt = torch.where(
        total > 0, score_sum.sum(-1) / total.clamp_min(1), torch.zeros_like(total)
    )
    return global_lddt, per_atom
