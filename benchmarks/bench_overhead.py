"""Trainer overhead: the pipeline's Trainer (monitoring + health + MLflow on) vs a bare loop.

Both variants train the same model on the same loader (same config, seed and batches), with
the same precision and optimizer; the bare loop is forward, backward, clip, AdamW step and
nothing else. Variants are interleaved (bare, trainer, bare, trainer, ...) and each reports the
median wall time per optimizer step over its steps after a warm-up, so machine noise hits both.

    python benchmarks/bench_overhead.py --preset small_model --steps 200 --repeats 3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config.loader import load_config
from pipeline.train import runtime
from pipeline.train.trainer import Trainer


def _config(args, output_dir: Path, tracking: bool):
    overrides = [
        f"output_dir={output_dir}",
        f"trainer.max_steps={args.steps}",
        "trainer.epochs=1000",
        f"tracking.enabled={str(tracking).lower()}",
        f"data.n_train={args.n_train}",
        f"data.min_length={args.length}",
        f"data.max_length={args.length}",
        f"data.crop_length={args.length}",
        f"trainer.micro_batch_size={args.batch}",
        "trainer.checkpoint_every_steps=100000",
        *args.set,
    ]
    return load_config(scenario=args.scenario, preset=args.preset, overrides=overrides)


def bare_loop(args, output_dir: Path) -> list[float]:
    cfg = _config(args, output_dir, tracking=False)
    ctx = runtime.setup(cfg)
    parts = runtime.build_components(cfg, ctx)
    model, opt = parts.model, parts.optimizer
    times, step, epoch = [], 0, 0
    last = time.perf_counter()
    while step < args.steps:
        parts.train_loader.set_epoch(epoch)
        epoch += 1
        for batch in parts.train_loader:
            with ctx.autocast():
                loss = model(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # the trainer syncs once per step too (finite check)
            now = time.perf_counter()
            times.append(now - last)
            last = now
            step += 1
            if step >= args.steps:
                break
    return times


def trainer_loop(args, output_dir: Path) -> list[float]:
    cfg = _config(args, output_dir, tracking=True)
    ctx = runtime.setup(cfg)
    trainer = Trainer(cfg, ctx, checkpoint=None, run_id=None, parent_run_id=None,
                      on_validation=None, extra_tags={"benchmark": "overhead"})
    times: list[float] = []
    stamps = [time.perf_counter()]
    after = trainer.after_step

    def timed_after_step():
        after()
        stamps.append(time.perf_counter())

    trainer.after_step = timed_after_step
    trainer.fit()
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small_model")
    parser.add_argument("--scenario", default="balanced")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    results = {"bare": [], "trainer": []}
    for r in range(args.repeats):
        for name, fn in (("bare", bare_loop), ("trainer", trainer_loop)):
            times = fn(args, tmp / f"{name}-{r}")
            median = statistics.median(times[args.warmup :])
            results[name].append(median)
            print(f"repeat {r} {name:8s} median step {1000 * median:.2f} ms", flush=True)
    ratios = [t / b for t, b in zip(results["trainer"], results["bare"])]
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "median_step_ms": {k: [1000 * v for v in vs] for k, vs in results.items()},
        "ratio_trainer_over_bare": ratios,
        "ratio_median": statistics.median(ratios),
    }
    (args.out / "overhead.json").write_text(json.dumps(summary, indent=2))
    print(
        f"trainer/bare step-time ratio: median {summary['ratio_median']:.3f} "
        f"(per repeat: {', '.join(f'{x:.3f}' for x in ratios)})"
    )


if __name__ == "__main__":
    main()
