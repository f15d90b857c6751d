"""Training health checks on rolling windows, with reports that say what to do.

Each check looks at values the trainer already has on the host at an optimizer step (loss,
PRE-clip gradient norm, per-group norms on logged steps, learning rate, samples/s and data
wait) and keeps its own evidence. ``report()`` returns a JSON-able dict: ``overall_status``
(healthy / warning / critical), per-check status, evidence (steps and values) and concrete
suggestions with numbers, the steps of every anomaly (checks that fired and recovery events
the trainer marks: OOM recoveries, rollbacks) and the series the health plot is drawn from.
Users with their own loop call :func:`pipeline.monitor.generate_health_report`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from pipeline.config.fields import spec

STATUS_CODE = {"healthy": 0, "warning": 1, "critical": 2}


@dataclass
class HealthConfig:
    enabled: bool = spec(True, help="run the health checks and log health/* and reports")
    window: int = spec(50, ge=5, help="optimizer steps in the rolling windows")
    loss_spike_factor: float = spec(
        3.0, gt=1, help="loss above this multiple of the rolling median is a spike"
    )
    stagnation_steps: int = spec(
        500, ge=10, help="steps over which the loss must improve by stagnation_min_improvement"
    )
    stagnation_min_improvement: float = spec(
        0.01, ge=0, help="relative loss improvement below which training is stagnating"
    )
    grad_explosion_norm: float = spec(100.0, gt=0, help="pre-clip gradient norm seen as exploding")
    grad_vanishing_norm: float = spec(1e-6, ge=0, help="pre-clip gradient norm seen as vanishing")
    report_every_steps: int = spec(200, ge=1, help="optimizer steps between health reports")
    throughput_drop_fraction: float = spec(
        0.5,
        gt=0,
        lt=1,
        help="median samples/s of the last throughput_window steps below this fraction of the "
        "median of the window steps before them is a throughput drop",
    )
    throughput_window: int = spec(
        10, ge=3, help="recent optimizer steps whose median samples/s the throughput check uses"
    )


#: Points kept per plotted series; beyond twice this, every other point is dropped.
SERIES_POINTS = 2000
#: Steps kept per anomaly kind in a report.
ANOMALY_STEPS = 1000


@dataclass
class _Check:
    name: str
    status: str = "healthy"
    count: int = 0
    evidence: list[dict] = field(default_factory=list)
    suggestion: str = ""

    def flag(self, status: str, step: int, suggestion: str, **values: float | str) -> None:
        self.count += 1
        if STATUS_CODE[status] >= STATUS_CODE[self.status]:
            self.status = status
            self.suggestion = suggestion
        if len(self.evidence) < 20:
            self.evidence.append({"step": step, **values})


class _Series:
    """(step, value) points of one quantity, memory bounded: past ``2 * SERIES_POINTS``
    points every other one is dropped and only every ``stride``-th new point is kept."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []
        self.stride = 1
        self._seen = 0

    def append(self, step: int, value: float) -> None:
        if self._seen % self.stride == 0:
            self.points.append((step, float(value)))
            if len(self.points) > 2 * SERIES_POINTS:
                self.points = self.points[::2]
                self.stride *= 2
        self._seen += 1

    def truncate(self, after_step: int) -> None:
        self.points = [(s, v) for s, v in self.points if s <= after_step]


class HealthMonitor:
    """Feed it every optimizer step with :meth:`observe`; ask for :meth:`report` at any time.

    ``mark(kind, step)`` records a recovery event (``oom_recovery``, ``rollback``) among the
    anomalies; ``record(step, name=value)`` adds points to a plotted series (device memory).
    """

    CHECKS = (
        "non_finite", "loss_spike", "stagnation", "grad_explosion", "grad_vanishing", "lr",
        "throughput_drop",
    )

    def __init__(self, cfg: HealthConfig, *, base_lr: float, warmup_steps: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.history: deque[tuple[int, float]] = deque(maxlen=cfg.stagnation_steps + 1)
        self.checks = {name: _Check(name) for name in self.CHECKS}
        self.last_step = 0
        self.anomalies: dict[str, list[int]] = {}
        self.series: dict[str, _Series] = {}
        self.group_norms: dict[str, float] = {}  # the latest per-group pre-clip norms
        # Throughput: (samples/s, data wait s, step s) of the recent steps, and the window of
        # steps before them that they are compared with.
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=cfg.throughput_window)
        self._earlier: deque[tuple[float, float, float]] = deque(maxlen=cfg.window)
        self._throughput_low = False

    def mark(self, kind: str, step: int) -> None:
        """Record an anomaly that is not a check (a recovery event) at ``step``."""
        steps = self.anomalies.setdefault(kind, [])
        if len(steps) < ANOMALY_STEPS:
            steps.append(int(step))

    def record(self, step: int, **values: float) -> None:
        """Add ``name=value`` points at ``step`` to the plotted series."""
        for name, value in values.items():
            self.series.setdefault(name, _Series()).append(step, value)

    def forget_after(self, step: int) -> None:
        """Drop series points after ``step`` (a rollback re-runs those steps); anomalies stay."""
        for series in self.series.values():
            series.truncate(step)

    def observe(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        group_norms: dict[str, float] | None = None,
        samples_per_s: float | None = None,
        data_wait_s: float | None = None,
        step_s: float | None = None,
    ) -> list[str]:
        """Record one optimizer step; returns the names of checks that fired on it.

        ``group_norms``: pre-clip gradient norm per parameter group (on the steps where they
        were computed); ``samples_per_s`` with ``data_wait_s`` and ``step_s`` (seconds) feed
        the throughput check.
        """
        fired = self._observe(step, loss, grad_norm, lr, group_norms)
        if samples_per_s is not None and self._throughput_dropped(
            step, samples_per_s, data_wait_s or 0.0, step_s
        ):
            fired.append("throughput_drop")
        self.record(step, loss=loss, grad_norm=grad_norm, lr=lr)
        if samples_per_s is not None:
            self.record(step, samples_per_s=samples_per_s)
        if group_norms:
            self.group_norms = {k: float(v) for k, v in group_norms.items()}
        for name in fired:
            self.mark(name, step)
        return fired

    def _observe(
        self, step: int, loss: float, grad_norm: float, lr: float,
        group_norms: dict[str, float] | None,
    ) -> list[str]:
        self.last_step = step
        fired: list[str] = []
        checks = self.checks
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            checks["non_finite"].flag(
                "critical" if checks["non_finite"].count >= 2 else "warning",
                step,
                f"non-finite loss/gradient at step {step} (update skipped); with lr {lr:.3g} "
                f"try lr ~{lr / 2:.3g}, precision bf16 instead of fp16, or trainer.grad_clip 1.0",
                loss=loss,
                grad_norm=grad_norm,
            )
            return ["non_finite"]
        if len(self.losses) >= max(5, self.cfg.window // 5):
            median = statistics.median(self.losses)
            if median > 0 and loss > self.cfg.loss_spike_factor * median:
                checks["loss_spike"].flag(
                    "warning",
                    step,
                    f"loss {loss:.3g} is x{loss / median:.1f} the recent median {median:.3g} at "
                    f"lr {lr:.3g}: lower optim.lr to ~{lr / 2:.3g} or lengthen warmup "
                    f"(scheduler.warmup_epochs >= 2)",
                    loss=loss,
                    median=median,
                )
                fired.append("loss_spike")
        groups = {k: float(v) for k, v in (group_norms or {}).items()}
        if grad_norm > self.cfg.grad_explosion_norm:
            ratio = grad_norm / statistics.median(self.grad_norms) if self.grad_norms else 0.0
            where, group = "", {}
            if groups:  # the group with the largest norm carries the explosion
                name = max(groups, key=groups.__getitem__)
                where = f", largest in group '{name}' ({groups[name]:.3g})"
                group = {"group": name, "group_norm": groups[name]}
            checks["grad_explosion"].flag(
                "critical" if grad_norm > 10 * self.cfg.grad_explosion_norm else "warning",
                step,
                f"pre-clip grad norm {grad_norm:.3g} (x{ratio:.0f} the recent median){where} at "
                f"lr {lr:.3g}: lower optim.lr to ~{lr / 2:.3g}, keep trainer.grad_clip <= 1.0, "
                f"or use >= 2 warmup epochs",
                grad_norm=grad_norm,
                **group,
            )
            fired.append("grad_explosion")
        vanishing = {k: v for k, v in groups.items() if v < self.cfg.grad_vanishing_norm}
        if step > self.warmup_steps and grad_norm < self.cfg.grad_vanishing_norm:
            checks["grad_vanishing"].flag(
                "warning",
                step,
                f"pre-clip grad norm {grad_norm:.2g} below {self.cfg.grad_vanishing_norm:g}: "
                f"check that the loss depends on the weights, raise optim.lr (now {lr:.3g})",
                grad_norm=grad_norm,
            )
            fired.append("grad_vanishing")
        elif step > self.warmup_steps and vanishing:  # one part of the model learns nothing
            name = min(vanishing, key=vanishing.__getitem__)
            checks["grad_vanishing"].flag(
                "warning",
                step,
                f"pre-clip grad norm of group '{name}' {vanishing[name]:.2g} below "
                f"{self.cfg.grad_vanishing_norm:g} (all groups: {grad_norm:.2g}): check that a "
                f"loss term with a non-zero weight depends on '{name}' (model.loss.*) and that "
                f"its parameters are not frozen or detached",
                grad_norm=grad_norm,
                group=name,
                group_norm=vanishing[name],
            )
            fired.append("grad_vanishing")
        if not math.isfinite(lr) or lr < 0 or lr > 10 * self.base_lr or (
            lr == 0 and step > self.warmup_steps
        ):
            checks["lr"].flag(
                "critical",
                step,
                f"learning rate {lr!r} at step {step} is outside the schedule "
                f"(peak {self.base_lr:g}): check scheduler.* and optim.lr",
                lr=lr,
            )
            fired.append("lr")
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.history.append((step, loss))
        if self._stagnating():
            first_step, first = self.history[0]
            first = statistics.median(v for _, v in list(self.history)[: len(self.history) // 4])
            loss = statistics.median(v for _, v in list(self.history)[-(len(self.history) // 4) :])
            checks["stagnation"].flag(
                "warning",
                step,
                f"loss improved {100 * (1 - loss / first):.2f}% over steps {first_step}-{step} "
                f"(< {100 * self.cfg.stagnation_min_improvement:g}%): raise optim.lr "
                f"(now {lr:.3g}) x2, or check the data and the loss terms",
                loss=loss,
                loss_before=first,
            )
            fired.append("stagnation")
            self.history.clear()
        return fired

    def _throughput_dropped(
        self, step: int, samples_per_s: float, data_wait_s: float, step_s: float | None
    ) -> bool:
        """True at the first step where the recent median samples/s falls below
        ``throughput_drop_fraction`` of the median of the steps before; re-armed once it is
        back above."""
        if step_s is None:
            step_s = math.nan
        if len(self._recent) == self._recent.maxlen:
            self._earlier.append(self._recent[0])
        self._recent.append((samples_per_s, data_wait_s, step_s))
        if len(self._recent) < self._recent.maxlen or len(self._earlier) < self._recent.maxlen:
            return False
        now = statistics.median(r[0] for r in self._recent)
        before = statistics.median(e[0] for e in self._earlier)
        if not (before > 0 and now < self.cfg.throughput_drop_fraction * before):
            self._throughput_low = False
            return False
        if self._throughput_low:  # the same drop, already reported
            return False
        self._throughput_low = True
        wait_now = statistics.median(r[1] for r in self._recent)
        wait_before = statistics.median(e[1] for e in self._earlier)
        step_now = statistics.median(r[2] for r in self._recent)
        step_before = statistics.median(e[2] for e in self._earlier)
        slower = step_now - step_before
        if not (math.isfinite(step_now) and math.isfinite(step_before)):
            cause = "unknown"  # no step times given (a history without timing)
            advice = "log data wait and step time to tell the loader from the device"
        elif slower > 0 and wait_now - wait_before > 0.5 * slower:
            cause = "data wait"
            advice = (
                f"the loader: data wait {1000 * wait_before:.0f} -> {1000 * wait_now:.0f} ms per "
                f"step; raise loader.num_workers or loader.prefetch_factor, check the storage "
                f"that data.path is on (or use loader.cache)"
            )
        else:
            cause = "compute"
            advice = (
                f"the device: step time without data wait {1000 * (step_before - wait_before):.0f}"
                f" -> {1000 * (step_now - wait_now):.0f} ms; look for other jobs on the GPU "
                f"(nvidia-smi), clock throttling (system/gpu_*_throttle_reasons, temperature) or "
                f"OOM splits (perf/micro_batch_size)"
            )
        self.checks["throughput_drop"].flag(
            "warning",
            step,
            f"throughput {now:.3g} samples/s is {100 * now / before:.0f}% of the earlier median "
            f"{before:.3g} (cause: {cause}); {advice}",
            samples_per_s=now,
            samples_per_s_before=before,
            data_wait_ms=1000 * wait_now,
            step_ms=1000 * step_now,
            cause=cause,
        )
        return True

    def _stagnating(self) -> bool:
        # Diffusion losses are noisy step to step (the noise level is sampled), so compare the
        # medians of the first and last quarters of the window, not single steps.
        if len(self.history) <= self.cfg.stagnation_steps:
            return False
        values = [v for _, v in self.history]
        quarter = max(len(values) // 4, 1)
        first = statistics.median(values[:quarter])
        last = statistics.median(values[-quarter:])
        return first > 0 and (first - last) / first < self.cfg.stagnation_min_improvement

    @property
    def overall_status(self) -> str:
        return max((c.status for c in self.checks.values()), key=STATUS_CODE.__getitem__)

    def metrics(self) -> dict[str, float]:
        out = {"health/status": float(STATUS_CODE[self.overall_status])}
        for name, check in self.checks.items():
            out[f"health/{name}_count"] = float(check.count)
        return out

    def report(self) -> dict:
        """The JSON-able report: status, checks, anomaly steps by kind, latest per-group
        gradient norms and the plotted series (``{name: [[step, value], ...]}``)."""
        return {
            "overall_status": self.overall_status,
            "step": self.last_step,
            "checks": {
                name: {
                    "status": c.status,
                    "count": c.count,
                    "evidence": c.evidence,
                    "suggestion": c.suggestion,
                }
                for name, c in self.checks.items()
            },
            "anomalies": {kind: list(steps) for kind, steps in self.anomalies.items()},
            "grad_norms_by_group": dict(self.group_norms),
            "series": {name: [list(p) for p in s.points] for name, s in self.series.items()},
        }


def report_markdown(report: dict) -> str:
    lines = [
        f"# Health report (step {report['step']})",
        "",
        f"Overall status: **{report['overall_status']}**",
    ]
    if report.get("stopped"):
        lines += ["", f"**Run stopped:** {report['stopped']}"]
    lines += [
        "",
        "| check | status | count | suggestion |",
        "|---|---|---|---|",
    ]
    for name, check in report["checks"].items():
        lines.append(
            f"| {name} | {check['status']} | {check['count']} | {check['suggestion'] or '-'} |"
        )
    recovery = {k: v for k, v in (report.get("recovery") or {}).items() if v}
    if recovery:
        lines += ["", "Recovery: " + ", ".join(f"{k} {v:g}" for k, v in sorted(recovery.items()))]
    anomalies = report.get("anomalies") or {}
    if anomalies:
        lines += ["", "| anomaly | steps |", "|---|---|"]
        for kind, steps in sorted(anomalies.items()):
            shown = ", ".join(str(s) for s in steps[:30]) + (" ..." if len(steps) > 30 else "")
            lines.append(f"| {kind} | {shown} |")
    groups = report.get("grad_norms_by_group") or {}
    if groups:
        lines += ["", "Latest pre-clip gradient norm by group: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in groups.items())]
    return "\n".join(lines) + "\n"
