"""Learning-rate schedules on optimizer steps, built from torch's own schedulers.

Warmup is given in epochs (or steps) and converted once to optimizer steps, so gradient
accumulation is accounted for. The warmup happens once at the start of training; restarts of
``cosine_restarts`` do not warm up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim import lr_scheduler as sched

from pipeline.config.fields import spec


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "cosine_restarts", "constant"] = spec(
        "cosine", help="LR curve after warmup"
    )
    warmup_epochs: float = spec(1.0, ge=0, help="linear warmup length in epochs")
    warmup_steps: int | None = spec(
        None, ge=0, help="warmup length in optimizer steps (overrides warmup_epochs)"
    )
    warmup_start_factor: float = spec(0.01, gt=0, le=1, help="LR at step 0 as a fraction of lr")
    min_lr_ratio: float = spec(0.01, ge=0, le=1, help="floor of the cosine as a fraction of lr")
    restart_epochs: float = spec(
        5.0, gt=0, help="cosine_restarts: length of the first cycle in epochs (T_0)"
    )
    restart_mult: int = spec(1, ge=1, help="cosine_restarts: cycle length multiplier (T_mult)")


def warmup_steps(cfg: SchedulerConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
) -> sched.LRScheduler:
    """A scheduler to ``step()`` once per optimizer step."""
    n_warm = min(warmup_steps(cfg, steps_per_epoch), max(total_steps - 1, 0))
    base_lr = optimizer.param_groups[0]["lr"]
    eta_min = base_lr * cfg.min_lr_ratio
    if cfg.name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(total_steps - n_warm, 1), eta_min=eta_min)
    elif cfg.name == "cosine_restarts":
        t0 = max(1, math.ceil(cfg.restart_epochs * steps_per_epoch))
        main = sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=t0, T_mult=cfg.restart_mult, eta_min=eta_min
        )
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if n_warm == 0:
        return main
    warm = sched.LinearLR(
        optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=n_warm
    )
    return sched.SequentialLR(optimizer, schedulers=[warm, main], milestones=[n_warm])
