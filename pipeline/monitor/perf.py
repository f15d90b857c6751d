"""Step timing, throughput and device memory, without extra host-device syncs.

The trainer already synchronises once per optimizer step (it reads the loss and the pre-clip
gradient norm to decide whether the update is finite), so host wall time between optimizer
steps is the device's step time; data wait is the host time spent blocked on the loader.
:class:`PhaseTimer` splits sampled steps further (compute, optimizer, logging) with CUDA events
on the GPU, read only once they have completed, so that no step waits for them.
"""

from __future__ import annotations

import statistics
import time
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
    timing_every_steps: int | None = spec(
        None,
        ge=1,
        help="optimizer steps between steps split into data/compute/optimizer/logging time "
        "(perf/time/*); null: tracking.log_every_steps",
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

    def eta_s(self, remaining_steps: int) -> float:
        """Seconds left for ``remaining_steps`` optimizer steps at the rolling median step time
        (validation and checkpoints not included)."""
        if not self.step_times:
            return float("nan")
        return max(remaining_steps, 0) * statistics.median(self.step_times)


class PhaseTimer:
    """Splits sampled optimizer steps into data wait, compute, optimizer and logging time.

    Every ``every``-th step (and step 1) is timed: :meth:`begin` at the start of the step,
    :meth:`mark` at the end of each phase in :attr:`PHASES` order. On CUDA the marks are CUDA
    events recorded on the current stream (no sync); a timed step is reported by
    :meth:`ready` once its last event has completed, which the next step's finite check
    guarantees. On the CPU the marks are ``perf_counter`` stamps, reported at once. Unsampled
    steps cost one modulo. Data wait is host time, measured by the loader for every step.
    """

    PHASES = ("compute", "optimizer", "logging")

    def __init__(self, device: torch.device, every: int):
        if every < 1:
            raise ValueError(f"every must be at least 1, but got every={every}")
        self.every = every
        self.cuda = device.type == "cuda"
        self._marks: list | None = None
        self._step = 0
        self._data_wait_s = 0.0
        self._pending: deque[tuple[int, float, list]] = deque()

    def should_time(self, step: int) -> bool:
        return step % self.every == 0 or step == 1

    def begin(self, step: int, data_wait_s: float) -> None:
        self._marks = [self._stamp()] if self.should_time(step) else None
        self._step, self._data_wait_s = step, data_wait_s

    def mark(self) -> None:
        if self._marks is not None:
            self._marks.append(self._stamp())
            if len(self._marks) == len(self.PHASES) + 1:
                self._pending.append((self._step, self._data_wait_s, self._marks))
                self._marks = None

    def ready(self, *, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """``(step, perf/time/* in ms)`` of the timed steps whose marks have completed; with
        ``wait`` (end of run), waits for the device first."""
        out = []
        while self._pending:
            step, data_wait_s, marks = self._pending[0]
            if self.cuda:
                if wait:
                    marks[-1].synchronize()
                elif not marks[-1].query():  # not complete yet: no waiting on the device
                    break
                spans = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
            else:
                spans = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
            self._pending.popleft()
            times = {"perf/time/data_ms": 1000 * data_wait_s}
            times.update({f"perf/time/{name}_ms": ms for name, ms in zip(self.PHASES, spans)})
            out.append((step, times))
        return out

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()


def memory_metrics(device: torch.device) -> dict[str, float]:
    """perf/* device memory in GiB and as a fraction of capacity (not of the peak), and the
    caching allocator's retries (allocations that had to free cached blocks first: memory is
    fragmented or nearly full) and OOMs so far."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    return {
        "perf/gpu_mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "perf/gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "perf/gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "perf/gpu_mem_used_fraction": (total - free) / total,
        "perf/gpu_alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "perf/gpu_ooms": float(stats.get("num_ooms", 0)),
    }
