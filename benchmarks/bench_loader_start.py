"""Loader start per run: how long a run waits for its first batch from forkserver workers,
with the fork server preloading torch and the dataset's modules (the default) and without.

The fork server lives as long as the process that started it, so each variant runs in a fresh
process, which builds ``--runs`` training loaders in turn (as the trials of a study do) and
times each one's first batch. The variants alternate for ``--repeats`` rounds. Loader and data
settings are the ``--scenario``'s (``balanced``: two workers) on a small synthetic set.

    python benchmarks/bench_loader_start.py --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(preload: bool, runs: int, scenario: str) -> list[float]:
    """Seconds to the first batch of each of ``runs`` loaders built one after another."""
    import torch

    import pipeline.data.loader as loader_module
    from pipeline.config.loader import load_config
    from pipeline.data.datasets import build_datasets
    from pipeline.data.loader import build_train_loader

    if not preload:
        loader_module.preload_in_forkserver = lambda dataset: []
    cfg = load_config(scenario=scenario, overrides=["data.n_train=64", "data.n_val=8"])
    train = build_datasets(cfg.data, seed=0).train
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        loader = build_train_loader(train, cfg.loader, batch_size=4, seed=0,
                                    device=torch.device("cpu"))
        next(iter(loader))
        seconds.append(time.perf_counter() - start)
        loader.close()
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="loaders per process")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both variants")
    parser.add_argument("--scenario", default="balanced")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--child", choices=["preload", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "preload", args.runs, args.scenario)))
        return {}
    if args.out is None:
        parser.error("--out is required")
    rounds: dict[str, list[list[float]]] = {"preload": [], "plain": []}
    for _ in range(args.repeats):
        for variant in rounds:
            done = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--runs", str(args.runs),
                 "--scenario", args.scenario],
                capture_output=True, text=True, check=True,
            )
            rounds[variant].append(json.loads(done.stdout.splitlines()[-1]))
    summary = {
        variant: {
            "first_run_s_median": statistics.median(r[0] for r in runs),
            "later_runs_s_median": statistics.median(s for r in runs for s in r[1:]),
            "rounds": runs,
        }
        for variant, runs in rounds.items()
    }
    result = {"config": vars(args) | {"out": str(args.out)}, "variants": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_loader_start.json").write_text(json.dumps(result, indent=2))
    for variant, s in summary.items():
        print(f"{variant}: first run {s['first_run_s_median']:.2f} s, later runs "
              f"{s['later_runs_s_median']:.2f} s (medians)")
    return result


if __name__ == "__main__":
    main()
