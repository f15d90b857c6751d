"""The sampler benchmark script runs end to end on a checkpoint of a tiny debug run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RUN
from pipeline.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_sampler_scores_each_step_count_with_and_without_the_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY_RUN, "tracking.enabled=false", f"output_dir={tmp_path / 'out'}"]
    assert main(["train", "--scenario", "debug", *sum((["--set", o] for o in overrides), [])]) == 0
    (checkpoint,) = (tmp_path / "out").glob("runs/*/checkpoints/best.pt")

    out = tmp_path / "sampler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_sampler.py"), str(checkpoint),
           "--steps", "2", "20", "--uncapped", "--set", "data.n_val=4", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["structures"] == 4
    rows = {(r["steps"], r["step_cap"]): r for r in report["rows"]}
    assert set(rows) == {(2, True), (2, False), (20, True), (20, False)}
    for r in rows.values():
        assert 0 <= r["lddt"] <= 1 and r["rmsd"] >= 0 and r["seconds"] > 0
    # Two uncapped steps from sigma_max overshoot by ~1,500 A; capped, the sample stays at the
    # scale of the structures (tens of A at most for an untrained model).
    assert rows[(2, False)]["rmsd"] > 10 * rows[(2, True)]["rmsd"]
    assert "| 2 | no |" in out.with_suffix(".md").read_text()

    bad = subprocess.run([*cmd[:3], "--set", "optim.lr=1", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "only data.* keys" in bad.stderr
