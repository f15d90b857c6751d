"""Step time of three ways to train the same model on the same batches: a bare PyTorch loop,
this pipeline's Trainer (monitoring, health checks, MLflow on), and PyTorch Lightning 2.x with
the monitoring a Lightning user would add (MLFlowLogger, DeviceStatsMonitor,
LearningRateMonitor).

Every variant builds its model, optimizer, LR schedule and loader with the pipeline's own
factories from one config (same seed, so the same batches in the same order), with the same
precision (bf16 autocast on CUDA) and gradient clipping; the two tracked variants log every
``--log-every`` optimizer steps to MLflow with a sqlite store in a temporary directory.
Variants are interleaved (bare, trainer, lightning, bare, ...) and each reports the median
wall time per optimizer step after ``--warmup`` steps, so machine noise hits all of them.

    python benchmarks/bench_lightning.py --steps 200 --repeats 3 --out bench/lightning.json
    python benchmarks/bench_lightning.py --device cpu --steps 5 --repeats 1 \\
        --out bench/smoke.json                                            # CPU smoke test

Run from the repository root with the package importable (``pip install -e .`` or
``PYTHONPATH=.``); the Lightning variant needs ``lightning`` (2.x) installed, the others do
not (``--variants bare,trainer``). Per-step times are host wall time between the ends of
consecutive steps: the bare loop and the Trainer read the loss every step (a sync), Lightning
only when it logs, so on a GPU its steps are timed as the host's launch queue allows; compare
the medians of long runs (>= 200 steps), where the queue is full and each step waits for one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

# bench_overhead.py (beside this file) holds the shared config, bare loop and Trainer loop.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import _config, bare_loop, trainer_loop  # noqa: E402

from pipeline.train import runtime  # noqa: E402

VARIANTS = ("bare", "trainer", "lightning")
LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
LIGHTNING_EXPERIMENT = "bench-lightning"


class _Epochs:
    """The pipeline's loader as Lightning expects a DataLoader: each iteration is a new epoch
    (Lightning would otherwise set the epoch on the batch sampler behind the loader's back)."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def lightning_loop(args, output_dir: Path) -> list[float]:
    """Seconds per optimizer step under ``lightning.Trainer.fit``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, DeviceStatsMonitor, LearningRateMonitor
    from lightning.pytorch.loggers import MLFlowLogger

    cfg = _config(args, output_dir, tracking=False)
    ctx = runtime.setup(cfg)
    parts = runtime.build_components(cfg, ctx)

    class DiffoldModule(L.LightningModule):
        def __init__(self, model, optimizer, scheduler):
            super().__init__()
            self.model = model
            self.built_optimizer, self.built_scheduler = optimizer, scheduler

        def training_step(self, batch, batch_idx):
            loss = self.model(batch)["loss"]
            self.log("train/loss", loss, on_step=True, batch_size=len(batch["names"]))
            return loss

        def configure_optimizers(self):
            return {
                "optimizer": self.built_optimizer,
                "lr_scheduler": {"scheduler": self.built_scheduler, "interval": "step"},
            }

    class StepClock(Callback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_start(self, trainer, pl_module):
            self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    clock = StepClock()
    trainer = L.Trainer(
        accelerator="gpu" if ctx.device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        precision=LIGHTNING_PRECISION[ctx.precision],
        gradient_clip_val=cfg.trainer.grad_clip,
        gradient_clip_algorithm="norm",
        logger=MLFlowLogger(
            experiment_name=LIGHTNING_EXPERIMENT,
            tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
            run_name=f"lightning-{output_dir.name}",
        ),
        callbacks=[DeviceStatsMonitor(), LearningRateMonitor(logging_interval="step"), clock],
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir),
    )
    optimizer, scheduler = parts.optimizer, parts.scheduler
    if optimizer.defaults.get("fused"):
        # Lightning's mixed-precision plugin refuses to clip gradients for a fused optimizer
        # (it unscales internally): this variant uses the multi-tensor AdamW instead.
        from pipeline.train.schedule import build_scheduler

        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps, foreach=True)
        scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps=parts.total_steps,
                                    steps_per_epoch=parts.steps_per_epoch)
    trainer.fit(DiffoldModule(parts.model, optimizer, scheduler),
                train_dataloaders=_Epochs(parts.train_loader))
    return [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]


LOOPS = {"bare": bare_loop, "trainer": trainer_loop, "lightning": lightning_loop}


def summarise(results: dict[str, list[float]], args) -> dict:
    """Medians (ms) per variant and repeat, and step-time ratios against the bare loop and
    between the two tracked variants (per repeat, and their median)."""
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
        else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "median_step_ms": {k: [1000 * v for v in vs] for k, vs in results.items()},
        "median_of_repeats_ms": {k: 1000 * statistics.median(vs) for k, vs in results.items()},
        "ratios": {},
    }
    try:
        import lightning

        summary["lightning"] = lightning.__version__
    except ImportError:
        summary["lightning"] = None
    pairs = [("trainer", "bare"), ("lightning", "bare"), ("trainer", "lightning")]
    for a, b in pairs:
        if results.get(a) and results.get(b):
            per_repeat = [x / y for x, y in zip(results[a], results[b])]
            summary["ratios"][f"{a}_over_{b}"] = {
                "per_repeat": per_repeat, "median": statistics.median(per_repeat)
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small_model")
    parser.add_argument("--scenario", default="balanced")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30,
                        help="steps left out of the median (at most half of --steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--log-every", type=int, default=10,
                        help="optimizer steps between logged metrics (Trainer and Lightning)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of bare,trainer,lightning")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant")
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(
            f"--variants: expected a subset of {','.join(VARIANTS)}, got {args.variants!r}"
        )
    if "lightning" in variants:
        try:
            import lightning  # noqa: F401
        except ImportError:
            parser.error("--variants lightning needs PyTorch Lightning 2.x (pip install lightning);"
                         " or run --variants bare,trainer")
    if args.warmup >= args.steps:
        args.warmup = args.steps // 2
    # The same config for all: device and logging interval as --set overrides.
    args.set = [*args.set, f"trainer.device={args.device}",
                f"tracking.log_every_steps={args.log_every}"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-lightning-"))
    if "MLFLOW_TRACKING_URI" not in os.environ:
        # A store of its own, artifacts (the Trainer's logged model) beside it, not in ./mlruns.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        experiment = _config(args, tmp / "config", tracking=True).tracking.experiment
        for name in {experiment, LIGHTNING_EXPERIMENT}:
            client.create_experiment(name, artifact_location=(tmp / "artifacts" / name).as_uri())
    results: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for name in variants:
            times = LOOPS[name](args, tmp / f"{name}-{r}")
            median = statistics.median(times[args.warmup :])
            results[name].append(median)
            print(f"repeat {r} {name:9s} median step {1000 * median:.2f} ms "
                  f"({len(times)} steps)", flush=True)
    summary = summarise(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    for key, ratio in summary["ratios"].items():
        print(f"{key}: median {ratio['median']:.3f} "
              f"(per repeat: {', '.join(f'{x:.3f}' for x in ratio['per_repeat'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
