"""The pipeline's parts for a training loop of your own.

Each name here wraps (or is) what :func:`pipeline.train.train` itself uses, so a loop written
against this module gets the same config validation, optimizers and LR schedules, device
prefetching, health checks with suggestions, step timing and MLflow tracking:

- :func:`config_from_scenario`: a validated :class:`Config` from a scenario and dotted-key
  overrides;
- :func:`build_optimizer_and_scheduler`: AdamW / Lion / SGD and warmup + cosine (or restarts,
  constant, plateau), as the config says;
- :func:`prefetch_to_device`: batches moved to the device ahead of use;
- :func:`start_mlflow_run`: a :class:`Tracker` on a new MLflow run, the config logged as params;
- :class:`TrainingMonitor` (:func:`build_monitor` from a config): per step, health checks, slow
  steps and device memory, ``train/*``, ``perf/*`` and ``health/*`` metrics, and
  :class:`StepWarning` objects with suggestions; at the end, the health report;
- :func:`generate_health_report`: the same report over a history you kept yourself.

``examples/custom_loop.py`` is a complete, runnable loop. The shape of it::

    config = config_from_scenario("debug", overrides={"optim.lr": 1e-3})
    optimizer, scheduler = build_optimizer_and_scheduler(
        model, config.optim, config.scheduler, total_steps=n_steps, steps_per_epoch=len(loader)
    )
    tracker = start_mlflow_run(config)
    monitor = build_monitor(config, steps_per_epoch=len(loader), total_steps=n_steps,
                            tracker=tracker)
    for step, batch in enumerate(prefetch_to_device(loader, device), start=1):
        loss = loss_fn(model(batch), batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # pre-clip norm
        warnings = monitor.log_step(step, loss=loss, grad_norm=grad_norm,
                                    lr=optimizer.param_groups[0]["lr"], batch_size=8)
        if not any(w.check == "non_finite" for w in warnings):
            optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    monitor.log_report()
    tracker.close()
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from pipeline.config.loader import flatten, load_config, merge, nested, redact, to_dict
from pipeline.config.schema import Config
from pipeline.data.loader import DevicePrefetcher
from pipeline.monitor.health import HealthConfig, HealthMonitor, report_markdown
from pipeline.monitor.perf import MonitorConfig, StepTimer, memory_metrics
from pipeline.monitor.report import generate_health_report
from pipeline.tracking import NullTracker, Tracker, build_tracker
from pipeline.train.optim import OptimConfig, build_optimizer
from pipeline.train.schedule import SchedulerConfig, WarmupPlateau, build_scheduler, warmup_steps

log = logging.getLogger(__name__)

__all__ = [
    "Config",
    "StepWarning",
    "Tracker",
    "TrainingMonitor",
    "build_monitor",
    "build_optimizer_and_scheduler",
    "config_from_scenario",
    "generate_health_report",
    "load_config",
    "prefetch_to_device",
    "start_mlflow_run",
]

#: A check that keeps firing is logged at its 1st, 50th, 100th, ... occurrence, as the
#: trainer does; :meth:`TrainingMonitor.log_step` returns every occurrence.
_LOG_EVERY_REPEAT = 50


# ------------------------------------------------------------------------------------ config
def config_from_scenario(
    scenario: str | None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A validated :class:`Config`: defaults < ``preset`` < ``scenario`` < ``config_file`` <
    ``overrides``, as ``python -m pipeline train`` resolves it.

    Parameters
    ----------
    scenario : one of ``balanced``, ``performance``, ``safety``, ``memory``, ``debug``
        (``configs/scenarios/``), or ``None`` for the defaults.
    preset : model preset (default ``small_model``).
    config_file : a YAML file of overrides.
    overrides : dotted keys to values, e.g. ``{"optim.lr": 1e-3, "optim.name": "lion"}``
        (what ``--set optim.lr=1e-3`` does, with Python values instead of YAML text).

    Raises
    ------
    pipeline.errors.ConfigError
        Unknown keys, wrong types, out-of-range or contradictory values: one message that
        names every offending key.

    Example
    -------
    >>> config = config_from_scenario("debug", overrides={"optim.name": "lion"})
    >>> config.optim.name, config.scenario
    ('lion', 'debug')
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(
            "overrides must be a mapping of dotted keys to values, e.g. {'optim.lr': 1e-3}, "
            f"but got {type(overrides).__name__}."
        )
    extra: dict = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ValueError(
                f"overrides: expected dotted keys such as 'optim.lr', but got {key!r}."
            )
        extra = merge(extra, nested(key, value))
    return load_config(scenario=scenario, preset=preset, config_file=config_file, extra=extra)


# ---------------------------------------------------------------------- optimizer, schedule
def build_optimizer_and_scheduler(
    model: torch.nn.Module | Iterable[torch.nn.Parameter],
    optim: OptimConfig,
    scheduler: SchedulerConfig,
    *,
    total_steps: int,
    steps_per_epoch: int,
    mode: Literal["min", "max"] = "max",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | WarmupPlateau]:
    """The trainer's optimizer and LR schedule for ``model``.

    The optimizer is ``optim.name`` (AdamW, fused on CUDA; Lion; SGD) with weight decay on
    matrices only (not on norm weights and biases). The schedule is stepped once per
    optimizer step: a linear warmup of ``scheduler.warmup_steps`` steps (or
    ``scheduler.warmup_epochs`` x ``steps_per_epoch``) from ``warmup_start_factor`` x
    ``optim.lr``, then ``scheduler.name``: ``cosine`` to ``min_lr_ratio`` x ``optim.lr`` at
    ``total_steps``, ``cosine_restarts``, ``constant``, or ``plateau``. For ``plateau`` the
    scheduler is a :class:`~pipeline.train.schedule.WarmupPlateau`: also call
    ``scheduler.observe(value)`` with each validation value of a metric whose better
    direction is ``mode``.

    Parameters
    ----------
    model : a module, or an iterable of its ``torch.nn.Parameter`` objects.
    optim, scheduler : the ``optim`` and ``scheduler`` sections of a :class:`Config`.
    total_steps : optimizer steps in the whole run (the cosine's length).
    steps_per_epoch : optimizer steps per epoch (converts ``warmup_epochs`` and
        ``restart_epochs`` to steps).
    mode : ``"max"`` or ``"min"``, for ``plateau`` only.

    Returns
    -------
    ``(optimizer, scheduler)``
    """
    if not isinstance(optim, OptimConfig):
        raise TypeError(
            f"optim must be an OptimConfig (config.optim), but got {type(optim).__name__}."
        )
    if not isinstance(scheduler, SchedulerConfig):
        raise TypeError(
            "scheduler must be a SchedulerConfig (config.scheduler), but got "
            f"{type(scheduler).__name__}."
        )
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, but got total_steps={total_steps}.")
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be at least 1, but got steps_per_epoch={steps_per_epoch}."
        )
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', but got mode={mode!r}.")
    if not isinstance(model, torch.nn.Module):
        params = list(model)
        if not all(isinstance(p, torch.nn.Parameter) for p in params):
            raise TypeError(
                "model must be a torch.nn.Module or an iterable of torch.nn.Parameter (e.g. "
                "model.parameters()); parameter-group dicts are not supported."
            )
        # A container that holds (does not copy) the parameters, so that the trainer's
        # optimizer builder, which groups a module's parameters, serves here unchanged.
        model = torch.nn.ParameterList(params)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True).")
    optimizer = build_optimizer(optim, model)
    schedule = build_scheduler(
        scheduler, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, mode=mode
    )
    return optimizer, schedule


# ------------------------------------------------------------------------------------- data
def prefetch_to_device(
    loader: Iterable[Any], device: torch.device | str, *, depth: int = 2, enabled: bool = True
) -> DevicePrefetcher:
    """Iterate over ``loader``'s batches already on ``device``, ``depth`` batches ahead.

    On CUDA the next ``depth`` batches are copied on a side stream while the current one
    computes; give the ``DataLoader`` ``pin_memory=True`` so that the copies can overlap.
    On the CPU (or with ``enabled=False``) batches pass through, moved with ``.to(device)``.
    Batches may be tensors or dicts, lists and tuples of them; other values pass unchanged.
    ``.last_wait_s`` of the returned iterable is the host wait (seconds) for the latest batch:
    pass it to :meth:`TrainingMonitor.log_step` as ``data_wait_s``.

    Each ``for`` over the returned object iterates ``loader`` once (one epoch).

    Example
    -------
    >>> batches = prefetch_to_device([torch.ones(2), torch.zeros(2)], "cpu")
    >>> [b.tolist() for b in batches]
    [[1.0, 1.0], [0.0, 0.0]]
    """
    return DevicePrefetcher(loader, torch.device(device), depth=depth, enabled=enabled)


# ---------------------------------------------------------------------------------- tracking
def start_mlflow_run(
    config: Config,
    *,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_config: bool = True,
) -> Tracker:
    """A :class:`Tracker` on a new MLflow run in experiment ``config.tracking.experiment``.

    The run goes to ``MLFLOW_TRACKING_URI`` (``sqlite:///mlflow.db`` in the working
    directory when unset). Metrics given to ``tracker.log_metrics(metrics, step)`` are
    buffered and sent from a background thread, so a step does not wait on MLflow; system
    metrics are sampled as ``config.tracking.system_metrics`` says. With
    ``config.tracking.enabled`` false the tracker records nothing. Close it with
    ``tracker.close("FINISHED")`` (or ``"FAILED"``): that sends what is still buffered.

    Parameters
    ----------
    config : the resolved config; with ``log_config`` its keys are logged as params (dotted
        keys, secrets redacted) and as the artifact ``config/resolved.yaml``.
    run_name : default ``config.tracking.run_name``, else ``<scenario>-<preset>-<hash>``.
    tags : extra run tags; ``scenario``, ``preset`` and ``loop=custom`` are always set.
    """
    from pipeline.train.runtime import run_name as default_run_name

    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, but got {type(config).__name__}.")
    all_tags = {
        "scenario": config.scenario or "custom",
        "preset": config.preset,
        "loop": "custom",
        **dict(tags or {}),
    }
    tracker = build_tracker(
        config.tracking, run_name=run_name or default_run_name(config), tags=all_tags
    )
    if log_config:
        safe = redact(to_dict(config))
        tracker.log_params(flatten(safe))
        tracker.log_text(yaml.safe_dump(safe, sort_keys=False), "config/resolved.yaml")
    return tracker


# ---------------------------------------------------------------------------------- monitor
@dataclass(frozen=True)
class StepWarning:
    """Something :meth:`TrainingMonitor.log_step` noticed at ``step``.

    ``check`` is a health check (``non_finite``, ``loss_spike``, ``stagnation``,
    ``grad_explosion``, ``grad_vanishing``, ``lr``, ``throughput_drop``), ``slow_step`` or
    ``memory``; ``message`` says what was seen and what to change.
    """

    check: str
    step: int
    message: str

    def __str__(self) -> str:
        return f"step {self.step} {self.check}: {self.message}"


class TrainingMonitor:
    """The trainer's per-step monitoring for a loop of your own.

    Call :meth:`log_step` once per optimizer step, after the backward pass and gradient
    clipping and before ``optimizer.step()``, so that a ``non_finite`` warning can stop the
    update. It runs the health checks (:class:`~pipeline.monitor.health.HealthMonitor`) and
    the slow-step detection (:class:`~pipeline.monitor.perf.StepTimer`), logs the warnings
    (a repeating check at its 1st, 50th, ... occurrence) and returns them all; on logged
    steps (every ``log_every_steps``-th, step 1, and any step with a warning) it reads the
    device memory (warning above ``perf.memory_warning_fraction`` of capacity) and sends
    ``train/loss``, ``train/grad_norm``, ``train/lr``, ``perf/*`` and ``health/*`` metrics to
    the tracker. :meth:`report` / :meth:`log_report` give the health report.

    Parameters
    ----------
    base_lr : the peak LR (``optim.lr``); the LR check flags values above 10x it.
    warmup_steps : steps in which vanishing gradients and a zero LR are expected.
    total_steps : steps in the run, for ``perf/eta_s`` (optional).
    log_every_steps : steps between logged metric points.
    health, perf : check thresholds (``config.health``, ``config.monitor``).
    tracker : where metrics and reports go (default: nowhere).
    device : the training device, for ``perf/gpu_mem_*`` metrics and the memory warning
        (CUDA only).
    """

    def __init__(
        self,
        *,
        base_lr: float,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        log_every_steps: int = 1,
        health: HealthConfig | None = None,
        perf: MonitorConfig | None = None,
        tracker: Tracker | None = None,
        device: torch.device | str | None = None,
    ):
        if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr must be a positive number, but got base_lr={base_lr!r}.")
        if warmup_steps < 0:
            raise ValueError(
                f"warmup_steps must be at least 0, but got warmup_steps={warmup_steps}."
            )
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, but got total_steps={total_steps}.")
        if log_every_steps < 1:
            raise ValueError(
                f"log_every_steps must be at least 1, but got log_every_steps={log_every_steps}."
            )
        self.health = HealthMonitor(
            health or HealthConfig(), base_lr=float(base_lr), warmup_steps=warmup_steps
        )
        self.timer = StepTimer(perf or MonitorConfig())
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps
        self.tracker: Tracker = tracker if tracker is not None else NullTracker()
        self.device = torch.device(device) if device is not None else None
        self.last_step: int | None = None
        self._last_call: float | None = None  # perf_counter() of the previous log_step

    def should_log(self, step: int) -> bool:
        """Whether ``step`` is a logged step (compute extra values such as per-group gradient
        norms only then)."""
        return step % self.log_every_steps == 0 or step == 1

    def log_step(
        self,
        step: int,
        *,
        loss: float | torch.Tensor,
        grad_norm: float | torch.Tensor,
        lr: float,
        batch_size: int | None = None,
        data_wait_s: float | None = None,
        step_s: float | None = None,
        group_norms: Mapping[str, float | torch.Tensor] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> list[StepWarning]:
        """Check and record optimizer step ``step``; returns what it noticed.

        Parameters
        ----------
        step : the optimizer step (1, 2, ...).
        loss, grad_norm : the step's loss and its gradient norm *before* clipping
            (``torch.nn.utils.clip_grad_norm_`` returns it); 0-dim tensors are read together
            in one host sync.
        lr : the LR of this step (``optimizer.param_groups[0]["lr"]``).
        batch_size : samples in the step, for ``perf/samples_per_s`` and the throughput check.
        data_wait_s : seconds spent waiting for the batch (``prefetcher.last_wait_s``); tells
            a slow loader from a slow device in the slow-step and throughput checks.
        step_s : the step's wall time in seconds; default: the time since the previous
            ``log_step`` (none for the first call). Pass it when other work (validation,
            checkpoints) runs between steps, or that work counts as a slow step.
        group_norms : pre-clip gradient norm per part of the model, on logged steps
            (:func:`pipeline.monitor.grads.grad_norms_by_group` before clipping), so that
            gradient explosion and vanishing name the part; logged as
            ``train/grad_norm/<name>``.
        metrics : more metrics (floats) for this step's point, sent on logged steps (e.g.
            ``{"train/loss/mse": 0.3}``).
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, but got {type(step).__name__}.")
        if step < 0:
            raise ValueError(f"step must be at least 0, but got step={step}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, but got batch_size={batch_size}.")
        if data_wait_s is not None and data_wait_s < 0:
            raise ValueError(f"data_wait_s must be at least 0, but got data_wait_s={data_wait_s}.")
        now = time.perf_counter()
        if step_s is None and self._last_call is not None:
            step_s = now - self._last_call
        self._last_call = now
        self.last_step = step
        group_norms = dict(group_norms or {})
        loss, grad_norm, *group_values = _host_floats([loss, grad_norm, *group_norms.values()])
        groups = dict(zip(group_norms, group_values))
        lr = float(lr)

        warnings: list[StepWarning] = []
        timed = step_s is not None and step_s > 0
        if self.health.cfg.enabled:
            fired = self.health.observe(
                step, loss=loss, grad_norm=grad_norm, lr=lr, group_norms=groups or None,
                samples_per_s=batch_size / step_s if timed and batch_size else None,
                data_wait_s=data_wait_s or 0.0, step_s=step_s,
            )
            for name in fired:
                check = self.health.checks[name]
                warnings.append(StepWarning(name, step, check.suggestion))
                if check.count == 1 or check.count % _LOG_EVERY_REPEAT == 0:
                    log.warning("health: %s (%d so far): %s", name, check.count, check.suggestion)
        if timed:
            slow = self.timer.observe(step, step_s=step_s, data_wait_s=data_wait_s or 0.0)
            if slow:
                advice = ("more DataLoader workers or a deeper prefetch"
                          if slow["cause"] == "data wait" else "look for other jobs on the device")
                warnings.append(StepWarning(
                    "slow_step", step,
                    f"{1000 * step_s:.0f} ms vs median {1000 * slow['median_s']:.0f} ms "
                    f"(cause: {slow['cause']}): {advice}",
                ))
                log.warning("slow step %d: %s", step, warnings[-1].message)

        if not (self.should_log(step) or warnings):
            return warnings
        point = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr}
        point.update({f"train/grad_norm/{k}": v for k, v in groups.items()})
        if data_wait_s is not None:
            point["perf/data_wait_ms"] = 1000 * data_wait_s
        if timed:
            point["perf/step_time_ms"] = 1000 * step_s
            if batch_size:
                point["perf/samples_per_s"] = batch_size / step_s
            if self.total_steps is not None:
                point["perf/eta_s"] = self.timer.eta_s(self.total_steps - step)
        if self.device is not None:
            memory = memory_metrics(self.device)  # empty off CUDA
            point.update(memory)
            if "perf/gpu_mem_allocated_gib" in memory:
                self.health.record(step, gpu_mem_gib=memory["perf/gpu_mem_allocated_gib"])
            used = memory.get("perf/gpu_mem_used_fraction", 0.0)
            if used > self.timer.cfg.memory_warning_fraction:
                warnings.append(StepWarning(
                    "memory", step,
                    f"device memory {100 * used:.0f}% of capacity: lower the batch size, or "
                    f"use activation checkpointing",
                ))
                log.warning("step %d: %s", step, warnings[-1].message)
        if self.health.cfg.enabled:
            point.update(self.health.metrics())
        point.update({k: float(v) for k, v in (metrics or {}).items()})
        self.tracker.log_metrics(point, step=step)
        return warnings

    def report(self, *, plot: str | Path | None = None) -> tuple[dict, str]:
        """``(report, markdown)``: the health report the trainer writes to
        ``health/report.json`` and ``health/report.md`` (status, every check's evidence and
        suggestion, anomaly steps, the plotted series, the latest slow steps); with ``plot``,
        also the health plot as a PNG at that path."""
        report = self.health.report()
        report["slow_steps"] = self.timer.slow_steps[-20:]
        if plot is not None:
            from pipeline.monitor.plots import save_health_plot

            save_health_plot(report, plot)
        return report, report_markdown(report)

    def log_report(self, *, plot: bool = True) -> tuple[dict, str]:
        """:meth:`report`, sent to the tracker as ``health/report.json``,
        ``health/report.md`` and (with ``plot``) ``plots/health.png``; returns it. Nothing is
        sent when the health checks are off (``health.enabled`` false)."""
        report, markdown = self.report()
        if not self.health.cfg.enabled:
            return report, markdown
        self.tracker.log_text(json.dumps(report, indent=2, default=float), "health/report.json")
        self.tracker.log_text(markdown, "health/report.md")
        if plot:
            from pipeline.monitor.plots import plot_health

            figure = plot_health(report)
            if figure is not None:
                self.tracker.log_figure(figure, "plots/health.png")
        return report, markdown


def build_monitor(
    config: Config,
    *,
    steps_per_epoch: int,
    total_steps: int | None = None,
    tracker: Tracker | None = None,
    device: torch.device | str | None = None,
) -> TrainingMonitor:
    """A :class:`TrainingMonitor` with the config's thresholds (``health``, ``monitor``), peak
    LR (``optim.lr``), warmup (``scheduler``, over ``steps_per_epoch``) and logging interval
    (``tracking.log_every_steps``)."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, but got {type(config).__name__}.")
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be at least 1, but got steps_per_epoch={steps_per_epoch}."
        )
    return TrainingMonitor(
        base_lr=config.optim.lr,
        warmup_steps=warmup_steps(config.scheduler, steps_per_epoch),
        total_steps=total_steps,
        log_every_steps=config.tracking.log_every_steps,
        health=config.health,
        perf=config.monitor,
        tracker=tracker,
        device=device,
    )


def _host_floats(values: list[float | torch.Tensor]) -> list[float]:
    """``values`` as Python floats; the tensors among them are read in one host sync."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    for tensor in tensors:
        if tensor.numel() != 1:
            raise ValueError(f"expected one-element tensors, but got shape {tuple(tensor.shape)}.")
    read = iter(torch.stack([t.detach().reshape(()).float() for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]
