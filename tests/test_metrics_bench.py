"""The metrics benchmark's trajectory-fit count runs on a CPU at a tiny size."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pipeline.metrics import _search

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_metrics  # noqa: E402


def test_count_fits_counts_both_settings_and_restores_the_search(tmp_path):
    gdt, tm_score = (importlib.import_module(f"pipeline.metrics.{m}") for m in ("gdt", "tm_score"))
    fits = _search._fit_from_moments, _search.quaternion_fit_unchecked
    searches = gdt.superposition_search, tm_score.superposition_search
    result = bench_metrics.main(["--device", "cpu", "--n", "3", "--length", "60",
                                 "--count-fits", "gdt_ts_budget", "tm_score",
                                 "--out", str(tmp_path)])
    counts = result["trajectory_fits"]
    assert set(counts) == {"gdt_ts_budget", "tm_score"}
    for row in counts.values():
        assert row["equal"]
        # Compaction one refit late can only refit more trajectories, never fewer.
        assert 0 < row["overlap_false"] <= row["overlap_true"], row
    assert (_search._fit_from_moments, _search.quaternion_fit_unchecked) == fits
    assert (gdt.superposition_search, tm_score.superposition_search) == searches
    assert (tmp_path / "bench_metrics.json").exists()
