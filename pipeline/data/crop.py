"""Cropping structures to a training length.

Chains longer than the crop are cropped, never dropped. Both crops keep the selected residues
in their original order with their original residue and chain numbers, so relative positions
and chain breaks stay visible to the model. Which residues are kept is decided by the ``rng``
passed in; the datasets seed it from ``(seed, epoch, index)`` so that a crop is reproducible.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.data.features import REPRESENTATIVE_ATOM, RNASample


def select_residues(sample: RNASample, index: np.ndarray) -> RNASample:
    """The residues ``index`` (sorted positions) of ``sample`` as a new sample."""
    index = np.asarray(index, dtype=np.int64)
    return RNASample(
        name=sample.name,
        sequence="".join(sample.sequence[i] for i in index),
        coords=sample.coords[index],
        atom_mask=sample.atom_mask[index],
        residue_index=sample.residue_index[index],
        chain_index=sample.chain_index[index],
    )


def crop_contiguous(sample: RNASample, crop_length: int, rng: np.random.Generator) -> RNASample:
    """A window of ``crop_length`` consecutive residues (in file order) at a random start.

    The window may span a chain break of a multi-chain structure. Samples no longer than
    ``crop_length`` are returned unchanged.
    """
    n = len(sample)
    if n <= crop_length:
        return sample
    start = int(rng.integers(0, n - crop_length + 1))
    return select_residues(sample, np.arange(start, start + crop_length))


def residue_centres(sample: RNASample) -> np.ndarray:
    """(L, 3) position of each residue (A): its representative atom (C3') when present, else
    the mean of its present atoms, else NaN."""
    present = sample.atom_mask.astype(np.float64)
    counts = present.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sample.coords * present[..., None]).sum(axis=1) / counts
    centres = np.where(counts > 0, mean, np.nan)
    rep = sample.atom_mask[:, REPRESENTATIVE_ATOM]
    centres[rep] = sample.coords[rep, REPRESENTATIVE_ATOM]
    return centres


def crop_spatial(sample: RNASample, crop_length: int, rng: np.random.Generator) -> RNASample:
    """The ``crop_length`` residues nearest to a random centre residue (by residue position).

    The centre is drawn among residues with at least one atom; residues without atoms come
    last. Ties are broken by residue order, so the crop is a deterministic function of the
    draw. Samples no longer than ``crop_length`` are returned unchanged.
    """
    n = len(sample)
    if n <= crop_length:
        return sample
    centres = residue_centres(sample)
    located = np.nonzero(np.isfinite(centres[:, 0]))[0]
    if len(located) == 0:
        return crop_contiguous(sample, crop_length, rng)
    centre = centres[located[int(rng.integers(0, len(located)))]]
    dist = np.linalg.norm(centres - centre, axis=-1)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    keep = np.sort(np.argsort(dist, kind="stable")[:crop_length])
    return select_residues(sample, keep)


def crop_sample(
    sample: RNASample,
    crop_length: int,
    mode: Literal["contiguous", "spatial"],
    rng: np.random.Generator,
) -> RNASample:
    """Crop by ``mode`` (see :func:`crop_contiguous`, :func:`crop_spatial`)."""
    if mode == "contiguous":
        return crop_contiguous(sample, crop_length, rng)
    if mode == "spatial":
        return crop_spatial(sample, crop_length, rng)
    raise ValueError(f"crop mode must be 'contiguous' or 'spatial', but got {mode!r}")
