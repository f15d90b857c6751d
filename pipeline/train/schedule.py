"""Learning-rate schedules on optimizer steps, built from torch's own schedulers.

Warmup is given in epochs (or steps) and converted once to optimizer steps, so gradient
accumulation is accounted for. The warmup happens once at the start of training; restarts of
``cosine_restarts`` do not warm up again. ``plateau`` lowers the LR only when the validation
metric of ``trainer.early_stopping`` stops improving (torch's ``ReduceLROnPlateau``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler as sched

from pipeline.config.fields import spec

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "cosine_restarts", "constant", "plateau"] = spec(
        "cosine",
        help="LR curve after warmup; plateau: lowered when trainer.early_stopping.metric stalls",
    )
    warmup_epochs: float = spec(1.0, ge=0, help="linear warmup length in epochs")
    warmup_steps: int | None = spec(
        None, ge=0, help="warmup length in optimizer steps (overrides warmup_epochs)"
    )
    warmup_start_factor: float = spec(0.01, gt=0, le=1, help="LR at step 0 as a fraction of lr")
    min_lr_ratio: float = spec(
        0.01, ge=0, le=1, help="floor of the cosine (and of plateau reductions) as a fraction of lr"
    )
    restart_epochs: float = spec(
        5.0, gt=0, help="cosine_restarts: length of the first cycle in epochs (T_0)"
    )
    restart_mult: int = spec(1, ge=1, help="cosine_restarts: cycle length multiplier (T_mult)")
    plateau_factor: float = spec(
        0.5, gt=0, lt=1, help="plateau: the LR is multiplied by this at each reduction"
    )
    plateau_patience: int = spec(
        2, ge=0, help="plateau: validations without improvement tolerated; the next one reduces"
    )
    plateau_threshold: float = spec(
        1e-3, ge=0, help="plateau: smallest relative improvement of the metric that counts"
    )


def warmup_steps(cfg: SchedulerConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


class WarmupPlateau:
    """Linear warmup on optimizer steps, then torch's ``ReduceLROnPlateau`` on a validation metric.

    ``step()`` is called once per optimizer step and only moves the warmup; ``observe(value)``
    once per validation and only moves the plateau schedule. Values seen during warmup are not
    observed: the LR is still rising, so a lack of improvement says nothing about it. A pair
    rather than ``SequentialLR``, which refuses ``ReduceLROnPlateau`` (its ``step`` needs the
    metric).
    """

    def __init__(self, warmup: sched.LinearLR | None, plateau: sched.ReduceLROnPlateau):
        self.optimizer = plateau.optimizer
        self.warmup = warmup
        self.plateau = plateau
        # Named as SequentialLR's children, so that code walking a schedule's parts (the LR
        # rescaling on resume) treats both alike.
        self._schedulers = [s for s in (warmup, plateau) if s is not None]

    @property
    def in_warmup(self) -> bool:
        return self.warmup is not None and self.warmup.last_epoch < self.warmup.total_iters

    def step(self) -> None:
        if self.in_warmup:
            self.warmup.step()

    def observe(self, value: float) -> None:
        """Feed one validation value of the watched metric."""
        if self.in_warmup:
            log.debug("plateau schedule: %g seen during warmup, not counted", value)
            return
        before = self.get_last_lr()
        self.plateau.step(value)
        if self.get_last_lr() != before:
            log.info("plateau schedule: no improvement in %d validation(s); LR %.3g -> %.3g",
                     self.plateau.patience + 1, before[0], self.get_last_lr()[0])

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    mode: Literal["min", "max"] = "max",
) -> sched.LRScheduler | WarmupPlateau:
    """A scheduler to ``step()`` once per optimizer step; ``mode`` is the plateau metric's
    direction (``trainer.early_stopping.mode``), and a :class:`WarmupPlateau` is also fed
    each validation value with ``observe``."""
    n_warm = min(warmup_steps(cfg, steps_per_epoch), max(total_steps - 1, 0))
    base_lr = optimizer.param_groups[0]["lr"]
    eta_min = base_lr * cfg.min_lr_ratio
    if cfg.name == "plateau":
        plateau = sched.ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold,
            threshold_mode="rel",
            min_lr=eta_min,
        )
        warm = None
        if n_warm > 0:
            warm = sched.LinearLR(
                optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=n_warm
            )
        return WarmupPlateau(warm, plateau)
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
