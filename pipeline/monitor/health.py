"""Training health checks on rolling windows, with reports that say what to do.

Each check looks at values the trainer already has on the host at an optimizer step (loss,
PRE-clip gradient norm, learning rate) and keeps its own evidence. ``report()`` returns a
JSON-able dict: ``overall_status`` (healthy / warning / critical), per-check status, evidence
(steps and values) and concrete suggestions with numbers.
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


@dataclass
class _Check:
    name: str
    status: str = "healthy"
    count: int = 0
    evidence: list[dict] = field(default_factory=list)
    suggestion: str = ""

    def flag(self, status: str, step: int, suggestion: str, **values: float) -> None:
        self.count += 1
        if STATUS_CODE[status] >= STATUS_CODE[self.status]:
            self.status = status
            self.suggestion = suggestion
        if len(self.evidence) < 20:
            self.evidence.append({"step": step, **values})


class HealthMonitor:
    """Feed it every optimizer step with :meth:`observe`; ask for :meth:`report` at any time."""

    CHECKS = ("non_finite", "loss_spike", "stagnation", "grad_explosion", "grad_vanishing", "lr")

    def __init__(self, cfg: HealthConfig, *, base_lr: float, warmup_steps: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.history: deque[tuple[int, float]] = deque(maxlen=cfg.stagnation_steps + 1)
        self.checks = {name: _Check(name) for name in self.CHECKS}
        self.last_step = 0

    def observe(self, step: int, *, loss: float, grad_norm: float, lr: float) -> list[str]:
        """Record one optimizer step; returns the names of checks that fired on it."""
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
        if grad_norm > self.cfg.grad_explosion_norm:
            ratio = grad_norm / statistics.median(self.grad_norms) if self.grad_norms else 0.0
            checks["grad_explosion"].flag(
                "critical" if grad_norm > 10 * self.cfg.grad_explosion_norm else "warning",
                step,
                f"pre-clip grad norm {grad_norm:.3g} (x{ratio:.0f} the recent median) at lr "
                f"{lr:.3g}: lower optim.lr to ~{lr / 2:.3g}, keep trainer.grad_clip <= 1.0, "
                f"or use >= 2 warmup epochs",
                grad_norm=grad_norm,
            )
            fired.append("grad_explosion")
        if grad_norm < self.cfg.grad_vanishing_norm and step > self.warmup_steps:
            checks["grad_vanishing"].flag(
                "warning",
                step,
                f"pre-clip grad norm {grad_norm:.2g} below {self.cfg.grad_vanishing_norm:g}: "
                f"check that the loss depends on the weights, raise optim.lr (now {lr:.3g})",
                grad_norm=grad_norm,
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
        }


def report_markdown(report: dict) -> str:
    lines = [
        f"# Health report (step {report['step']})",
        "",
        f"Overall status: **{report['overall_status']}**",
        "",
        "| check | status | count | suggestion |",
        "|---|---|---|---|",
    ]
    for name, check in report["checks"].items():
        lines.append(
            f"| {name} | {check['status']} | {check['count']} | {check['suggestion'] or '-'} |"
        )
    return "\n".join(lines) + "\n"
