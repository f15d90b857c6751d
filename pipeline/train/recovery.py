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
    non_finite: Literal["skip", "stop"] = spec(
        "skip", help="non-finite loss/gradients: skip the update (counted) or stop the run"
    )
    max_consecutive_non_finite: int = spec(
        5, ge=1, help="skipped updates in a row after which the run stops with a report"
    )
