"""pLDDT evaluation against scipy / numpy computations of the same statistics."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pipeline.metrics import (
    calibration_table,
    confidence_metrics,
    lddt_to_bins,
    pearson,
    plot_calibration,
    spearman,
)

try:
    from scipy import stats
except ImportError:  # scipy is optional: fall back to numpy definitions
    stats = None


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def ref_pearson(x: np.ndarray, y: np.ndarray) -> float:
    if stats is not None:
        return float(stats.pearsonr(x, y)[0])
    return float(np.corrcoef(x, y)[0, 1])


def _average_ranks_np(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for value in np.unique(a):  # ties share their mean rank
        tie = a == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def ref_spearman(x: np.ndarray, y: np.ndarray) -> float:
    if stats is not None:
        return float(stats.spearmanr(x, y)[0])
    return float(np.corrcoef(_average_ranks_np(x), _average_ranks_np(y))[0, 1])


@pytest.fixture(scope="module")
def predictions():
    g = torch.Generator().manual_seed(0)
    b, n = 6, 40
    true = torch.rand(b, n, generator=g) * 0.8 + 0.1
    plddt = (true * 100 + torch.randn(b, n, generator=g) * 12).clamp(0, 100)
    plddt = (plddt / 5).round() * 5  # ties, as a binned head produces
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 30:] = False
    mask[3, :5] = False
    return plddt, true, mask


def test_correlations_match_scipy(predictions):
    plddt, true, mask = predictions
    out = confidence_metrics(plddt, true, mask)
    p, t = plddt[mask].double().numpy(), true[mask].double().numpy() * 100
    assert out["pearson"] == pytest.approx(ref_pearson(p, t), abs=1e-9)
    assert out["spearman"] == pytest.approx(ref_spearman(p, t), abs=1e-9)
    assert out["mae"] == pytest.approx(np.mean(np.abs(p - t)), abs=1e-9)
    assert out["n_residues"] == int(mask.sum())
    per_p = np.array([plddt[i][mask[i]].double().mean() for i in range(6)])
    per_t = np.array([true[i][mask[i]].double().mean() * 100 for i in range(6)])
    assert out["pearson_structure"] == pytest.approx(ref_pearson(per_p, per_t), abs=1e-9)
    assert out["spearman_structure"] == pytest.approx(ref_spearman(per_p, per_t), abs=1e-9)
    assert out["n_structures"] == 6


def test_rank_correlation_with_ties_matches_numpy_definition():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0])
    y = torch.tensor([2.0, 1.0, 4.0, 4.0, 7.0, 6.0, 6.0, 1.0])
    expected = np.corrcoef(_average_ranks_np(x.numpy()), _average_ranks_np(y.numpy()))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(pearson(torch.ones(5), torch.arange(5.0)))  # undefined, not 0


def test_calibration_table_matches_numpy_binning(predictions):
    plddt, true, mask = predictions
    table = calibration_table(plddt, true, mask, n_bins=5)
    p, t = plddt[mask].double().numpy(), true[mask].double().numpy() * 100
    edges = np.linspace(0, 100, 6)
    counts, _ = np.histogram(p, bins=edges)  # numpy's last bin also includes 100
    assert np.array_equal(table.count, counts)
    ece = 0.0
    for k in range(5):
        inside = (p >= edges[k]) & ((p < edges[k + 1]) if k < 4 else (p <= edges[k + 1]))
        if inside.any():
            assert table.mean_true[k] == pytest.approx(t[inside].mean())
            assert table.mean_predicted[k] == pytest.approx(p[inside].mean())
            ece += inside.sum() / len(p) * abs(p[inside].mean() - t[inside].mean())
        else:
            assert np.isnan(table.mean_true[k])
    assert table.ece == pytest.approx(ece)
    assert len(table.rows()) == 5


def test_calibration_plot_is_a_figure(predictions):
    plddt, true, mask = predictions
    fig = plot_calibration(calibration_table(plddt, true, mask))
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_mix_ups_are_rejected(predictions):
    plddt, true, mask = predictions
    with pytest.raises(ValueError, match="true_lddt"):
        confidence_metrics(plddt, true * 100, mask)
    with pytest.raises(ValueError, match="plddt"):
        confidence_metrics(plddt / 100 - 1, true, mask)


def test_lddt_bins():
    bins = lddt_to_bins(torch.tensor([0.0, 0.019, 0.02, 0.5, 0.999, 1.0]), n_bins=50)
    assert bins.tolist() == [0, 0, 1, 25, 49, 49]


def test_top_by_plddt_averages_over_the_mask_only():
    from pipeline.metrics import top_by_plddt

    plddt = torch.tensor([[[10.0, 10.0, 99.0], [50.0, 50.0, 0.0]]])  # (B=1, S=2, L=3)
    mask = torch.tensor([[True, True, False]])  # residue 3 is padding
    best, mean = top_by_plddt(plddt, mask)
    assert best.tolist() == [1]
    assert mean.tolist() == [[10.0, 50.0]]
