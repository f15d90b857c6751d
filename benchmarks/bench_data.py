"""Data loading on the GPU: does the trainer wait for data when featurisation is costly?

Costly featurisation, for real: a directory of mmCIF files (synthetic structures written with
the pipeline's own writer, so no data has to travel) read with ``data.source=files`` and
``loader.cache=none``, so every access parses its file with gemmi. Variants, interleaved
``--repeats`` times, each training ``small_model`` for ``--steps`` steps:

- ``plain``: a plain DataLoader in the training process (``num_workers=0``), no pinned memory,
  no device prefetch: the baseline the issue names.
- ``prefetch-f{1,2,4,8}``: ``--workers`` worker processes, pinned memory, device prefetch on a
  side stream, ``loader.prefetch_factor`` 1, 2, 4, 8.
- ``prefetch-f{1,2}-no-epoch-ckpt``: the same without epoch-end checkpoints, whose background
  write competes for the GIL with the next epoch's first fetch.
- ``prefetch-f{1,2}-thread-ckpt``: the same with checkpoints serialised by a thread of the
  trainer (``trainer.checkpoint_writer=thread``) instead of the writer process.
- ``memory-cache``: ``num_workers=0`` with ``loader.cache=memory``: no parsing after the scan.

Per variant: median step time, median data wait, data-wait share of the step time, samples/s
(steps after ``--warmup``). The cache part times the dataset build (the scan that parses
every file) with a cold and a warm on-disk cache (``loader.cache=disk``).

    python benchmarks/bench_data.py --out OUT [--n-files 384] [--steps 120] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _prefetch(factor: int) -> list[str]:
    return ["loader.num_workers={workers}", "loader.pin_memory=true",
            "loader.device_prefetch=true", f"loader.prefetch_factor={factor}", "loader.cache=none"]


VARIANTS = {
    "plain": ["loader.num_workers=0", "loader.pin_memory=false", "loader.device_prefetch=false",
              "loader.cache=none"],
    **{f"prefetch-f{f}": _prefetch(f) for f in (1, 2, 4, 8)},
    # the same without epoch-end checkpoints: their background write serialises the state on
    # the GIL while the next epoch's first batch is fetched
    **{f"prefetch-f{f}-no-epoch-ckpt": [*_prefetch(f), "trainer.checkpoint_every_epochs=0"]
       for f in (1, 2)},
    # checkpoints serialised by a thread of the trainer (before the writer process, which
    # `auto` now picks on CUDA)
    **{f"prefetch-f{f}-thread-ckpt": [*_prefetch(f), "trainer.checkpoint_writer=thread"]
       for f in (1, 2)},
    "memory-cache": ["loader.num_workers=0", "loader.pin_memory=true",
                     "loader.device_prefetch=true", "loader.cache=memory"],
}


def _write_one(directory: Path, seed: int, index: int, max_length: int) -> None:
    from pipeline.data.synthetic import synthetic_structure
    from pipeline.io.structures import write_structure

    sample = synthetic_structure(seed, index, split="train", min_length=48,
                                 max_length=max_length).sample
    write_structure(directory / f"{sample.name}.cif", sample.sequence, sample.coords,
                    atom_mask=sample.atom_mask)


def make_files(directory: Path, n: int, seed: int, max_length: int) -> float:
    """Write ``n`` synthetic structures as mmCIF files (the structures of
    ``generate_synthetic(n, seed=seed)``, generated in parallel, one process per core);
    returns the mean parse time (ms)."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.io.structures import read_structure

    directory.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_one, [directory] * n, [seed] * n, range(n), [max_length] * n))
    files = sorted(directory.glob("*.cif"))[:32]
    start = time.perf_counter()
    for path in files:
        read_structure(path)
    return 1000 * (time.perf_counter() - start) / len(files)


def run_variant(name: str, data_dir: Path, args) -> dict:
    from pipeline.config.loader import load_config

    work = Path(tempfile.mkdtemp(prefix=f"data-{name}-"))
    sets = [s.format(workers=args.workers) for s in VARIANTS[name]]
    cfg = load_config(scenario="balanced", preset="small_model", overrides=[
        f"output_dir={work}", "tracking.enabled=false", "data.source=files",
        f"data.path={data_dir}", f"data.max_length={args.max_length}",
        f"trainer.max_steps={args.steps}", "trainer.epochs=1000",
        "trainer.eval_every_epochs=1000", "trainer.checkpoint_every_steps=100000",
        "monitor.window=100000", *sets, *args.set,
    ])
    return measure_loading(cfg, warmup=args.warmup)


def measure_loading(cfg, *, warmup: int) -> dict:
    """Train ``cfg`` and report, over the steps after ``warmup``: median step time, median
    data wait, data-wait share of all step time, samples/s; and the trainer's build time."""
    import torch

    from pipeline.train import runtime
    from pipeline.train.trainer import Trainer

    built = time.perf_counter()
    ctx = runtime.setup(cfg)
    trainer = Trainer(cfg, ctx, checkpoint=None, run_id=None, parent_run_id=None,
                      on_validation=None, extra_tags={})
    build_s = time.perf_counter() - built
    waits: list[float] = []
    where: list[tuple[int, int]] = []  # (epoch, batches of the epoch consumed) at each step
    original = trainer.timer.observe

    def observe(step, *, step_s, data_wait_s):
        waits.append(data_wait_s)
        where.append((trainer.epoch, trainer.batch_in_epoch))
        return original(step, step_s=step_s, data_wait_s=data_wait_s)

    trainer.timer.observe = observe
    trainer.fit()
    runtime.teardown(ctx)
    steps = list(trainer.timer.step_times)[warmup:]
    wait = waits[warmup:]
    batch = cfg.trainer.micro_batch_size * cfg.trainer.accumulation_steps
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "build_s": build_s,
        "median_step_ms": 1000 * statistics.median(steps),
        "median_data_wait_ms": 1000 * statistics.median(wait),
        "data_wait_share": sum(wait) / sum(steps),
        # epoch starts show up here: the longest waits and how many steps waited > 10 ms
        "max_data_wait_ms": 1000 * max(wait),
        "steps_waiting_over_10ms": sum(w > 0.01 for w in wait),
        # where the long waits happen: an epoch's first batches, or anywhere
        "waits_over_10ms": [
            {"step": i + warmup + 1, "epoch": e, "batch_in_epoch": b, "ms": round(1000 * w, 1)}
            for i, (w, (e, b)) in enumerate(zip(wait, where[warmup:])) if w > 0.01
        ],
        "wait_share_outside_first_2_batches": (
            sum(w for w, (_, b) in zip(wait, where[warmup:]) if b > 2) / sum(steps)
        ),
        "steps": len(steps),
        "samples_per_s": batch / statistics.median(steps),
    }


def cache_build(data_dir: Path, args) -> dict:
    """Dataset build (scan) time with a cold, then a warm on-disk feature cache."""
    from pipeline.data import build_datasets
    from pipeline.data.config import DataConfig

    cache = Path(tempfile.mkdtemp(prefix="data-cache-"))
    cfg = DataConfig(source="files", path=str(data_dir), max_length=args.max_length)
    times = {}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        build_datasets(cfg, seed=0, cache_dir=cache, cache="disk")
        times[f"disk_{label}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    build_datasets(cfg, seed=0, cache_dir=None, cache="none")
    times["no_cache_s"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-files", type=int, default=384)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", default=None,
                        help="write the mmCIF files here, or reuse them if it has them "
                             "(default: a new temporary directory)")
    parser.add_argument("--skip-cache-build", action="store_true",
                        help="skip timing the dataset build with a cold and a warm disk cache")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="data-files-"))
    if len(list(data_dir.glob("*.cif"))) != args.n_files:
        parse_ms = make_files(data_dir, args.n_files, seed=0, max_length=args.max_length)
        print(f"{args.n_files} mmCIF files; parse {parse_ms:.1f} ms per file", flush=True)
    else:
        parse_ms = None
    results: dict = {"parse_ms_per_file": parse_ms, "args": vars(args), "variants": {}}
    if not args.skip_cache_build:
        results["cache_build"] = cache_build(data_dir, args)
        print("cache build", results["cache_build"], flush=True)
    for repeat in range(args.repeats):
        for name in args.variants:
            row = run_variant(name, data_dir, args)
            row["repeat"] = repeat
            results["variants"].setdefault(name, []).append(row)
            print(name, row, flush=True)
            (out / "data.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | median step (ms) | median data wait (ms) | data wait share | samples/s |")
    print("|---|---|---|---|---|")
    for name, rows in results["variants"].items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
               if isinstance(rows[0][k], (int, float)) and k != "repeat"}
        print(f"| {name} | {med['median_step_ms']:.1f} | {med['median_data_wait_ms']:.2f} | "
              f"{100 * med['data_wait_share']:.1f}% | {med['samples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
