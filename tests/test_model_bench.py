"""The model benchmark script runs end to end on a CPU at a tiny size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

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


def test_profile_traces_ops_to_shapes_and_model_lines(tmp_path):
    """``--profile`` writes, per case, the op table and the same ops grouped by input shapes
    and by call site, with lines of the model's own source among the sites."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "bench_model.py"),
        "--presets", "small_model", "--lengths", "8", "--warmup", "0", "--repeats", "1",
        "--device", "cpu", "--profile", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.with_suffix(".profile.txt").read_text()
    assert "## small_model compile=False 1x8" in text
    by_shape = text.split("By input shapes:")[1].split("By call site")[0]
    # Rows such as "aten::mm ... [[16, 64], [64, 64]]". Which ops make the 30 rows depends on
    # timings at this size, so the row's op is not fixed.
    assert re.search(r"aten::\w+ .*\[\[\d+, \d+", by_shape), by_shape
    by_site = text.split("By call site (ms of self time, calls, op, site):")[1]
    assert "pipeline/model/" in by_site


def test_profile_without_stacks_when_the_detailed_profile_fails(monkeypatch, caplog):
    """Parsing a profile with Python stacks has raised UnicodeDecodeError inside torch (a
    large model under autocast): the table is then made from a profile without stacks."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    real = bench_model._profiled

    def flaky(fn, device, *, detailed=False):
        if detailed:
            raise UnicodeDecodeError("utf-8", b"\xb6", 0, 1, "invalid start byte")
        return real(fn, device)

    monkeypatch.setattr(bench_model, "_profiled", flaky)
    x = torch.randn(16, 16)
    text = bench_model.profile_table(lambda: (x @ x).sum(), torch.device("cpu"))
    assert "aten::mm" in text and "By call site" in text
    assert "profiling without" in caplog.text


def test_kernel_breakdown_classifies_kernels_and_measures_idle_time():
    """The GPU profile summary: categories by kernel name, busy time as the union of kernel
    intervals (overlapping kernels on two streams count once), idle = span - busy."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from bench_model import kernel_breakdown
    finally:
        sys.path.pop(0)
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 0.0, 10.0),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 12.0, 20.0),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 25.0, 35.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
         30.0, 40.0),  # overlaps the attention kernel: its 5 shared microseconds count once
        ("Memcpy HtoD (Pinned -> Device)", 50.0, 52.0),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", 60.0, 70.0),
    ]
    out = kernel_breakdown(kernels)
    assert out["span_us"] == 70.0
    assert out["busy_us"] == 10.0 + 8.0 + 15.0 + 2.0 + 10.0
    assert out["idle_us"] == 70.0 - out["busy_us"]
    assert out["kernel_us"] == {"attention": 10.0, "matmul": 18.0, "copy": 2.0, "other": 20.0}
    assert out["kernels"] == {"attention": 1, "matmul": 2, "copy": 1, "other": 2}
    assert kernel_breakdown([])["busy_us"] == 0.0


def test_memory_estimate_grows_with_the_crop_and_shrinks_with_checkpointing():
    """estimate_memory.py counts live fake-tensor bytes: more for a longer crop, less when the
    blocks are recomputed in backward instead of keeping their activations."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import estimate_memory
    finally:
        sys.path.pop(0)
    short, long = (estimate_memory.estimate("small_model", n, 1, []) for n in (16, 48))
    assert 0 < short["peak_gib"] < long["peak_gib"]
    assert short["after_forward_gib"] <= short["peak_gib"]
    kept = estimate_memory.estimate("small_model", 48, 1, ["activation_checkpointing=false"])
    recomputed = estimate_memory.estimate("small_model", 48, 1, ["activation_checkpointing=true"])
    assert recomputed["after_forward_gib"] < kept["after_forward_gib"]
    assert recomputed["params_grads_adam_gib"] == kept["params_grads_adam_gib"] > 0
