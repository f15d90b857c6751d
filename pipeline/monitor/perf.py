"""Step timing, throughput and device memory, without extra host-device syncs.

The trainer already synchronises once per optimizer step (it reads the loss and the pre-clip
gradient norm to decide whether the update is finite), so host wall time between optimizer
steps is the device's step time; data wait is the host time spent blocked on the loader.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import torch

from pipeline.config.fields import spec


@dataclass
class MonitorConfig:
    slow_batch_factor: float = spec(
        3.0, gt=1, help="a step slower than this multiple of the rolling median is an anomaly"
    )
    window: int = spec(50, ge=5, help="steps in the rolling median of step time")
    memory_warning_fraction: float = spec(
        0.92, gt=0, le=1, help="device memory in use (of capacity) above which to warn"
    )


class StepTimer:
    """Rolling statistics of optimizer-step time; flags slow steps with their cause."""

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.step_times: deque[float] = deque(maxlen=cfg.window)
        self.slow_steps: list[dict] = []

    def observe(self, step: int, *, step_s: float, data_wait_s: float) -> dict | None:
        slow = None
        if len(self.step_times) >= 5:
            median = statistics.median(self.step_times)
            if step_s > self.cfg.slow_batch_factor * median:
                cause = "data wait" if data_wait_s > 0.5 * (step_s - median) else "compute"
                slow = {"step": step, "step_s": step_s, "median_s": median, "cause": cause}
                if len(self.slow_steps) < 100:
                    self.slow_steps.append(slow)
        self.step_times.append(step_s)
        return slow


def memory_metrics(device: torch.device) -> dict[str, float]:
    """perf/* device memory in GiB and as a fraction of capacity (not of the peak)."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    free, total = torch.cuda.mem_get_info(device)
    return {
        "perf/gpu_mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "perf/gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "perf/gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "perf/gpu_mem_used_fraction": (total - free) / total,
    }
