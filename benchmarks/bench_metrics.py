"""Benchmark of the validation metric set (RMSD, lDDT, GDT-TS, TM-score) and of the GDT search
budget.

Synthetic-ish data: ``--n`` reference chains of ``--length`` nucleotides (random walks with
6 A steps between consecutive C3' atoms) and, as models, copies distorted by a smooth drift
(a slow random walk of the displacement, which bends the chain like a domain motion) plus
Gaussian noise. Measured:

1. the whole metric set (:func:`pipeline.metrics.score_batch`) on the device (CUDA when
   available, else CPU) for the batch, with the exhaustive searches and with the validation
   budget; median of ``--repeats`` runs after a warm-up, timed with CUDA events;
2. biotite (``lddt``, ``superimpose`` + ``rmsd``) per structure, on the CPU;
3. this package's CPU path per structure (batch of one);
4. GDT-TS (and TM-score) accuracy vs search budget: each budget against the most exhaustive
   search, with its device time.

Writes ``bench_metrics.json`` and ``bench_metrics.md`` to ``--out``.

Run from the repository root (or with the package installed, ``pip install -e .``)::

    python -m benchmarks.bench_metrics --out runs/bench                      # 64 x 500 nt
    python -m benchmarks.bench_metrics --n 4 --length 100 --out runs/bench_small
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.metrics import gdt, lddt, rmsd, score_batch, superimpose, tm_score
from pipeline.metrics.lddt import _broadcast_distances

logger = logging.getLogger("bench_metrics")

#: (name, keyword arguments of gdt()) from the most exhaustive to the cheapest.
GDT_BUDGETS: tuple[tuple[str, dict], ...] = (
    ("exhaustive", {}),
    ("seeds2048", {"max_seeds": 2048}),
    ("seeds512", {"max_seeds": 512}),
    ("seeds128", {"max_seeds": 128}),
    ("seeds32", {"max_seeds": 32}),
    ("seeds512_iter8", {"max_seeds": 512, "max_iter": 8}),
    ("seeds128_iter4", {"max_seeds": 128, "max_iter": 4}),
    ("full_window_only", {"window_sizes": (), "max_iter": 20}),
)
TM_BUDGETS: tuple[tuple[str, dict], ...] = (
    ("exhaustive", {}),
    ("seeds512", {"max_seeds": 512}),
    ("seeds128", {"max_seeds": 128}),
    ("seeds32", {"max_seeds": 32}),
)


def make_structures(
    n: int, length: int, *, seed: int, noise: float, drift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """References (n, length, 3) and distorted models, float32, Angstrom."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, length, 3, generator=g)
    ref = (steps / steps.norm(dim=-1, keepdim=True) * 6.0).cumsum(1)
    bend = (torch.randn(n, length, 3, generator=g) * drift).cumsum(1)
    sigma = noise * (0.5 + torch.rand(n, 1, 1, generator=g))  # a spread of model quality
    model = ref + bend + sigma * torch.randn(n, length, 3, generator=g)
    return model, ref


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int, warmups: int = 1
) -> tuple[float, object]:
    """Median wall time in seconds of ``fn`` over ``repeats`` runs (after ``warmups`` runs)."""
    for _ in range(warmups):
        out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop) / 1000.0)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def checksum(out: object) -> float:
    """Sum of every number in a part's result (a tensor, or tuples and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return float(out.double().sum())
    if isinstance(out, dict):
        return sum(checksum(v) for v in out.values())
    return sum(checksum(v) for v in out)


def dynamo_counters() -> dict:
    """torch.compile's event counters (recompilations, graphs recorded or skipped)."""
    from torch._dynamo.utils import counters

    return counters


def biotite_per_structure(model: np.ndarray, ref: np.ndarray) -> dict | None:
    """biotite lDDT and superimpose + RMSD of each structure; median seconds per structure.

    ``None`` when biotite is not installed (it is a test/benchmark-only dependency and may be
    absent on the GPU machine).
    """
    try:
        import biotite.structure as struc
    except ImportError:
        logger.warning("biotite is not installed: skipping the biotite comparison")
        return None

    t_lddt, t_rmsd, values = [], [], []
    for x, y in zip(model, ref):
        atoms = struc.AtomArray(len(y))
        atoms.coord = y
        atoms.chain_id[:] = "A"
        atoms.res_id = np.arange(1, len(y) + 1)
        atoms.res_name[:] = "G"
        atoms.atom_name[:] = "C3'"
        atoms.element[:] = "C"
        mobile = atoms.copy()
        mobile.coord = x
        t0 = time.perf_counter()
        value = struc.lddt(atoms, x)
        t1 = time.perf_counter()
        fitted, _ = struc.superimpose(atoms, mobile)
        r = struc.rmsd(atoms, fitted)
        t2 = time.perf_counter()
        t_lddt.append(t1 - t0)
        t_rmsd.append(t2 - t1)
        values.append((float(value), float(r)))
    return {
        "lddt_s": statistics.median(t_lddt),
        "rmsd_s": statistics.median(t_rmsd),
        "values": values,
    }


def time_metric_set(
    model: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, val_budget: dict, repeats: int,
    warmups: int = 1, **kwargs,
) -> tuple[dict, dict, dict]:
    """Timings of :func:`score_batch` on the batch, exhaustive and with ``val_budget``, and
    the scores of both."""
    device, n = model.device, model.shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_exh, scores_exh = timed(lambda: score_batch(model, ref, mask, **kwargs), device, repeats,
                              warmups)
    t_val, scores_val = timed(lambda: score_batch(model, ref, mask, **val_budget, **kwargs),
                              device, repeats, warmups)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    timing = {
        "metric_set_exhaustive_s": t_exh,
        "metric_set_validation_budget_s": t_val,
        "per_structure_exhaustive_ms": t_exh / n * 1e3,
        "per_structure_validation_budget_ms": t_val / n * 1e3,
        "peak_memory_gib": peak,
    }
    return timing, scores_exh, scores_val


def profile_parts(parts: dict, chosen: list[str], device: torch.device, out: Path,
                  parser: argparse.ArgumentParser, warmups: int = 1) -> dict:
    """``--profile``: where the time of each chosen part goes (see :func:`main`)."""
    try:  # run as a script (benchmarks/ on sys.path) or as a module of the benchmarks package
        from bench_model import profile_table, trace_host_syncs
    except ImportError:
        from benchmarks.bench_model import profile_table, trace_host_syncs
    unknown = sorted(set(chosen) - set(parts))
    if unknown:
        parser.error(f"--profile: unknown part(s) {unknown}; choose from {list(parts)}")
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in chosen:
        seconds, _ = timed(parts[name], device, 1, warmups)  # warm-ups compile, if compiled
        n_syncs, sites = trace_host_syncs(parts[name], device)
        table = profile_table(parts[name], device)
        header = f"{name}: {seconds * 1e3:.2f} ms; host syncs: {n_syncs} ({', '.join(sites)})"
        (out / f"profile-{name}.txt").write_text(header + "\n\n" + table)
        logger.info("%s", header)
        result[name] = {"seconds": seconds, "host_syncs": n_syncs, "sync_sites": sites}
    return {"profile": result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="structures in the batch")
    parser.add_argument("--length", type=int, default=500, help="nucleotides per structure")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--noise", type=float, default=2.0, help="model noise sigma, A")
    parser.add_argument("--drift", type=float, default=0.3, help="model drift step, A")
    parser.add_argument("--cpu-structures", type=int, default=4,
                        help="structures timed one by one on the CPU path")
    parser.add_argument("--val-gdt-seeds", type=int, default=512,
                        help="GDT max_seeds of the validation budget")
    parser.add_argument("--val-tm-seeds", type=int, default=None,
                        help="TM-score max_seeds of the validation budget (default exhaustive)")
    parser.add_argument("--skip-budgets", action="store_true",
                        help="skip part 4 (GDT/TM accuracy vs search budget)")
    parser.add_argument("--parts-only", nargs="*", default=None, metavar="PART",
                        help="time only these metrics' device time for the batch (all parts if "
                             "none named): quick, for comparing two trees interleaved")
    parser.add_argument("--profile", nargs="+", default=None, metavar="PART",
                        help="profile one call of each PART (after a warm-up call): operator "
                             "tables and the host syncs with their call sites, written to "
                             "OUT/profile-PART.txt; nothing else is run")
    parser.add_argument("--compiled", action="store_true",
                        help="also time the metric set and its parts with compiled=True (fused "
                             "kernels from torch.compile), with the compile time and agreement")
    parser.add_argument("--compiled-bookkeeping", action="store_true",
                        help="compiled searches also compile their per-refit bookkeeping "
                             "(pipeline.metrics._search.COMPILED_BOOKKEEPING)")
    parser.add_argument("--graphed-refits", action="store_true",
                        help="compiled quaternion searches run their refits as CUDA graphs "
                             "(pipeline.metrics._search.GRAPHED_REFITS); three warm-up calls "
                             "per part (a graph is recorded at the second call of a shape)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    for name in ("n", "length", "repeats", "cpu_structures"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least 1, got {getattr(args, name)}")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.metrics import _search

    _search.COMPILED_BOOKKEEPING = args.compiled_bookkeeping
    _search.GRAPHED_REFITS = args.graphed_refits
    warmups = 3 if args.graphed_refits else 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ref = make_structures(
        args.n, args.length, seed=args.seed, noise=args.noise, drift=args.drift
    )
    mask = torch.ones(args.n, args.length, dtype=torch.bool)
    md, rd, kd = model.to(device), ref.to(device), mask.to(device)
    result: dict = {
        "config": vars(args) | {"out": str(args.out)},
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "package": str(Path(lddt.__code__.co_filename).parent),  # which tree was timed
        },
    }
    n = args.n

    parts = {
        "rmsd": lambda: rmsd(md, rd, kd),
        # the RMSD the long way: fit (Kabsch, SVD), move, measure
        "rmsd_fit_and_measure": lambda: rmsd(superimpose(md, rd, kd), rd, kd, superpose=False),
        "lddt": lambda: lddt(md, rd, kd)[0],
        # lDDT's distances: direct-mode cdist (the CPU's path) and broadcast differences
        # (the CUDA path), to show which costs what on this device
        "distances_cdist": lambda: torch.cdist(md, rd, compute_mode="donot_use_mm_for_euclid_dist"),
        "distances_broadcast": lambda: _broadcast_distances(md, rd),
        "gdt_ts": lambda: gdt(md, rd, kd).score,
        "tm_score": lambda: tm_score(md, rd, kd),
        "lddt_plus_rmsd": lambda: (lddt(md, rd, kd)[0], rmsd(md, rd, kd)),
    }
    val_budget = {"gdt_max_seeds": args.val_gdt_seeds, "tm_max_seeds": args.val_tm_seeds}
    parts |= {
        "gdt_ts_budget": lambda: gdt(md, rd, kd, max_seeds=args.val_gdt_seeds).score,
        "metric_set_budget": lambda: score_batch(md, rd, kd, **val_budget),
    }
    if args.compiled:  # the first (untimed) call of each compiles
        parts |= {
            "gdt_ts_budget_compiled": lambda: gdt(
                md, rd, kd, max_seeds=args.val_gdt_seeds, compiled=True
            ).score,
            "metric_set_budget_compiled": lambda: score_batch(
                md, rd, kd, **val_budget, compiled=True
            ),
            "rmsd_compiled": lambda: rmsd(md, rd, kd, compiled=True),
            "lddt_compiled": lambda: lddt(md, rd, kd, compiled=True)[0],
            "gdt_ts_compiled": lambda: gdt(md, rd, kd, compiled=True).score,
            "tm_score_compiled": lambda: tm_score(md, rd, kd, compiled=True),
            "lddt_plus_rmsd_compiled": lambda: (
                lddt(md, rd, kd, compiled=True)[0], rmsd(md, rd, kd, compiled=True)
            ),
        }
    if args.profile is not None:
        return profile_parts(parts, args.profile, device, args.out, parser, warmups)
    if args.parts_only is not None:
        chosen = args.parts_only or list(parts)
        unknown = sorted(set(chosen) - set(parts))
        if unknown:
            parser.error(f"--parts-only: unknown part(s) {unknown}; choose from {list(parts)}")
        # One call with no warm-up: the first call of a compiled part compiles.
        first_calls = {k: timed(parts[k], device, 1, warmups=0)[0] for k in chosen}
        timings = {k: timed(parts[k], device, args.repeats, warmups) for k in chosen}
        result["device"] = {
            "parts_s": {k: v[0] for k, v in timings.items()},
            "first_call_s": first_calls,
            # Sums of each part's last results: equal across variants that must agree.
            "parts_checksum": {k: checksum(v[1]) for k, v in timings.items()},
            "dynamo_counters": {k: dict(v) for k, v in dynamo_counters().items() if v},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_metrics.json").write_text(json.dumps(result, indent=2))
        logger.info("parts (ms): %s", {k: round(v * 1e3, 3)
                                       for k, v in result["device"]["parts_s"].items()})
        return result

    # 1. The whole validation metric set on the device, eager and (optionally) compiled.
    timing, scores_exh, scores_val = time_metric_set(md, rd, kd, val_budget, args.repeats)
    compiled = None
    if args.compiled:
        t0 = time.perf_counter()
        first = score_batch(md, rd, kd, compiled=True)
        first_call_s = time.perf_counter() - t0  # compilation of every fused kernel included
        compiled, scores_c, _ = time_metric_set(md, rd, kd, val_budget, args.repeats,
                                                warmups, compiled=True)
        compiled |= {
            "first_call_s": first_call_s,
            "max_abs_diff_vs_eager": {
                k: float((scores_c[k].double() - scores_exh[k].double()).abs().max())
                for k in scores_exh
            },
            "first_call_equal": all(bool(torch.equal(first[k], scores_c[k])) for k in first),
        }
        logger.info("compiled: first call %.1f s, metric set %.3f s (exhaustive), %.3f s "
                    "(validation budget)", first_call_s, compiled["metric_set_exhaustive_s"],
                    compiled["metric_set_validation_budget_s"])
    part_times = {k: timed(f, device, args.repeats, warmups)[0] for k, f in parts.items()}
    result["device"] = timing | {
        "validation_budget": val_budget,
        "parts_s": part_times,
        "mean_scores": {k: float(v.mean()) for k, v in scores_exh.items()},
        "mean_scores_validation_budget": {k: float(v.mean()) for k, v in scores_val.items()},
        "compiled": compiled,
    }
    logger.info("device %s: metric set %.3f s (exhaustive), %.3f s (validation budget)",
                device, timing["metric_set_exhaustive_s"], timing["metric_set_validation_budget_s"])

    # 2. biotite per structure (CPU).
    bio = biotite_per_structure(model.numpy(), ref.numpy())
    ours_lddt = scores_exh["lddt"].cpu().double().numpy()
    ours_rmsd = scores_exh["rmsd"].cpu().double().numpy()
    result["biotite"] = None if bio is None else {
        "lddt_ms_per_structure": bio["lddt_s"] * 1e3,
        "rmsd_ms_per_structure": bio["rmsd_s"] * 1e3,
        "max_abs_diff_lddt": float(np.max(np.abs(ours_lddt - [v[0] for v in bio["values"]]))),
        "max_abs_diff_rmsd": float(np.max(np.abs(ours_rmsd - [v[1] for v in bio["values"]]))),
    }

    # 3. This package's CPU path, one structure at a time.
    k = min(args.cpu_structures, n)
    cpu = torch.device("cpu")
    cpu_full, cpu_val, cpu_lr = [], [], []
    for i in range(k):
        x, y, m = model[i : i + 1], ref[i : i + 1], mask[i : i + 1]
        cpu_full.append(timed(lambda: score_batch(x, y, m), cpu, 1)[0])
        cpu_val.append(timed(lambda: score_batch(x, y, m, **val_budget), cpu, 1)[0])
        cpu_lr.append(timed(lambda: (lddt(x, y, m), rmsd(x, y, m)), cpu, 3)[0])
    result["cpu_path"] = {
        "structures_timed": k,
        "metric_set_exhaustive_ms_per_structure": statistics.median(cpu_full) * 1e3,
        "metric_set_validation_budget_ms_per_structure": statistics.median(cpu_val) * 1e3,
        "lddt_plus_rmsd_ms_per_structure": statistics.median(cpu_lr) * 1e3,
    }

    # 4. Accuracy vs search budget (device), against the most exhaustive search.
    budgets = []
    searches = (
        ("gdt_ts", GDT_BUDGETS, lambda kw: gdt(md, rd, kd, **kw).score),
        ("tm_score", TM_BUDGETS, lambda kw: tm_score(md, rd, kd, **kw)),
    )
    for metric, table, score in () if args.skip_budgets else searches:
        reference = None  # the first (most exhaustive) budget of the table
        for name, kwargs in table:
            t, res = timed(lambda kw=kwargs: score(kw), device, args.repeats)
            res = res.cpu().double()
            if reference is None:
                reference = res
            diff = reference - res
            budgets.append({
                "metric": metric, "budget": name, "kwargs": kwargs, "seconds": t,
                "mean_loss": float(diff.mean()), "max_loss": float(diff.max()),
                "mean_score": float(res.mean()),
            })
    result["budgets"] = budgets

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_metrics.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench_metrics.md").write_text(to_markdown(result))
    logger.info("wrote %s", args.out / "bench_metrics.md")
    return result


def to_markdown(r: dict) -> str:
    c, env, dev, bio, cpu = r["config"], r["environment"], r["device"], r["biotite"], r["cpu_path"]
    lines = [
        f"# Metric benchmark: {c['n']} structures x {c['length']} nt",
        "",
        f"Device: {env['device']}; torch {env['torch']}; Python {env['python']}; "
        f"CPU threads {env['cpu_threads']}. Median of {c['repeats']} runs.",
        "",
        "## Time per structure",
        "",
        "| path | metrics | ms / structure |",
        "|---|---|---|",
        f"| device, batch of {c['n']} | rmsd + lddt + gdt_ts + tm_score + chirality, exhaustive "
        f"| {dev['per_structure_exhaustive_ms']:.3f} |",
        f"| device, batch of {c['n']} | same, validation budget {dev['validation_budget']} "
        f"| {dev['per_structure_validation_budget_ms']:.3f} |",
        f"| this package, CPU, one structure | full set, exhaustive "
        f"| {cpu['metric_set_exhaustive_ms_per_structure']:.1f} |",
        f"| this package, CPU, one structure | full set, validation budget "
        f"| {cpu['metric_set_validation_budget_ms_per_structure']:.1f} |",
        f"| this package, CPU, one structure | lddt + rmsd "
        f"| {cpu['lddt_plus_rmsd_ms_per_structure']:.2f} |",
    ]
    if bio is not None:
        lines += [
            f"| biotite, CPU, one structure | lddt | {bio['lddt_ms_per_structure']:.2f} |",
            f"| biotite, CPU, one structure | superimpose + rmsd "
            f"| {bio['rmsd_ms_per_structure']:.2f} |",
        ]
    lines += [
        "",
        "Device time of each metric for the batch (ms): "
        + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in dev["parts_s"].items()) + ".",
        "",
    ]
    if dev["peak_memory_gib"] is not None:
        lines += [f"Peak GPU memory of the metric set: {dev['peak_memory_gib']:.2f} GiB.", ""]
    comp = dev.get("compiled")
    if comp:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in comp["max_abs_diff_vs_eager"].items())
        lines += [
            f"Compiled (`compiled=True`): first call {comp['first_call_s']:.1f} s (compilation "
            f"included); then {comp['per_structure_exhaustive_ms']:.3f} ms per structure "
            f"exhaustive, {comp['per_structure_validation_budget_ms']:.3f} ms with the "
            f"validation budget. Max |compiled - eager|: {diffs}.",
            "",
        ]
    if bio is None:
        lines += ["biotite not installed here: no biotite timings or cross-check.", ""]
    else:
        lines += [
            f"Agreement with biotite: max |d lDDT| {bio['max_abs_diff_lddt']:.2e}, "
            f"max |d RMSD| {bio['max_abs_diff_rmsd']:.2e} A.",
            "",
        ]
    lines += [
        "## Accuracy vs search budget (loss = exhaustive - budget, >= 0)",
        "",
        "| metric | budget | device s (batch) | mean score | mean loss | max loss |",
        "|---|---|---|---|---|---|",
    ]
    for b in r["budgets"]:
        lines.append(
            f"| {b['metric']} | {b['budget']} {b['kwargs'] or ''} | {b['seconds']:.4f} "
            f"| {b['mean_score']:.4f} | {b['mean_loss']:.5f} | {b['max_loss']:.5f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
