"""The model benchmark script runs end to end on a CPU at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "bench_model.py"),
        "--presets", "small_model", "--lengths", "8", "12", "--micro-batch", "2",
        "--warmup", "1", "--repeats", "2", "--device", "cpu", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["length"] for r in rows] == [8, 12]
    for r in rows:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["flops"] > 0
        assert r["residues_per_s"] == 2 * r["length"] / (r["step_ms"] / 1e3)
        assert r["peak_mem_gib"] is None  # CPU: no CUDA allocator to ask
    assert rows[1]["flops"] > rows[0]["flops"]
    table = out.with_suffix(".md").read_text()
    assert "| small_model |" in table and "2 x 12" in table
