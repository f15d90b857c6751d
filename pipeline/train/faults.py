"""Fault injection: rehearse OOM, NaN loss, slow batches and SIGTERM at chosen steps.

Steps are global optimizer steps counted from 1 (the step being computed). Each fault fires
once per listed step: after an injected OOM the retried window runs clean, and a step re-run
after a rollback runs clean. ``nan_loss_from_step`` is the exception: a persistent fault that
no recovery can fix (every step from it on, re-runs included, has a NaN loss).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import torch

from pipeline.config.fields import spec

log = logging.getLogger(__name__)


@dataclass
class FaultsConfig:
    oom_at_steps: list[int] = spec([], ge=1, help="raise a CUDA-style OOM in these steps")
    nan_loss_at_steps: list[int] = spec([], ge=1, help="make the loss NaN in these steps")
    nan_loss_from_step: int | None = spec(
        None, ge=1, help="make the loss NaN in every step from this one on, re-runs included"
    )
    slow_batch_at_steps: list[int] = spec([], ge=1, help="delay the batch of these steps")
    slow_batch_seconds: float = spec(1.0, gt=0, help="delay of an injected slow batch")
    sigterm_at_step: int | None = spec(None, ge=1, help="send SIGTERM to this process at step")
    checkpoint_write_delay_s: float = spec(
        0.0, ge=0, help="hold every checkpoint write this long with its temporary file written "
        "but not renamed (a window for kill-during-write tests)"
    )


class FaultInjector:
    def __init__(self, cfg: FaultsConfig):
        self.cfg = cfg
        self._fired: set[tuple[str, int]] = set()

    def _once(self, kind: str, step: int, steps: list[int]) -> bool:
        if step in steps and (kind, step) not in self._fired:
            self._fired.add((kind, step))
            log.warning("fault injection: %s at step %d", kind, step)
            return True
        return False

    def before_forward(self, step: int) -> None:
        if self._once("slow_batch", step, self.cfg.slow_batch_at_steps):
            time.sleep(self.cfg.slow_batch_seconds)
        if self._once("oom", step, self.cfg.oom_at_steps):
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected fault at step {step})"
            )

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._once("nan_loss", step, self.cfg.nan_loss_at_steps):
            return loss * float("nan")
        persistent = self.cfg.nan_loss_from_step
        if persistent is not None and step >= persistent:
            if ("nan_loss_from", step) not in self._fired:  # say it once per step number
                self._fired.add(("nan_loss_from", step))
                log.warning("fault injection: persistent nan_loss at step %d", step)
            return loss * float("nan")
        return loss

    def after_step(self, step: int) -> None:
        if self.cfg.sigterm_at_step == step and ("sigterm", step) not in self._fired:
            self._fired.add(("sigterm", step))
            log.warning("fault injection: SIGTERM at step %d", step)
            os.kill(os.getpid(), signal.SIGTERM)
