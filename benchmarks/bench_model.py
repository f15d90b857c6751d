"""Training-step benchmark of the Diffold model presets.

For each preset and crop length: median time of one training step (forward, backward, AdamW;
bf16 autocast on CUDA, float32 on CPU) over timed repeats after warm-up, residues per second,
peak GPU memory, FLOPs per step (``torch.utils.flop_counter``) and model FLOP utilisation
against ``--peak-tflops``; optionally also with ``torch.compile`` (``--compile``). Writes the
results as JSON to ``--out`` and as a markdown table beside it (same name, ``.md``).

Run from the repository root with the package importable (``pip install -e .`` or
``PYTHONPATH=.``)::

    python benchmarks/bench_model.py --out bench/model.json                 # GPU, all presets
    python benchmarks/bench_model.py --presets small_model --lengths 16 \\
        --micro-batch 2 --warmup 1 --repeats 2 --out bench/smoke.json      # CPU smoke test

Timings on CUDA use CUDA events around each step; compare variants only from one run on one
machine (run-to-run spread on a shared GPU is several percent).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import yaml

from pipeline.data.features import ATOM_NAMES
from pipeline.model import LossConfig, ModelConfig, build_model, count_parameters, flops_per_step

logger = logging.getLogger("bench_model")

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
DEFAULT_PRESETS = ("small_model", "base_model", "large_model")
DEFAULT_LENGTHS = (64, 128, 256, 512, 1024)


def preset_model_config(name: str, overrides: list[str]) -> ModelConfig:
    """The ``model`` section of a preset file, with ``KEY=VALUE`` overrides of model fields."""
    data = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()) or {}
    section = dict(data.get("model") or {})
    loss = section.pop("loss", {}) or {}
    cfg = ModelConfig(**section, loss=LossConfig(**loss))
    for item in overrides:
        key, _, raw = item.partition("=")
        if key == "loss" or not hasattr(cfg, key):
            raise SystemExit(f"error: --set {item}: {key!r} is not a model field")
        expected = type(getattr(cfg, key))
        value = yaml.safe_load(raw)
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise SystemExit(f"error: --set {item}: expected {expected.__name__}")
        cfg = dataclasses.replace(cfg, **{key: value})
    problems = cfg.validate()
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return cfg


def synthetic_batch(batch_size: int, length: int, device: torch.device, seed: int = 0) -> dict:
    """A full batch of helix-like structures of ``length`` nucleotides (no padding)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(length, dtype=torch.float32)
    theta = i * math.radians(32.7)
    c3 = torch.stack([8.7 * torch.cos(theta), 8.7 * torch.sin(theta), 2.8 * i], dim=-1)
    n_atoms = len(ATOM_NAMES)
    coords = c3[None, :, None] + 1.5 * torch.randn(batch_size, length, n_atoms, 3, generator=g)
    batch = {
        "aatype": torch.randint(0, 4, (batch_size, length), generator=g),
        "residue_index": torch.arange(length).repeat(batch_size, 1),
        "chain_index": torch.zeros(batch_size, length, dtype=torch.long),
        "residue_mask": torch.ones(batch_size, length, dtype=torch.bool),
        "coords": coords,
        "atom_mask": torch.ones(batch_size, length, n_atoms, dtype=torch.bool),
        "lengths": torch.full((batch_size,), length),
    }
    return {k: v.to(device) for k, v in batch.items()}


class StepTimer:
    """Wall time of a callable in ms: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def trace_host_syncs(fn, device: torch.device) -> tuple[int | None, list[str]]:
    """Host-device synchronisations during ``fn()`` and where they come from (CUDA only).

    Uses CUDA sync debug mode, which warns at every sync; the innermost project frame of each
    warning names its call site (syncs raised from autograd's C++ threads have no Python
    stack and show as ``<backward>``).
    """
    if device.type != "cuda":
        return None, []
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [
            f for f in traceback.extract_stack()[:-1]
            if "pipeline" in f.filename and "benchmarks" not in f.filename
        ]
        f = frames[-1] if frames else None
        sites[f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "<backward>"] += 1

    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(sites.values()), [f"{site} x{n}" for site, n in sites.most_common()]


def _profiled(fn, device: torch.device, *, detailed: bool = False) -> torch.profiler.profile:
    """The profiler after one call of ``fn`` (CPU activity, plus CUDA kernels on CUDA);
    ``detailed`` also records input shapes and Python call stacks."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(
        activities=activities, record_shapes=detailed, with_stack=detailed
    ) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def profile_table(fn, device: torch.device, rows: int = 30) -> str:
    """Profiler tables of one call of ``fn``: ops sorted by their own (self) device time, then
    the same grouped by input shapes and by the model's call site (so that a generic op such as
    ``aten::copy_`` can be traced to the tensors and the line that cause it)."""
    try:
        prof = _profiled(fn, device, detailed=True)
        prof.events()  # parsed here; with stacks it has failed on undecodable frame names
    except (UnicodeDecodeError, RuntimeError) as exc:
        logger.warning("profile with shapes and stacks failed (%s); profiling without", exc)
        prof = _profiled(fn, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    phases = prof.key_averages().table(
        sort_by="device_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=8
    )
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows, max_name_column_width=40, max_shapes_column_width=80
    )
    return "\n".join([
        prof.key_averages().table(sort_by=key, row_limit=rows),
        "Phases (inclusive):", phases,
        "By input shapes:", by_shape,
        "By call site (ms of self time, calls, op, site):",
        _by_call_site(prof, key, rows),
    ])


def _call_site(event) -> str:
    """Where an op was called from: the innermost function of this package's source (named
    by its ``def`` line), else the autograd node that ran it in backward, else the innermost
    Python frame; ``?`` when the profile has no stacks."""
    fallback = "?"
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if "pipeline/" in name and ".py(" in name:
            return name[name.index("pipeline/"):]
        if name.startswith("autograd::engine::evaluate_function: "):
            return "backward: " + name.split(": ", 1)[1]
        if fallback == "?" and ".py(" in name and "torch/nn/modules/module.py" not in name:
            fallback = name
        parent = parent.cpu_parent
    return fallback


def _by_call_site(prof: torch.profiler.profile, key: str, rows: int) -> str:
    """Self time per (op, call site), largest first: ms, calls, op, site (see
    :func:`_call_site`). The profiler's own grouping by stack leaves the stacks empty here."""
    totals: dict[tuple[str, str], list[float]] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        entry = totals.setdefault((event.name, _call_site(event)), [0.0, 0])
        entry[0] += getattr(event, key)
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)[:rows]
    return "\n".join(
        f"{us / 1e3:10.3f} ms {int(n):6d}x  {op:<28} {site}" for (op, site), (us, n) in ranked
    )


#: Substrings of kernel names (lower case) by category; the first match wins.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "efficient_attention")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "cublas", "gemv")),
    ("copy", ("memcpy", "memset")),
)


def kernel_breakdown(kernels: list[tuple[str, float, float]]) -> dict:
    """Where the device time of one step went, from its kernels ``(name, start_us, end_us)``.

    Returns the span from the first kernel's start to the last one's end, the time at least
    one kernel was running (the union of their intervals), the idle rest (the GPU waiting
    for the host to launch work), and the kernel time per category of
    :data:`KERNEL_CATEGORIES` (``other``: elementwise, reductions, normalisations, ...).
    """
    per_category: dict[str, float] = {name: 0.0 for name, _ in KERNEL_CATEGORIES}
    per_category["other"] = 0.0
    counts = dict.fromkeys(per_category, 0)
    for name, start, end in kernels:
        lower = name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in lower for k in keys)),
                        "other")
        per_category[category] += end - start
        counts[category] += 1
    busy, reach = 0.0, -math.inf
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    span = max((k[2] for k in kernels), default=0.0) - min((k[1] for k in kernels), default=0.0)
    return {
        "span_us": span,
        "busy_us": busy,
        "idle_us": span - busy,
        "kernel_us": per_category,
        "kernels": counts,
    }


def profile_breakdown(fn, device: torch.device) -> dict:
    """:func:`kernel_breakdown` of one call of ``fn`` on CUDA (profiler kernel events)."""
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in _profiled(fn, device).events()
        if e.device_type != torch.autograd.DeviceType.CPU
    ]
    return kernel_breakdown(kernels)


def bench_one(
    model: torch.nn.Module,
    batch: dict,
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    check_syncs: bool,
    autocast,
    profile_to: Path | None = None,
    label: str = "",
    breakdown: bool = False,
) -> dict:
    """Warm up, then time ``repeats`` training steps; returns the measurements (with
    ``breakdown``, also :func:`profile_breakdown` of one more step, CUDA only)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> torch.Tensor:
        with autocast():
            return model(batch)["loss"]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    timer = StepTimer(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        timer(step)
    warmup_s = time.perf_counter() - t0
    syncs = {}
    if check_syncs:
        n_forward, sites = trace_host_syncs(forward, device)
        n_step, _ = trace_host_syncs(step, device)
        syncs = {"host_syncs_forward": n_forward, "host_syncs_step": n_step,
                 "host_sync_sites_forward": sites}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timer(step) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if profile_to is not None:
        with profile_to.open("a") as f:
            f.write(f"\n## {label}\n\n{profile_table(step, device)}\n")
    extra = {}
    if breakdown and device.type == "cuda":
        extra["breakdown"] = profile_breakdown(step, device)
    return {
        **extra,
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "step_ms_max": max(times),
        "warmup_s": warmup_s,
        "peak_mem_gib": peak,
        **syncs,
    }


def run(args: argparse.Namespace, on_row=lambda results: None) -> list[dict]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    autocast = (
        functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    results = []
    for preset in args.presets:
        # The preset's own ``compile`` flag is overridden: rows are eager, plus compiled with
        # --compile, so that both are always measured from the same weights.
        cfg = dataclasses.replace(preset_model_config(preset, args.set), compile=False)
        torch.manual_seed(0)
        eager = build_model(cfg).to(device)
        flops: dict[int, int] = {}
        for compiled in (False, True) if args.compile else (False,):
            model = eager
            if compiled:
                model = build_model(dataclasses.replace(cfg, compile=True)).to(device)
                model.load_state_dict(eager.state_dict())
            for length in args.lengths:
                row = {
                    "preset": preset, "compile": compiled, "params": count_parameters(model),
                    "micro_batch": args.micro_batch, "length": length,
                    "activation_checkpointing": cfg.activation_checkpointing,
                    "n_diffusion_samples": cfg.n_diffusion_samples,
                }
                batch = synthetic_batch(args.micro_batch, length, device)
                try:
                    if length not in flops:
                        # From the eager model: the compiled one does the same arithmetic.
                        with autocast():
                            flops[length] = flops_per_step(eager, batch)
                    row["flops"] = flops[length]
                    row.update(
                        bench_one(model, batch, device=device, autocast=autocast,
                                  warmup=args.warmup, repeats=args.repeats,
                                  check_syncs=args.check_syncs,
                                  profile_to=args.out.with_suffix(".profile.txt")
                                  if args.profile else None,
                                  label=f"{preset} compile={compiled} {args.micro_batch}x{length}",
                                  breakdown=args.breakdown)
                    )
                    step_s = row["step_ms"] / 1e3
                    row["residues_per_s"] = args.micro_batch * length / step_s
                    row["tflops_per_s"] = row["flops"] / step_s / 1e12
                    row["mfu"] = row["tflops_per_s"] / args.peak_tflops
                    row["status"] = "ok"
                except torch.OutOfMemoryError:
                    row["status"] = "oom"
                logger.info("%s", json.dumps(row))
                results.append(row)
                on_row(results)  # keep partial results if a long sweep is cut off
                del batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if row["status"] == "oom":
                    break  # longer crops need more memory still
            if compiled:
                del model
        del eager
    return results


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Diffold training-step benchmark ({meta['device_name']}, {meta['dtype']})",
        "",
        f"torch {meta['torch']}; median of {meta['repeats']} steps after {meta['warmup']} "
        f"warm-up steps; MFU against {meta['peak_tflops']} TFLOP/s; FLOPs from "
        "torch.utils.flop_counter (matmul/attention only).",
        "",
        "| preset | params (M) | compile | batch x length | step (ms) | residues/s | peak mem "
        "(GiB) | GFLOP/step | TFLOP/s | MFU (%) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = r["status"] == "ok"

        def fmt(key: str, spec: str, scale: float = 1.0, r=r, ok=ok) -> str:
            value = r.get(key)
            return format(value * scale, spec) if ok and value is not None else "-"

        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f} | {'yes' if r['compile'] else 'no'} "
            f"| {r['micro_batch']} x {r['length']} | {fmt('step_ms', '.1f')} "
            f"| {fmt('residues_per_s', ',.0f')} | {fmt('peak_mem_gib', '.2f')} "
            f"| {fmt('flops', ',.1f', 1e-9)} | {fmt('tflops_per_s', '.2f')} "
            f"| {fmt('mfu', '.2f', 100)} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS),
                   help="crop lengths (nucleotides)")
    p.add_argument("--micro-batch", type=int, default=1, help="structures per step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--compile", action="store_true",
                   help="measure each preset with torch.compile as well as without")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="peak dense bf16 TFLOP/s of the device, for MFU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set activation_checkpointing=true")
    p.add_argument("--check-syncs", action="store_true",
                   help="count host-device syncs of one forward and one step (CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="append a profiler table of one step per case to OUT.profile.txt")
    p.add_argument("--breakdown", action="store_true",
                   help="profile one more step per case: device time by kernel category, idle")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = p.parse_args(argv)
    for name in ("micro_batch", "warmup", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": "bf16 autocast" if cuda else "float32",
        "peak_tflops": args.peak_tflops,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "argv": argv if argv is not None else sys.argv[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".profile.txt").unlink(missing_ok=True)

    def write(results: list[dict]) -> None:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown_table(results, meta))

    results = run(args, on_row=write)
    write(results)
    logger.info("\n%s", markdown_table(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
