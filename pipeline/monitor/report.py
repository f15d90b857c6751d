"""Health reports for training loops other than this pipeline's: the same checks, report
dict, markdown and plot as the trainer's, from a history of losses, gradient norms and LRs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.monitor.health import HealthConfig, HealthMonitor, report_markdown


def generate_health_report(
    losses: Sequence[float],
    grad_norms: Sequence[float],
    lrs: Sequence[float],
    *,
    steps: Sequence[int] | None = None,
    samples_per_s: Sequence[float] | None = None,
    model: Any = None,
    config: HealthConfig | None = None,
    base_lr: float | None = None,
    warmup_steps: int = 0,
    plot: str | Path | None = None,
) -> tuple[dict, str]:
    """Run the pipeline's health checks over a finished (or running) loop's history.

    Parameters
    ----------
    losses, grad_norms, lrs : one value per optimizer step: the loss, the gradient norm
        *before* clipping (``torch.nn.utils.clip_grad_norm_`` returns it) and the LR used.
    steps : the step numbers of those values (default ``1, 2, ...``).
    samples_per_s : throughput per step, for the throughput-drop check (optional).
    model : a ``torch.nn.Module`` whose ``.grad`` holds the last step's gradients (call this
        before ``zero_grad``): per-group norms (its top-level modules) are added to the last
        step, so that gradient explosion/vanishing names the group, and to the report. They
        are scaled to add up (in squares) to the last of ``grad_norms``, so clipped ``.grad``
        give pre-clip group norms too (clipping scales every group alike).
    config : check thresholds (default :class:`HealthConfig`); ``base_lr`` the peak LR the
        LR check compares with (default ``max(lrs)``); ``warmup_steps`` steps in which
        vanishing gradients and a zero LR are expected.
    plot : a PNG path: also draw the health plot there (loss, gradient norm, LR, throughput,
        anomalies marked).

    Returns
    -------
    ``(report, markdown)``: the dict the trainer writes to ``health/report.json`` (status,
    checks with evidence and suggestions, anomaly steps, series) and ``health/report.md``.

    Example
    -------
    >>> report, markdown = generate_health_report([1.0] * 20 + [9.0], [0.5] * 21, [1e-3] * 21)
    >>> report["overall_status"], report["anomalies"]
    ('warning', {'loss_spike': [21]})
    """
    n = len(losses)
    if len(grad_norms) != n or len(lrs) != n:
        raise ValueError(
            "losses, grad_norms and lrs must have the same length, but got "
            f"{n}, {len(grad_norms)} and {len(lrs)}."
        )
    if n == 0:
        raise ValueError("losses must hold at least one value, but got an empty history.")
    steps = list(range(1, n + 1)) if steps is None else list(steps)
    if len(steps) != n:
        raise ValueError(f"steps must have one entry per loss ({n}), but got {len(steps)}.")
    if samples_per_s is not None and len(samples_per_s) != n:
        raise ValueError(
            f"samples_per_s must have one entry per loss ({n}), but got {len(samples_per_s)}."
        )
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be at least 0, but got warmup_steps={warmup_steps}.")
    peak = max(float(v) for v in lrs) if base_lr is None else base_lr
    monitor = HealthMonitor(config or HealthConfig(), base_lr=peak, warmup_steps=warmup_steps)
    last_groups = None
    if model is not None:
        from pipeline.monitor.grads import grad_norms_by_group

        last_groups = {k: float(v) for k, v in grad_norms_by_group(model).items()}
        # After clip_grad_norm_ the .grad are clipped, all groups by the same factor: scale
        # them back to the pre-clip norm given for the last step.
        total = math.sqrt(sum(v * v for v in last_groups.values()))
        last = float(grad_norms[-1])
        if total > 0 and math.isfinite(last):
            last_groups = {k: v * last / total for k, v in last_groups.items()}
    for i, step in enumerate(steps):
        monitor.observe(
            int(step),
            loss=float(losses[i]),
            grad_norm=float(grad_norms[i]),
            lr=float(lrs[i]),
            group_norms=last_groups if i == n - 1 else None,
            samples_per_s=None if samples_per_s is None else float(samples_per_s[i]),
        )
    report = monitor.report()
    if plot is not None:
        from pipeline.monitor.plots import save_health_plot

        save_health_plot(report, plot)
    return report, report_markdown(report)
