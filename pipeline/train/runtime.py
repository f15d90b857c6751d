"""What a training run needs around the loop: device, precision, seeds, DDP, components,
run directory, tracker, and the reports written at the end.

Kept apart from :mod:`pipeline.train.trainer` so that the loop reads as its phases.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline.config.loader import flatten, model_hash, redact, to_dict, to_yaml
from pipeline.config.schema import Config
from pipeline.data import build_datasets, build_train_loader, build_val_batches
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import build_model
from pipeline.tracking import Tracker, build_tracker
from pipeline.train.checkpoint import (
    checksum_path,
    find_latest,
    read_checksum,
    read_entry,
    verify_checkpoint,
    write_checksum,
)
from pipeline.train.optim import build_optimizer
from pipeline.train.schedule import build_scheduler, warmup_steps

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def setup(cfg: Config) -> Runtime:
    """Resolve device and precision, join the DDP group (under torchrun), seed every RNG."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.trainer.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' requested but no CUDA device is available")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"
    if precision == "fp16" and not use_cuda:
        raise ConfigError("trainer.precision: 'fp16' needs a CUDA device; use fp32 or bf16")
    distributed = world_size > 1
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend=backend)
    seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return Runtime(device, precision, rank, local_rank, world_size, distributed)


def teardown(ctx: Runtime) -> None:
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Components:
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train_loader: Any
    val_batches: list[dict]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    data_stats: dict


def data_cache_dir(cfg: Config) -> Path:
    """Where a run keeps its data cache: ``data.cache_dir``, else ``output_dir/cache``."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "cache"


def build_components(cfg: Config, ctx: Runtime) -> Components:
    data = build_datasets(
        cfg.data, seed=cfg.seed, cache_dir=data_cache_dir(cfg), cache=cfg.loader.cache
    )
    loader = build_train_loader(
        data.train,
        cfg.loader,
        batch_size=cfg.trainer.micro_batch_size,
        seed=cfg.seed,
        device=ctx.device,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    val_batches = make_val_batches(data.val, cfg.trainer.micro_batch_size, cfg.trainer.val_max_structures)
    model = build_model(cfg.model).to(ctx.device)
    ddp_model = model
    if ctx.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.trainer.accumulation_steps))
    total_steps = cfg.trainer.epochs * steps_per_epoch
    if cfg.trainer.max_steps is not None:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    scheduler = build_scheduler(
        cfg.scheduler,
        optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        mode=cfg.trainer.early_stopping.mode,
    )
    scaler = torch.amp.GradScaler("cuda") if ctx.precision == "fp16" else None
    return Components(
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_loader=loader,
        val_batches=val_batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps(cfg.scheduler, steps_per_epoch),
        data_stats=data.stats,
    )


def make_val_batches(dataset, batch_size: int, limit: int) -> list[dict]:
    """Validation batches in a fixed order (CPU tensors) of the first ``limit`` structures."""
    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), limit)))
    return build_val_batches(subset, batch_size)


# ---------------------------------------------------------------------------- DDP helpers
def all_reduce_mean(tensor: torch.Tensor, ctx: Runtime) -> torch.Tensor:
    if ctx.distributed:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        tensor /= ctx.world_size
    return tensor


def broadcast_object(value: Any, ctx: Runtime) -> Any:
    """Rank 0's ``value`` on every rank (stop decisions, the run directory)."""
    if not ctx.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def no_sync(model: torch.nn.Module):
    """Skip the DDP gradient all-reduce on micro-batches before the last of a window."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def rescale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, ratio: float) -> None:
    """Scale a restored schedule by ``ratio`` (a changed ``optim.lr`` on resume).

    torch's schedulers restore their own base LRs from the checkpoint, so a new peak LR would
    otherwise be ignored silently. Scaling the current, initial and base LRs and the cosine and
    plateau floors keeps the schedule's position (no second warmup, the plateau's reductions and
    its count of validations without improvement) and the optimizer's moments.
    """
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    for sched in [scheduler, *getattr(scheduler, "_schedulers", [])]:
        if hasattr(sched, "base_lrs"):  # SequentialLR itself has none, its children do
            sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [lr * ratio for lr in sched._last_lr]
        if hasattr(sched, "eta_min"):
            sched.eta_min *= ratio
        if hasattr(sched, "min_lrs"):  # ReduceLROnPlateau
            sched.min_lrs = [lr * ratio for lr in sched.min_lrs]
            if getattr(sched, "default_min_lr", None) is not None:
                sched.default_min_lr *= ratio


def free_memory(device: torch.device) -> None:
    """Called only after an OOM: drop references and return cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- run and tracking
def check_output_dir(cfg: Config) -> None:
    """Fail before any work (and before an MLflow run exists) when ``output_dir`` cannot be
    created or written (a probe file is created and removed), or has too little free space for
    the checkpoints the run keeps: ``trainer.keep_last`` of them, ``best.pt`` and one being
    written (:func:`checkpoint_bytes`)."""
    root = Path(cfg.output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"output_dir: cannot write to {root} ({reason})") from None
    each = checkpoint_bytes(cfg)
    need = (cfg.trainer.keep_last + 2) * each
    free = shutil.disk_usage(root).free
    if free < need:
        raise ConfigError(
            f"output_dir: {free / 1e6:.1f} MB free at {root}; the run's checkpoints need about "
            f"{need / 1e6:.1f} MB ({cfg.trainer.keep_last} kept + best.pt + one being written, "
            f"{each / 1e6:.1f} MB each)"
        )


def checkpoint_bytes(cfg: Config) -> int:
    """About the size of one checkpoint: fp32 weights plus the optimizer's per-weight state
    (AdamW two moments, Lion and SGD one), counted on a model built on the meta device."""
    from pipeline.model.diffold import Diffold, count_parameters

    with torch.device("meta"):  # no memory, no initialisation, no RNG draws
        n_params = count_parameters(Diffold(cfg.model))
    states = {"adamw": 2, "lion": 1, "sgd": 1}[cfg.optim.name]
    return 4 * n_params * (1 + states)


def new_run_dir(cfg: Config, ctx: Runtime) -> Path:
    """A fresh ``<output_dir>/runs/<time>-<id>``, named by rank 0 for every rank."""
    path = None
    if ctx.rank == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output_dir) / "runs" / f"{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=True)
    return Path(broadcast_object(str(path) if path else None, ctx))


def run_checkpoint(cfg: Config, run_id: str) -> Path:
    """The checkpoint to continue MLflow run ``run_id`` from.

    The newest valid checkpoint of that run under ``output_dir``; else (another machine) the
    run's ``checkpoints/last.pt`` artifact, downloaded, checked against its checksum and put
    where a local one would be: ``<output_dir>/runs/<the run directory's name>/checkpoints/
    step-N.pt``, with the run's ``best.pt`` beside it.
    """
    from pipeline.tracking.mlflow_tracker import download_checkpoint

    root = Path(cfg.output_dir)
    local = find_latest(root, run_id=run_id)
    if local is not None:
        return local
    log.info("run %s: no checkpoint of it under %s; downloading its last checkpoint", run_id, root)
    root.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        folder = download_checkpoint(run_id, download)
        problem = verify_checkpoint(folder / "last.pt")
        if problem is not None:
            raise CheckpointError(f"--run-id {run_id}: checkpoints/last.pt: {problem}")
        step, run_dir = (read_entry(folder / "last.pt", k) for k in ("step", "run_dir"))
        checkpoints = root / "runs" / Path(run_dir).name / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        target = checkpoints / f"step-{step:08d}.pt"
        _install_checkpoint(folder / "last.pt", target)
        best = folder / "best.pt"
        if best.is_file():
            problem = verify_checkpoint(best)
            if problem is None:
                _install_checkpoint(best, checkpoints / "best.pt")
            else:
                log.warning("run %s: checkpoints/best.pt not used: %s", run_id, problem)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return target


def _install_checkpoint(source: Path, target: Path) -> None:
    """Move a verified checkpoint to ``target``, then its checksum file (naming ``target``)."""
    digest = read_checksum(source)
    os.replace(source, target)
    write_checksum(target, digest)
    checksum_path(source).unlink()


def run_name(cfg: Config) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{cfg.scenario or 'custom'}-{cfg.preset or 'default'}-{model_hash(cfg)[:6]}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_run_tracker(
    cfg: Config,
    ctx: Runtime,
    *,
    run_id: str | None,
    parent_run_id: str | None,
    extra_tags: dict[str, Any],
    run_dir: Path | None = None,
) -> Tracker:
    tags = {
        "scenario": cfg.scenario or "custom",
        "preset": cfg.preset,
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "precision": ctx.precision,
        "world_size": ctx.world_size,
        "model_hash": model_hash(cfg),
        **extra_tags,
    }
    return build_tracker(
        cfg.tracking,
        run_name=run_name(cfg),
        run_id=run_id,
        parent_run_id=parent_run_id,
        tags=tags,
        enabled=ctx.rank == 0,
        spool_dir=run_dir / "tracking" if run_dir is not None else None,
    )


def log_run_inputs(tracker: Tracker, cfg: Config, run_dir: Path, data_stats: dict) -> None:
    """The resolved config (``config.yaml`` in the run directory; in MLflow as params and
    ``config/resolved.yaml`` with secrets redacted: :func:`~pipeline.config.loader.redact`)."""
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    safe = redact(to_dict(cfg))
    tracker.log_params(flatten(safe))
    tracker.log_text(yaml.safe_dump(safe, sort_keys=False), "config/resolved.yaml")
    tracker.log_text(json.dumps(data_stats, indent=2, default=str), "data/stats.json")
    skipped = data_stats.get("skipped_files")
    if isinstance(skipped, (int, float)):
        tracker.log_metrics({"data/skipped_files": float(skipped)}, step=0)


def write_health_report(tracker: Tracker, run_dir: Path, report: dict, markdown: str) -> None:
    folder = run_dir / "health"
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=float)
    (folder / "report.json").write_text(text)
    (folder / "report.md").write_text(markdown)
    tracker.log_text(text, "health/report.json")
    tracker.log_text(markdown, "health/report.md")


def log_training_plot(tracker: Tracker, history: dict) -> None:
    """The training-curve plot (checkpoints are uploaded as they are written)."""
    figure = plot_history(history)
    if figure is not None:
        tracker.log_figure(figure, "plots/training.png")
        import matplotlib.pyplot as plt

        plt.close(figure)


def plot_history(history: dict[str, list[tuple[int, float]]]):
    keys = [k for k in ("train/loss", "train/grad_norm", "train/lr", "val/lddt") if history.get(k)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        if key in ("train/loss", "train/grad_norm") and min(values) > 0:
            ax.set_yscale("log")
    figure.tight_layout()
    return figure

