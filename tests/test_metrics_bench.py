"""The A/B table of the metrics benchmark (benchmarks/ab_table.py): medians per variant and the
checksum check, on run files written by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ab_table():
    spec = importlib.util.spec_from_file_location("ab_table", REPO_ROOT / "benchmarks" /
                                                  "ab_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, seconds: dict, checksums: dict) -> str:
    path = root / name
    path.mkdir()
    device = {"parts_s": seconds, "parts_checksum": checksums}
    (path / "bench_metrics.json").write_text(json.dumps({"device": device}))
    return str(path)


def test_ab_table_gives_each_variant_its_rounds_and_median(tmp_path):
    runs = [
        _run(tmp_path, "off1", {"tm": 0.060}, {"tm": 12.5}),
        _run(tmp_path, "graph1", {"tm": 0.030}, {"tm": 12.5}),
        _run(tmp_path, "off2", {"tm": 0.070}, {"tm": 12.5}),
        _run(tmp_path, "graph2", {"tm": 0.020}, {"tm": 12.5}),
        _run(tmp_path, "off3", {"tm": 0.050}, {"tm": 12.5}),
        _run(tmp_path, "graph3", {"tm": 0.040}, {"tm": 12.5}),
    ]
    text = _ab_table().main(runs)
    assert "| tm | 60.0 / 70.0 / 50.0 | 60.0 | 30.0 / 20.0 / 40.0 | 30.0 |" in text
    assert "checksums agree" in text


def test_ab_table_flags_variants_that_compute_different_results(tmp_path):
    runs = [_run(tmp_path, "off1", {"tm": 0.06}, {"tm": 12.5}),
            _run(tmp_path, "graph1", {"tm": 0.03}, {"tm": 12.7})]
    text = _ab_table().main(runs)
    assert "checksums differ: tm: [12.5, 12.7]" in text
