"""Recovery settings: what the trainer does on its own after an OOM or a non-finite step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config.fields import spec


@dataclass
class RecoveryConfig:
    oom: bool = spec(
        True,
        help="on OOM: free memory, split the micro-batch in two (same effective batch), retry",
    )
    max_oom_retries: int = spec(3, ge=0, help="splits tried for one window before giving up")
    grow_back_after_steps: int | None = spec(
        200, ge=1, help="after this many steps without OOM, undo one split (null: never)"
    )
    non_finite: Literal["skip", "stop", "rollback"] = spec(
        "skip",
        help="non-finite loss/gradients: skip the update (counted), stop the run, or skip and, "
        "after max_consecutive_non_finite in a row, roll back to the last checkpoint at a lower LR",
    )
    max_consecutive_non_finite: int = spec(
        5, ge=1, help="skipped updates in a row after which the run stops (or rolls back)"
    )
    rollback_lr_factor: float = spec(
        0.5, gt=0, lt=1, help="rollback: the LR schedule is scaled by this factor at each rollback"
    )
    max_rollbacks: int = spec(
        2, ge=1, help="rollbacks without getting past the failing step, after which the run stops"
    )
