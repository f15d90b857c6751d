"""Evaluation of predicted confidence (pLDDT) against the true per-residue lDDT.

Jumper, J. et al. (2021). Highly accurate protein structure prediction with AlphaFold.
Nature 596, 583-589 (pLDDT: predicted per-residue lDDT, 0-100, trained on 50 bins).
Abramson, J. et al. (2024). Accurate structure prediction of biomolecular interactions with
AlphaFold 3. Nature 630, 493-500.

Conventions:

- ``plddt`` is the predicted per-residue lDDT on the 0-100 scale; ``true_lddt`` is the
  per-residue lDDT of the predicted structure against the native on C3' atoms as a fraction
  in [0, 1] (:func:`pipeline.metrics.plddt_target`); it is multiplied by 100 here, so errors
  are reported in lDDT points (0-100).
- ``mask`` selects the residues to evaluate: real residues whose true lDDT is defined (at least
  one contact), i.e. ``residue_mask & has_contacts``.
- Correlations are computed two ways: per residue, over all selected residues of the batch
  pooled; and per structure, over the per-structure means. Spearman uses average ranks for
  ties (as ``scipy.stats.spearmanr``). A correlation that is undefined (fewer than 2 values or
  a constant input) is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CalibrationTable",
    "calibration_table",
    "confidence_metrics",
    "lddt_to_bins",
    "pearson",
    "plot_calibration",
    "spearman",
    "top_by_plddt",
]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64); NaN if undefined."""
    x = torch.as_tensor(x).double().flatten()
    y = torch.as_tensor(y).double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have equal sizes, but got {x.numel()} and {y.numel()}.")
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    if denom.item() == 0.0:
        return float("nan")
    return float((xc * yc).sum() / denom)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (``scipy.stats.rankdata`` 'average')."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two 1-D tensors; NaN if undefined."""
    x = torch.as_tensor(x).double().flatten()
    y = torch.as_tensor(y).double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have equal sizes, but got {x.numel()} and {y.numel()}.")
    return pearson(_average_ranks(x), _average_ranks(y))


def _checked(
    plddt: torch.Tensor, true_lddt: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plddt = torch.as_tensor(plddt).detach().double().cpu()
    true = torch.as_tensor(true_lddt).detach().double().cpu()
    mask = torch.as_tensor(mask).detach().bool().cpu()
    if plddt.shape != true.shape or plddt.shape != mask.shape or plddt.dim() != 2:
        raise ValueError(
            "plddt, true_lddt and mask must have the same shape (B, L), but got "
            f"{tuple(plddt.shape)}, {tuple(true.shape)} and {tuple(mask.shape)}."
        )
    p, t = plddt[mask], true[mask]
    if p.numel() and (p.min() < -1e-3 or p.max() > 100 + 1e-3):
        raise ValueError(
            f"plddt must be on the 0-100 scale, but got values in [{p.min():.3g}, {p.max():.3g}]."
        )
    if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
        raise ValueError(
            "true_lddt must be a fraction in [0, 1], but got values in "
            f"[{t.min():.3g}, {t.max():.3g}]."
        )
    return plddt, true * 100.0, mask


def confidence_metrics(
    plddt: torch.Tensor, true_lddt: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Agreement of pLDDT with the true per-residue lDDT.

    Parameters
    ----------
    plddt : torch.Tensor
        (B, L) predicted lDDT, 0-100.
    true_lddt : torch.Tensor
        (B, L) true per-residue lDDT, fraction in [0, 1].
    mask : torch.Tensor
        (B, L) bool, residues to evaluate.

    Returns
    -------
    dict
        ``pearson`` and ``spearman`` per residue (pooled), ``pearson_structure`` and
        ``spearman_structure`` over per-structure means, ``mae`` (mean absolute error in lDDT
        points, per residue), ``n_residues``, ``n_structures``.
    """
    p, t, m = _checked(plddt, true_lddt, mask)
    pr, tr = p[m], t[m]
    n_per = m.sum(-1)
    has = n_per > 0
    p_mean = (torch.where(m, p, 0.0).sum(-1) / n_per.clamp_min(1))[has]
    t_mean = (torch.where(m, t, 0.0).sum(-1) / n_per.clamp_min(1))[has]
    return {
        "pearson": pearson(pr, tr),
        "spearman": spearman(pr, tr),
        "pearson_structure": pearson(p_mean, t_mean),
        "spearman_structure": spearman(p_mean, t_mean),
        "mae": float((pr - tr).abs().mean()) if pr.numel() else float("nan"),
        "n_residues": int(pr.numel()),
        "n_structures": int(has.sum()),
    }


@dataclass(frozen=True)
class CalibrationTable:
    """Reliability table of pLDDT: per bin of predicted pLDDT, the mean true lDDT.

    All arrays have one entry per bin (``bin_edges`` one more); means are NaN in empty bins.
    Values are on the 0-100 scale. ``ece`` is the expected calibration error,
    ``sum_bins count / n * |mean_predicted - mean_true|``, in lDDT points.
    """

    bin_edges: np.ndarray
    mean_predicted: np.ndarray
    mean_true: np.ndarray
    count: np.ndarray
    ece: float

    def rows(self) -> list[dict[str, float]]:
        """One dict per bin (``lo``, ``hi``, ``mean_predicted``, ``mean_true``, ``count``)."""
        return [
            {
                "lo": float(self.bin_edges[i]),
                "hi": float(self.bin_edges[i + 1]),
                "mean_predicted": float(self.mean_predicted[i]),
                "mean_true": float(self.mean_true[i]),
                "count": int(self.count[i]),
            }
            for i in range(len(self.count))
        ]


def calibration_table(
    plddt: torch.Tensor, true_lddt: torch.Tensor, mask: torch.Tensor, *, n_bins: int = 10
) -> CalibrationTable:
    """Bin residues by predicted pLDDT into ``n_bins`` equal bins of [0, 100].

    Bins are half-open ``[lo, hi)`` except the last, which includes 100.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, but got n_bins={n_bins}.")
    p, t, m = _checked(plddt, true_lddt, mask)
    pr, tr = p[m].numpy(), t[m].numpy()
    edges = np.linspace(0.0, 100.0, n_bins + 1)
    idx = np.clip(np.floor(pr / 100.0 * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=pr, minlength=n_bins) / count
        mean_t = np.bincount(idx, weights=tr, minlength=n_bins) / count
    n = count.sum()
    filled = count > 0
    ece = (
        float(np.sum(count[filled] / n * np.abs(mean_p[filled] - mean_t[filled])))
        if n
        else float("nan")
    )
    return CalibrationTable(edges, mean_p, mean_t, count, ece)


def plot_calibration(table: CalibrationTable, *, title: str | None = None):
    """Reliability diagram of a :class:`CalibrationTable` as a matplotlib ``Figure`` (Agg).

    Mean true lDDT per pLDDT bin (points, with the identity line for a calibrated head) and the
    residue count per bin (bars, right axis). The figure is created without pyplot, so it
    needs no display and leaves no global state; save it with ``fig.savefig(path)`` or log it
    with ``mlflow.log_figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    centres = (table.bin_edges[:-1] + table.bin_edges[1:]) / 2
    widths = np.diff(table.bin_edges)
    counts_ax = ax.twinx()
    counts_ax.bar(centres, table.count, width=widths * 0.9, color="0.85", zorder=0)
    counts_ax.set_ylabel("residues per bin")
    ax.set_zorder(counts_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 100], [0, 100], linestyle="--", color="0.4", label="calibrated")
    filled = table.count > 0
    ax.plot(
        table.mean_predicted[filled], table.mean_true[filled], marker="o", color="C0",
        label="mean true lDDT",
    )
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("predicted pLDDT")
    ax.set_ylabel("true lDDT (C3', x100)")
    ax.set_title(title or f"pLDDT calibration (ECE {table.ece:.1f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def lddt_to_bins(lddt: torch.Tensor, n_bins: int = 50) -> torch.Tensor:
    """Class index of an lDDT fraction in [0, 1] for a pLDDT head with ``n_bins`` equal bins.

    Bin ``k`` covers ``[k / n_bins, (k + 1) / n_bins)``; 1.0 falls in the last bin. The bin
    centres ``(k + 0.5) / n_bins * 100`` turn the head's distribution into an expected pLDDT.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, but got n_bins={n_bins}.")
    return torch.clamp((lddt * n_bins).floor().long(), 0, n_bins - 1)


def top_by_plddt(plddt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample with the highest mean pLDDT for each structure.

    Parameters
    ----------
    plddt : torch.Tensor
        (B, S, L) pLDDT of S sampled structures, 0-100.
    mask : torch.Tensor
        (B, L) bool, residues to average over.

    Returns
    -------
    best : torch.Tensor
        (B,) int64 index of the chosen sample.
    mean_plddt : torch.Tensor
        (B, S) masked mean pLDDT of every sample.
    """
    weights = mask[:, None].to(plddt.dtype)
    mean_plddt = (plddt * weights).sum(-1) / weights.sum(-1).clamp_min(1)
    return mean_plddt.argmax(dim=1), mean_plddt
