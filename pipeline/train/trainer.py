"""The training loop: ``train(config) -> TrainResult`` and the :class:`Trainer` behind it.

``Trainer.fit`` reads as its phases: resume, then per epoch: train windows of micro-batches
(forward/backward with accumulation, finite check, clip, step), recover (roll back after
non-finite updates in a row), log, checkpoint, validate, stop. Components decide when they act
(``should_*``); recovery is explicit and counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config.loader import model_hash, to_dict
from pipeline.config.schema import Config
from pipeline.errors import CheckpointError, DiskFullError, PipelineError
from pipeline.model import build_model
from pipeline.monitor.grads import grad_norms_by_group, module_groups
from pipeline.monitor.health import HealthMonitor, report_markdown
from pipeline.monitor.perf import PhaseTimer, StepTimer, memory_metrics
from pipeline.monitor.plots import HealthPlotWriter
from pipeline.monitor.progress import StepProgress
from pipeline.monitor.run_report import HISTORY_PREFIXES, host_memory_metrics, write_run_report
from pipeline.train import runtime
from pipeline.train.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from pipeline.train.faults import FaultInjector
from pipeline.train.schedule import WarmupPlateau
from pipeline.train.validate import Validator

log = logging.getLogger(__name__)

#: ``on_validation(samples_seen, metrics) -> "prune" | None``: lets the tuner stop a trial.
ValidationCallback = Callable[[int, dict[str, float]], str | None]


class Interrupted(Exception):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint written")
        self.signum = signum


class NonFiniteStop(PipelineError):
    """Too many non-finite updates in a row (or rollbacks that did not help): the run stopped
    with a health report."""


@dataclass
class TrainResult:
    run_id: str | None
    status: str  # finished | early_stopped | pruned
    step: int
    epoch: int
    samples_seen: int
    best_metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    health_status: str = "healthy"
    run_dir: str = ""


def train(
    config: Config,
    *,
    resume: str | None = None,
    run_id: str | None = None,
    continue_run: str | None = None,
    parent_run_id: str | None = None,
    on_validation: ValidationCallback | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a Diffold model as ``config`` says; the CLI, the tuner and the tests call this.

    ``resume`` is ``"auto"`` (newest valid checkpoint under ``output_dir``), a checkpoint path,
    or ``None`` (fresh run). ``run_id`` logs into an existing MLflow run (``mlflow run`` sets
    ``MLFLOW_RUN_ID``); ``parent_run_id`` makes the run a child (a tuning trial).
    ``continue_run`` (``train --run-id``) continues that MLflow run from its newest checkpoint:
    a local one under ``output_dir``, else its uploaded ``checkpoints/last.pt`` (a run moved to
    another machine); with ``resume`` a path, from that checkpoint.
    """
    entered = time.monotonic()
    runtime.check_output_dir(config)
    if config.tracking.enabled and not config.tracking.offline:
        from pipeline.tracking.mlflow_tracker import check_reachable, tracking_uri

        check_reachable(tracking_uri())  # before any work: one line, no run created
    ctx = runtime.setup(config)
    checkpoint = _find_resume_checkpoint(config, resume, continue_run=continue_run, ctx=ctx)
    trainer = Trainer(
        config,
        ctx,
        checkpoint=checkpoint,
        run_id=continue_run or run_id,
        parent_run_id=parent_run_id,
        on_validation=on_validation,
        extra_tags=extra_tags or {},
        entered=entered,
    )
    try:
        return trainer.fit()
    finally:
        runtime.teardown(ctx)


def _find_resume_checkpoint(
    config: Config, resume: str | None, *, continue_run: str | None, ctx: runtime.Runtime
) -> dict | None:
    from pipeline.train.checkpoint import find_latest

    if continue_run is not None and resume in (None, "auto"):
        # Rank 0 alone looks (and downloads); every rank loads what it found.
        found = str(runtime.run_checkpoint(config, continue_run)) if ctx.rank == 0 else None
        path = Path(runtime.broadcast_object(found, ctx))
    elif resume is None:
        return None
    elif resume == "auto":
        path = find_latest(Path(config.output_dir), model_hash=model_hash(config))
        if path is None:
            log.info("--resume auto: no valid checkpoint of this model under %s; starting fresh",
                     config.output_dir)
            return None
    else:
        path = Path(resume)
    state = load_checkpoint(path)
    if state.get("model_hash") != model_hash(config):
        raise CheckpointError(
            f"checkpoint {path}: written for another model configuration "
            f"(model hash {state.get('model_hash')} != {model_hash(config)})"
        )
    log.info("resuming from %s (step %d)", path, state["step"])
    state["path"] = str(path)
    if path.parent.name == "checkpoints":
        # The run directory is where the checkpoint now is (moved, or downloaded to another
        # machine), not where it was written.
        state["run_dir"] = str(path.parent.parent)
    return state


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ctx: runtime.Runtime,
        *,
        checkpoint: dict | None,
        run_id: str | None,
        parent_run_id: str | None,
        on_validation: ValidationCallback | None,
        extra_tags: dict[str, Any],
        entered: float | None = None,
    ):
        entered = time.monotonic() if entered is None else entered
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.on_validation = on_validation
        parts = runtime.build_components(cfg, ctx)
        self.model, self.ddp_model = parts.model, parts.ddp_model
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.loader, self.val_batches = parts.train_loader, parts.val_batches
        self.steps_per_epoch, self.total_steps = parts.steps_per_epoch, parts.total_steps
        self.data_stats = parts.data_stats
        self.faults = FaultInjector(cfg.faults)
        self.timer = StepTimer(cfg.monitor)
        self.phases = PhaseTimer(
            self.device, cfg.monitor.timing_every_steps or cfg.tracking.log_every_steps
        )
        self.grad_groups = module_groups(self.model)  # per-group pre-clip norms on logged steps
        self.health = HealthMonitor(
            cfg.health, base_lr=cfg.optim.lr, warmup_steps=parts.warmup_steps
        )
        # Loop state (all of it goes into checkpoints).
        self.step = 0
        self.epoch = 0
        self.samples_seen = 0
        self.batch_in_epoch = 0
        self.split = 1  # micro-batches are split in this many chunks after OOMs
        self._last_oom_step = 0
        self.best_metric: float | None = None
        self.bad_validations = 0
        self.counts = {"oom_recoveries": 0, "non_finite_skipped": 0, "slow_steps": 0,
                       "rollbacks": 0}
        self.consecutive_non_finite = 0
        self.lr_scale = 1.0  # product of the rollback LR factors in effect
        self._non_finite_action: str | None = None  # "stop" | "rollback", set by a streak
        self._rollbacks_without_progress = 0
        self._rollback_failed_at: int | None = None  # the step a rollback must get past
        self._resumed_from: Path | None = None
        self.last_val: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._stop_signal: int | None = None
        self._stop_reason: str | None = None
        self._window_wait = 0.0  # seconds blocked on the loader for the current window
        self._started = time.monotonic()
        self.checkpoint_stall_s = 0.0
        self._validated_at: int | None = None

        if checkpoint is not None:
            self._restore(checkpoint)
            self._resumed_from = Path(checkpoint["path"]) if checkpoint.get("path") else None
            run_dir = Path(checkpoint["run_dir"])
            run_id = run_id or checkpoint.get("run_id")
        else:
            run_dir = runtime.new_run_dir(cfg, ctx)
        self.run_dir = run_dir
        self.tracker = runtime.build_run_tracker(
            cfg, ctx, run_id=run_id, parent_run_id=parent_run_id, extra_tags=extra_tags,
            run_dir=run_dir,
        )
        self.checkpoints = CheckpointManager(
            run_dir / "checkpoints",
            keep_last=cfg.trainer.keep_last,
            on_written=self._upload_checkpoint if cfg.tracking.log_checkpoints else None,
            write_delay_s=cfg.faults.checkpoint_write_delay_s,
            writer=self._checkpoint_writer(),
        )
        self.validator = Validator(cfg, self.model, self.val_batches, self.device, ctx.autocast)
        self.plots = HealthPlotWriter(
            run_dir / "plots" / "health.png",
            on_written=lambda path: self.tracker.log_artifact(path, "plots"),
        )
        self.progress = StepProgress(self.total_steps, initial=self.step)  # drawn on a TTY only
        if checkpoint is None and ctx.rank == 0:
            runtime.log_run_inputs(self.tracker, cfg, run_dir, self.data_stats)
        elif checkpoint is not None:
            self.tracker.resend(checkpoint.get("tracking_unsent", []))
        # Start-up, logged once at the first step (_log_startup): set-up until here, then the
        # first batch and the first step of this process.
        self._startup: dict[str, float] | None = {"setup_s": time.monotonic() - entered}
        log.info(
            "run %s: %d steps/epoch, %d optimizer steps in all, output %s",
            self.tracker.run_id or "(untracked)",
            self.steps_per_epoch,
            self.total_steps,
            run_dir,
        )

    # ================================================================== phases
    def fit(self) -> TrainResult:
        status = "FAILED"
        self._fit_started = time.monotonic()
        try:
            with self._signal_handlers(), self.progress:
                while not self.should_stop():
                    self.train_epoch()
                    self.end_epoch()
            status = "FINISHED"
            return self._finish()
        except Interrupted:
            status = "KILLED"
            raise
        except BaseException as exc:
            self._save_on_failure(exc)
            self._tag_error(exc)
            raise
        finally:
            self.loader.close()  # worker processes end with the run, not at a later GC
            self._close_tracker(status)

    def train_epoch(self) -> None:
        self.loader.set_epoch(self.epoch)
        n_batches = len(self.loader)
        window: list[dict] = []
        for batch in self.loader:
            if self._startup is not None and "first_batch_s" not in self._startup:
                self._startup["first_batch_s"] = time.monotonic() - self._fit_started
            window.append(batch)
            self._window_wait += getattr(self.loader, "last_wait_s", 0.0)
            self.batch_in_epoch += 1
            at_end = self.batch_in_epoch >= n_batches
            if len(window) < self.cfg.trainer.accumulation_steps and not at_end:
                continue
            self.optimizer_step(window)
            window = []
            if self.maybe_recover_non_finite():
                return  # rolled back: the epoch loop continues from the restored position
            self.after_step()
            if self.should_stop():
                return

    def optimizer_step(self, window: list[dict]) -> None:
        start = time.perf_counter()
        data_wait, self._window_wait = self._window_wait, 0.0
        step = self.step + 1  # the step being computed
        self.phases.begin(step, data_wait)  # sampled steps only: events/stamps, no sync
        n_structures = sum(len(b["names"]) for b in window)
        loss, terms = self._forward_backward_with_recovery(window, n_structures)
        self.phases.mark()  # end of compute (forward + backward)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Per-group norms on logged steps only; they ride on the one sync below.
        groups = grad_norms_by_group(self.grad_groups) if self.should_log(step) else {}
        clip = self.cfg.trainer.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # pre-clip
        # One host sync per optimizer step: the update must not happen on non-finite values.
        # The time-limit vote rides on the same all-reduce, so DDP ranks stop together.
        limit = self.cfg.trainer.time_limit_minutes
        over_time = limit is not None and time.monotonic() - self._started > 60 * limit
        stats = torch.stack(
            [loss.float(), grad_norm.float(), torch.tensor(float(over_time), device=loss.device),
             *groups.values()]
        )
        stats = runtime.all_reduce_mean(stats, self.ctx)
        loss_value, grad_norm_value, over_time_vote, *group_values = stats.tolist()
        group_norms = dict(zip(groups, group_values))
        if over_time_vote > 0:
            self._stop_reason = "time_limit"
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.consecutive_non_finite = 0
            self._note_progress(step)
        else:
            self._skip_non_finite(step, loss_value, grad_norm_value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.phases.mark()  # end of optimizer (unscale, clip, finite check, step)
        self.step = step
        self.samples_seen += n_structures * self.ctx.world_size
        if self._startup is not None:
            self._log_startup()
        step_s = time.perf_counter() - start + data_wait
        fired = self.health.observe(
            step, loss=loss_value, grad_norm=grad_norm_value, lr=lr,
            group_norms=group_norms or None,
            samples_per_s=n_structures * self.ctx.world_size / step_s,
            data_wait_s=data_wait, step_s=step_s,
        )
        for name in fired:
            check = self.health.checks[name]
            if check.count == 1 or check.count % 50 == 0:  # say it, without flooding the log
                log.warning("health: %s (%d so far): %s", name, check.count, check.suggestion)
        slow = self.timer.observe(step, step_s=step_s, data_wait_s=data_wait)
        if slow:
            self.counts["slow_steps"] += 1
            log.warning("slow step %d: %.0f ms vs median %.0f ms (cause: %s)", step,
                        1000 * slow["step_s"], 1000 * slow["median_s"], slow["cause"])
        if self.should_log() or fired:
            self._log_step(loss_value, terms, grad_norm_value, group_norms, lr, step_s, data_wait,
                           window)
        self.progress.update(step, loss=loss_value, lr=lr, health=self.health.overall_status,
                             samples_per_s=n_structures * self.ctx.world_size / step_s)
        self.phases.mark()  # end of logging (health checks, timers, metrics)
        for timed_step, times in self.phases.ready():  # CUDA: steps whose events completed
            self.tracker.log_metrics(times, step=timed_step)
            self._remember(times, step=timed_step)

    def _log_startup(self) -> None:
        """Where a run's start goes, logged once, at the first step of the process:
        ``perf/setup_s`` (``train()`` to a ready trainer: device, data, model, optimizer, the
        MLflow run), then from the start of the loop ``perf/first_batch_s`` (the loader's
        workers starting and the first batches made) and ``perf/first_step_s`` (to the end of
        the first optimizer step, the device's warm-up included). In a tuning study every
        trial pays them before its first report."""
        self._startup["first_step_s"] = time.monotonic() - self._fit_started
        self.tracker.log_metrics({f"perf/{k}": v for k, v in self._startup.items()},
                                 step=self.step)
        log.info("start-up: %s", ", ".join(f"{k} {v:.2f}" for k, v in self._startup.items()))
        self._startup = None

    def after_step(self) -> None:
        self.faults.after_step(self.step)
        if self.should_checkpoint():
            self.save_checkpoint()
        if self.health.cfg.enabled and self.step % self.health.cfg.report_every_steps == 0:
            self._log_health_report()
        if self._stop_signal is not None:
            self.save_checkpoint(blocking=True)
            self.tracker.set_tags({"stop_reason": signal.Signals(self._stop_signal).name})
            raise Interrupted(self._stop_signal)

    def end_epoch(self) -> None:
        finished_epoch = self.batch_in_epoch >= len(self.loader)
        if not finished_epoch:
            return  # stopped mid-epoch (max_steps, a stop request or a rollback)
        self.epoch += 1
        self.batch_in_epoch = 0
        if self.should_validate():
            self.validate()
        every = self.cfg.trainer.checkpoint_every_epochs
        # not while updates are being skipped: see should_checkpoint
        if every and self.epoch % every == 0 and self.consecutive_non_finite == 0:
            self.save_checkpoint()

    def maybe_recover_non_finite(self) -> bool:
        """After ``recovery.max_consecutive_non_finite`` skipped updates in a row (or one, with
        ``recovery.non_finite=stop``): roll back to the last checkpoint at a lower LR (returns
        True) or stop with :class:`NonFiniteStop` and a health report."""
        action, self._non_finite_action = self._non_finite_action, None
        if action is None:
            return False
        recovery = self.cfg.recovery
        streak = (f"{self.consecutive_non_finite} non-finite update(s) in a row "
                  f"(recovery.non_finite={recovery.non_finite})")
        if action == "stop":
            self._stop_non_finite(streak)
        if self._rollbacks_without_progress >= recovery.max_rollbacks:
            self._stop_non_finite(
                f"{streak} after {self._rollbacks_without_progress} rollback(s) that did not get "
                f"past step {self._rollback_failed_at} (recovery.max_rollbacks="
                f"{recovery.max_rollbacks}; LR now x{self.lr_scale:g} of the schedule)"
            )
        target = self._rollback_target()
        if target is None:
            self._stop_non_finite(
                f"{streak} and no checkpoint to roll back to yet (the first is written after "
                f"trainer.checkpoint_every_steps steps or after trainer.checkpoint_every_epochs "
                f"epochs)"
            )
        self._roll_back(target)
        return True

    def validate(self) -> dict[str, float]:
        self._validated_at = self.step
        metrics = self.validator.run(self.epoch) if self.ctx.rank == 0 else {}
        self.last_val = metrics
        self.tracker.log_metrics(metrics, step=self.step)
        self._remember(metrics)
        es = self.cfg.trainer.early_stopping
        # Every rank follows rank 0's validation, so that a plateau schedule's LR agrees.
        value = runtime.broadcast_object(metrics.get(es.metric), self.ctx)
        if value is not None:
            if isinstance(self.scheduler, WarmupPlateau):
                self.scheduler.observe(value)
            better = self.best_metric is None or (
                value > self.best_metric + es.min_delta
                if es.mode == "max"
                else value < self.best_metric - es.min_delta
            )
            if better:
                self.best_metric = value
                self.bad_validations = 0
                self.save_checkpoint(name="best.pt")
            else:
                self.bad_validations += 1
        if es.enabled and self.bad_validations >= es.patience:
            self._stop_reason = "early_stopped"
        if self.on_validation is not None and self.ctx.rank == 0:
            if self.on_validation(self.samples_seen, metrics) == "prune":
                self._stop_reason = "pruned"
        self._stop_reason = runtime.broadcast_object(self._stop_reason, self.ctx)
        log.info(
            "epoch %d step %d: %s",
            self.epoch,
            self.step,
            " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
        )
        return metrics

    # ================================================================== decisions
    def should_stop(self) -> bool:
        if self._stop_reason is not None:
            return True
        if self.cfg.trainer.max_steps is not None and self.step >= self.cfg.trainer.max_steps:
            return True
        return self.epoch >= self.cfg.trainer.epochs

    def should_log(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the last completed one) logs its train/* metrics."""
        step = self.step if step is None else step
        return step % self.cfg.tracking.log_every_steps == 0 or step == 1

    def should_checkpoint(self) -> bool:
        every = self.cfg.trainer.checkpoint_every_steps
        # Not while updates are being skipped: a rollback's checkpoint must predate the streak.
        return every is not None and self.step % every == 0 and self.consecutive_non_finite == 0

    def should_validate(self) -> bool:
        last_epoch = self.epoch >= self.cfg.trainer.epochs or (
            self.cfg.trainer.max_steps is not None and self.step >= self.cfg.trainer.max_steps
        )
        return self.epoch % self.cfg.trainer.eval_every_epochs == 0 or last_epoch

    # ================================================================== step internals
    def _forward_backward_with_recovery(
        self, window: list[dict], n_structures: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grow_back = self.cfg.recovery.grow_back_after_steps
        if self.split > 1 and grow_back is not None and self.step - self._last_oom_step >= grow_back:
            self.split //= 2  # stable for a while: try larger chunks again
            self._last_oom_step = self.step
            log.info("no OOM for %d steps: micro-batches now run in %d chunk(s)", grow_back,
                     self.split)
        for attempt in range(self.cfg.recovery.max_oom_retries + 1):
            try:
                return self._forward_backward(window, n_structures)
            except torch.OutOfMemoryError as exc:
                self._last_oom_step = self.step
                self.optimizer.zero_grad(set_to_none=True)
                runtime.free_memory(self.device)
                largest = max(len(b["names"]) for b in window)
                can_split = self.cfg.recovery.oom and largest > self.split
                if not can_split or attempt == self.cfg.recovery.max_oom_retries:
                    raise
                self.split *= 2
                self.counts["oom_recoveries"] += 1
                self.health.mark("oom_recovery", self.step + 1)
                log.warning(
                    "OOM at step %d (micro-batch %d, crop %d): retrying the same samples in "
                    "%d chunks per micro-batch (%s)",
                    self.step + 1,
                    largest,
                    max(int(b["lengths"].max()) for b in window),
                    self.split,
                    str(exc).splitlines()[0],
                )
        raise AssertionError("unreachable")

    def _forward_backward(
        self, window: list[dict], n_structures: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Accumulate gradients of the sample-weighted mean loss over the whole window."""
        chunks = [c for b in window for c in split_batch(b, self.split)]
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            weight = len(chunk["names"]) / n_structures
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last else runtime.no_sync(self.ddp_model)
            self.faults.before_forward(self.step + 1)
            with sync:
                with self.ctx.autocast():
                    out = self.ddp_model(chunk)
                loss = self.faults.corrupt_loss(self.step + 1, out["loss"].float())
                scaled = loss * weight
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total = total + loss.detach() * weight
            for name, value in out["terms"].items():
                terms[name] = terms.get(name, 0.0) + value.detach().float() * weight
        return total, terms

    def _skip_non_finite(self, step: int, loss: float, grad_norm: float) -> None:
        self.counts["non_finite_skipped"] += 1
        self.consecutive_non_finite += 1
        log.warning(
            "step %d: non-finite loss %s / grad norm %s: update skipped (%d in a row)",
            step,
            loss,
            grad_norm,
            self.consecutive_non_finite,
        )
        if self.scaler is not None:
            self.scaler.update()  # lowers the fp16 loss scale, as GradScaler does
        recovery = self.cfg.recovery
        if recovery.non_finite == "stop" or (
            self.consecutive_non_finite >= recovery.max_consecutive_non_finite
        ):  # acted on once the step is complete (maybe_recover_non_finite)
            self._non_finite_action = "rollback" if recovery.non_finite == "rollback" else "stop"

    def _note_progress(self, step: int) -> None:
        """A finite update at or past the step where the last rollback's streak ended: the
        rollbacks helped and no longer count towards ``recovery.max_rollbacks``."""
        if self._rollback_failed_at is not None and step >= self._rollback_failed_at:
            log.info("step %d: past step %d after %d rollback(s)", step,
                     self._rollback_failed_at, self._rollbacks_without_progress)
            self._rollbacks_without_progress = 0
            self._rollback_failed_at = None

    def _stop_non_finite(self, reason: str) -> None:
        message = f"training stopped at step {self.step}: {reason}; see health/report.md"
        self._log_health_report(stopped=message)
        raise NonFiniteStop(message)

    def _rollback_target(self) -> Path | None:
        """The newest step checkpoint of this run (rank 0's, for every rank), else the one it
        resumed from; ``None`` before the first."""
        found = None
        if self.ctx.rank == 0:
            self.checkpoints.wait()
            last = self.checkpoints.last_path or self._resumed_from
            found = str(last) if last is not None and last.is_file() else None
        found = runtime.broadcast_object(found, self.ctx)
        return Path(found) if found else None

    def _roll_back(self, path: Path) -> None:
        """Restore ``path`` by the resume path (model, optimizer, scheduler, scaler, loader
        position, RNG, step) and scale the LR schedule by ``recovery.rollback_lr_factor``.
        Kept across it: the counters, the OOM split, the best metric (it names best.pt) and
        the health history (the skipped steps stay marked)."""
        failed_at, streak = self.step, self.consecutive_non_finite
        kept = {key: getattr(self, key) for key in
                ("split", "_last_oom_step", "best_metric", "bad_validations")}
        counts = dict(self.counts)
        scale = self.lr_scale * self.cfg.recovery.rollback_lr_factor
        self._restore(load_checkpoint(path))  # sets lr_scale to the checkpoint's
        runtime.rescale_lr(self.optimizer, self.scheduler, scale / self.lr_scale)
        self.lr_scale = scale
        for key, value in kept.items():
            setattr(self, key, value)
        self.counts = counts
        self.counts["rollbacks"] += 1
        self._rollbacks_without_progress += 1
        self._rollback_failed_at = max(failed_at, self._rollback_failed_at or 0)
        self.consecutive_non_finite = 0
        self._window_wait = 0.0
        self.health.mark("rollback", failed_at)
        self.health.forget_after(self.step)
        for key, points in self.history.items():
            self.history[key] = [(s, v) for s, v in points if s <= self.step]
        lr = self.optimizer.param_groups[0]["lr"]
        log.warning(
            "rollback %d: %d non-finite updates in a row up to step %d; restored the checkpoint "
            "of step %d (%s) with the LR scaled by %g: lr now %.3g (x%g of the schedule)",
            self.counts["rollbacks"], streak, failed_at, self.step, path,
            self.cfg.recovery.rollback_lr_factor, lr, self.lr_scale,
        )
        self.tracker.log_metrics(
            {"recovery/rollbacks": float(self.counts["rollbacks"]), "recovery/lr_scale": scale},
            step=failed_at,
        )

    def _log_step(self, loss, terms, grad_norm, group_norms, lr, step_s, data_wait,
                  window) -> None:
        residues = sum(int(b["lengths"].sum()) for b in window) * self.ctx.world_size
        structures = sum(len(b["names"]) for b in window) * self.ctx.world_size
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            **{f"train/grad_norm/{k}": v for k, v in group_norms.items()},
            "train/epoch": self.epoch + self.batch_in_epoch / max(len(self.loader), 1),
            "train/samples_seen": float(self.samples_seen),
            "perf/step_time_ms": 1000 * step_s,
            "perf/data_wait_ms": 1000 * data_wait,
            "perf/samples_per_s": structures / step_s,
            "perf/residues_per_s": residues / step_s,
            "perf/micro_batch_size": float(self.cfg.trainer.micro_batch_size // self.split),
            "perf/eta_s": self.timer.eta_s(self.total_steps - self.step),
            **{f"train/loss/{k}": float(v) for k, v in terms.items()},
            **{f"recovery/{k}": float(v) for k, v in self.counts.items()},
            **memory_metrics(self.device),
            **host_memory_metrics(),
        }
        if "perf/gpu_mem_allocated_gib" in metrics:
            self.health.record(self.step, gpu_mem_gib=metrics["perf/gpu_mem_allocated_gib"])
        used = metrics.get("perf/gpu_mem_used_fraction", 0.0)
        if used > self.cfg.monitor.memory_warning_fraction:
            self.counts["memory_pressure"] = self.counts.get("memory_pressure", 0) + 1
            log.warning(
                "device memory %.0f%% of capacity at step %d (micro-batch %d): lower "
                "trainer.micro_batch_size or use the memory scenario",
                100 * used, self.step, self.cfg.trainer.micro_batch_size // self.split,
            )
        if self.health.cfg.enabled:
            metrics.update(self.health.metrics())
        self.tracker.log_metrics(metrics, step=self.step)
        self._remember({k: v for k, v in metrics.items() if k.startswith(HISTORY_PREFIXES)})
        log.info(
            "step %d/%d loss %.4f lr %.3g grad %.3g %.0f ms",
            self.step,
            self.total_steps,
            loss,
            lr,
            grad_norm,
            1000 * step_s,
        )

    def _remember(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, float(value)))

    # ================================================================== checkpoints
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "data": self.loader.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "best_metric": self.best_metric,
            "bad_validations": self.bad_validations,
            "split": self.split,
            "last_oom_step": self._last_oom_step,
            "counts": dict(self.counts),
            "lr_scale": self.lr_scale,
            "model_hash": model_hash(self.cfg),
            "config": to_dict(self.cfg),
            "run_id": self.tracker.run_id,
            "run_dir": str(self.run_dir),
            # Logged but not yet in MLflow: a resume sends them (the re-run steps come after).
            "tracking_unsent": self.tracker.unsent_points(),
        }

    def _checkpoint_writer(self) -> str:
        """``trainer.checkpoint_writer`` resolved: ``auto`` writes from a process where it pays,
        on rank 0 (the only rank that saves) of a CUDA run."""
        writer = self.cfg.trainer.checkpoint_writer
        if writer == "auto":
            cuda_rank0 = self.device.type == "cuda" and self.ctx.rank == 0
            writer = "process" if cuda_rank0 else "thread"
        return writer

    def save_checkpoint(self, *, blocking: bool = False, name: str | None = None) -> None:
        if self.ctx.rank == 0:
            start = time.perf_counter()
            self.checkpoints.save(self._state(), self.step, blocking=blocking, name=name)
            # The training thread's stall: waiting for the previous write, the state dicts and
            # the device-to-host snapshot (the write itself runs in the background).
            stall = time.perf_counter() - start
            self.checkpoint_stall_s += stall
            self.tracker.log_metrics({"perf/checkpoint_stall_ms": 1000 * stall}, step=self.step)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        old_lr = state["config"]["optim"]["lr"]
        if old_lr != self.cfg.optim.lr:
            runtime.rescale_lr(self.optimizer, self.scheduler, self.cfg.optim.lr / old_lr)
            log.info(
                "optim.lr changed on resume (%g -> %g): the schedule continues at its position, "
                "scaled; optimizer moments are kept; warmup is not restarted",
                old_lr, self.cfg.optim.lr,
            )
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        for key in ("step", "epoch", "batch_in_epoch", "samples_seen", "best_metric",
                    "bad_validations", "split"):
            setattr(self, key, state[key])
        self.counts.update(state["counts"])
        self._last_oom_step = state.get("last_oom_step", 0)
        self.lr_scale = state.get("lr_scale", 1.0)

    def _save_on_failure(self, exc: BaseException) -> None:
        """A failing run checkpoints first (unless the weights themselves are bad)."""
        if isinstance(exc, (NonFiniteStop, KeyboardInterrupt, DiskFullError)) or self.step == 0:
            return
        try:
            self.checkpoints.wait()
        except Exception:  # the failed background write is reported by the original error
            pass
        try:
            if all(torch.isfinite(p).all() for p in self.model.parameters()):
                self.save_checkpoint(blocking=True)
                log.error("run failed at step %d; checkpoint written: %s", self.step,
                          self.checkpoints.last_path)
        except Exception as save_error:
            log.error("could not write a checkpoint after the failure: %s", save_error)

    # ================================================================== end of run
    def _finish(self) -> TrainResult:
        if self._validated_at != self.step and self._stop_reason != "pruned":
            self.validate()  # stopped mid-epoch (max_steps, time limit): score the final weights
        if self.ctx.rank == 0 and self.checkpoints.last_path != self._expected_last_path():
            self.save_checkpoint(blocking=True)
        self.checkpoints.wait()
        for timed_step, times in self.phases.ready(wait=True):
            self.tracker.log_metrics(times, step=timed_step)
            self._remember(times, step=timed_step)
        elapsed = time.monotonic() - self._started
        end_metrics = {
            "perf/checkpoint_stall_total_s": self.checkpoint_stall_s,
            "perf/checkpoint_stall_share": self.checkpoint_stall_s / max(elapsed, 1e-9),
            "perf/train_wall_s": elapsed,
        }
        self.tracker.log_metrics(end_metrics, step=self.step)
        self._remember(end_metrics)
        self._log_health_report()
        self.plots.wait()  # matplotlib's text layout is not thread-safe: one figure at a time
        if self.draws_plots():
            runtime.log_training_plot(self.tracker, self.history)
        if self._stop_reason != "pruned":
            self._log_model()
        status = self._stop_reason or "finished"
        self.tracker.set_tags({"status": status, "health": self.health.overall_status})
        return TrainResult(
            run_id=self.tracker.run_id,
            status=status,
            step=self.step,
            epoch=self.epoch,
            samples_seen=self.samples_seen,
            best_metric=self.best_metric,
            metrics=dict(self.last_val),
            checkpoint=str(self.checkpoints.last_path) if self.checkpoints.last_path else None,
            health_status=self.health.overall_status,
            run_dir=str(self.run_dir),
        )

    def _log_model(self) -> None:
        """The best weights (``best.pt``, else the final ones) as the run's model ``model``."""
        if self.ctx.rank != 0 or self.tracker.run_id is None:
            return
        model = build_model(self.cfg.model)  # on the CPU, so that it loads anywhere
        best = self.checkpoints.directory / "best.pt"
        if best.is_file():
            state = load_checkpoint(best)
            model.load_state_dict(state["model"])
            step = state["step"]
        else:
            model.load_state_dict(self.model.state_dict())
            step = self.step
        self.tracker.log_model(
            model.eval(), "model", step=step,
            registered_model_name=self.cfg.tracking.register_model,
        )

    def _expected_last_path(self) -> Path:
        return self.checkpoints.directory / f"step-{self.step:08d}.pt"

    def _log_health_report(self, *, stopped: str | None = None) -> None:
        """health/report.{json,md} now, and plots/health.png drawn from it (in the background)."""
        if not self.health.cfg.enabled or self.ctx.rank != 0:
            return
        report = self.health.report()
        report["recovery"] = dict(self.counts)
        report["slow_steps"] = self.timer.slow_steps[-20:]
        if stopped is not None:
            report["stopped"] = stopped
        runtime.write_health_report(self.tracker, self.run_dir, report, report_markdown(report))
        if self.draws_plots():
            self.plots.submit(report)

    def draws_plots(self) -> bool:
        """Whether figures are drawn now (``tracking.plots``; a pruned trial draws none)."""
        mode = self.cfg.tracking.plots
        return mode == "always" or (mode == "unless_pruned" and self._stop_reason != "pruned")

    def _upload_checkpoint(self, path: Path) -> None:
        """Called where the checkpoint was written, once it and its checksum are complete."""
        self.tracker.log_checkpoint(path, "best.pt" if path.name == "best.pt" else "last.pt")

    def _tag_error(self, exc: BaseException) -> None:
        """Tag the run ``error`` = ``<type>: <first line of the message>`` (500 characters)."""
        try:
            self.tracker.set_tags({"error": error_tag(exc)})
        except Exception as tag_error:  # the tracker's failure must not hide the run's
            log.warning("could not tag the run with its error: %s", tag_error)

    def _close_tracker(self, status: str) -> None:
        if status == "FINISHED" and self._stop_reason == "pruned":
            status = "KILLED"
        try:
            write_run_report(self, status)  # plots/*.png and summary.md; never raises
            self.plots.wait()
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()
            self.tracker.close(status)

    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGTERM/SIGINT: finish the current step, checkpoint, flush, exit non-zero."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            log.warning("%s received: stopping after this step", signal.Signals(signum).name)
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def error_tag(exc: BaseException) -> str:
    """``<ExceptionType>: <first line of its message>``, at most 500 characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:500]


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Split a padded batch along structures into ``parts`` chunks, trimming extra padding."""
    n = len(batch["names"])
    if parts <= 1 or n <= 1:
        return [batch]
    size = math.ceil(n / parts)
    chunks = []
    for start in range(0, n, size):
        sl = slice(start, start + size)
        length = int(batch["lengths"][sl].max())
        chunk = {}
        for key, value in batch.items():
            if key == "names":
                chunk[key] = value[sl]
            elif key == "lengths":
                chunk[key] = value[sl]
            else:
                chunk[key] = value[sl, :length]
        chunks.append(chunk)
    return chunks
