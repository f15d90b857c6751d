"""An Optuna study over ``train(config)``.

* The search space (``configs/tune.yaml``) names dotted config keys; suggested values are merged
  over the base config (scenario/preset/--set) and validated like any config.
* Budget: by default every trial trains for the same number of epochs, so every trial sees the
  same samples whatever its accumulation steps; ``time_budget_minutes`` gives every trial the
  same wall time instead (then a faster input pipeline buys more training). Intermediate values
  are reported against *samples seen*, an axis that does not depend on accumulation, so the
  pruner compares like with like.
* ``objective: pareto`` optimises quality and throughput together (samples per second of trial
  wall time); the study keeps a Pareto front. Optuna cannot prune such studies.
* MLflow: one parent run for the study (under ``mlflow run`` that is the run it created; a
  resumed study goes on in its parent run); each trial is a child run created when the trial
  starts; pruned trials end KILLED with a tag, failed ones FAILED with the error.
* Storage: an Optuna journal file in the output directory by default (re-running with the same
  study name continues the study); any SQLAlchemy URL (e.g. PostgreSQL) with ``--storage``, with
  heartbeats so that the trial of a worker that died is failed and retried.
* Workers: ``--n-workers N`` starts N local worker processes (one per GPU when there are GPUs);
  on other hosts, ``--parent-run-id`` joins the same study and parent run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config.fields import spec
from pipeline.config.loader import (
    configs_dir,
    redact,
    from_dict,
    merge,
    nested,
    parse_section,
    read_yaml,
    to_dict,
    to_yaml,
)
from pipeline.config.schema import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.monitor.progress import TrialProgress
from pipeline.tracking import build_tracker

log = logging.getLogger(__name__)

#: Study user attribute: trials finished (complete, pruned or failed for good) at which the
#: local workers of one ``--n-workers`` launch stop.
_TARGET_ATTR = "target_finished_trials"
_PARENT_ATTR = "mlflow_parent_run_id"


@dataclass
class SearchParam:
    type: Literal["float", "int", "categorical"] = spec("float", help="kind of parameter")
    low: float | None = spec(None, help="lower bound (float, int)")
    high: float | None = spec(None, help="upper bound (float, int)")
    log: bool = spec(False, help="sample on a log scale")
    choices: list[int | float | str] | None = spec(None, help="values (categorical)")

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.choices or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


@dataclass
class TuneConfig:
    metric: str = spec("val/lddt", help="validation metric to optimise")
    direction: Literal["maximize", "minimize"] = spec("maximize", help="optimisation direction")
    prune_metric: str | None = spec(
        None, help="validation metric the pruner compares at each report (default: metric), "
        "e.g. val/loss: the training objective at fixed noise, a denser signal early on than "
        "a sampled val/lddt; the study still optimises metric"
    )
    prune_direction: Literal["maximize", "minimize"] | None = spec(
        None, help="whether a higher or lower prune_metric is better (required with a "
        "prune_metric other than metric)"
    )
    objective: Literal["quality", "pareto"] = spec(
        "quality", help="quality: the metric alone; pareto: the metric and samples/s together"
    )
    time_budget_minutes: float | None = spec(
        None, gt=0, help="give every trial this wall time (default: the same samples, epochs)"
    )
    sampler: Literal["tpe", "random"] = spec("tpe", help="Optuna sampler")
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = spec(
        "median",
        help="Optuna pruner; successive_halving keeps the best 1/reduction_factor of the trials "
        "at each rung (min_resource_samples, x reduction_factor, ...)",
    )
    n_startup_trials: int = spec(2, ge=0, help="trials completed before pruning starts")
    median_warmup_reports: int = spec(
        2, ge=0, help="median: reports a trial makes before it may be cut (the first reports "
        "rank trials poorly: a trial with warmup or accumulation starts low and may end best)"
    )
    min_resource_samples: int | None = spec(
        None, ge=1, help="hyperband, successive_halving: samples seen before a first cut "
        "(default: one validation interval of the synthetic set, data.n_train x "
        "trainer.eval_every_epochs)"
    )
    reduction_factor: int = spec(
        3, ge=2, help="hyperband, successive_halving: rung spacing and 1/(share promoted)"
    )
    n_trials: int = spec(20, ge=1, help="trials when --n-trials is not given")
    heartbeat_interval_s: int = spec(
        30, ge=1, help="database storages: seconds between a running trial's heartbeats"
    )
    grace_period_s: int | None = spec(
        None, ge=1, help="a trial without heartbeat this long has lost its worker (2x interval)"
    )
    max_retries: int = spec(1, ge=0, help="reruns of a trial whose worker died")
    enqueue: list[dict[str, Any]] = spec(
        [], help="parameter sets to try first (e.g. the current defaults)"
    )
    search_space: dict[str, SearchParam] = field(default_factory=dict)

    def validate(self) -> list[str]:
        errors = []
        if self.prune_metric not in (None, self.metric):
            if self.prune_direction is None:
                errors.append(f"prune_direction: required with prune_metric "
                              f"{self.prune_metric!r} (maximize or minimize)")
        elif self.prune_direction not in (None, self.direction):
            errors.append(f"prune_direction: {self.prune_direction!r} applies to a prune_metric "
                          f"other than metric ({self.metric!r}, direction {self.direction!r})")
        if not self.search_space:
            errors.append("search_space: expected at least one parameter")
        for key, p in self.search_space.items():
            where = f"search_space.{key}"
            if p.type == "categorical":
                if not p.choices:
                    errors.append(f"{where}.choices: required for a categorical parameter")
            elif p.low is None or p.high is None or p.low > p.high:
                errors.append(f"{where}: expected low <= high, got low={p.low} high={p.high}")
            elif p.log and p.low <= 0:
                errors.append(f"{where}.low: expected > 0 with log: true, got {p.low}")
        if errors:
            return errors
        for i, params in enumerate(self.enqueue):
            for key, value in params.items():
                p = self.search_space.get(key)
                if p is None:
                    errors.append(f"enqueue[{i}].{key}: not in search_space")
                elif not p.contains(value):
                    errors.append(f"enqueue[{i}].{key}: {value!r} is outside the search space")
        return errors


def load_tune_config(path: str | Path | None = None) -> TuneConfig:
    path = Path(path) if path else configs_dir() / "tune.yaml"
    return parse_section(TuneConfig, read_yaml(path, what="tune config"))


def _check_space(base: Config, tune: TuneConfig) -> None:
    """Every searched key must exist in the config and accept its range."""
    data = to_dict(base)
    for key, p in tune.search_space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in values:
            if p.type == "int":
                value = int(value)
            try:
                from_dict(merge(data, nested(key, value)))
            except ConfigError as exc:
                raise ConfigError(f"tune search_space.{key}: {exc}") from None


def pruned_on(tune: TuneConfig) -> tuple[str, float]:
    """The metric a trial reports to the pruner and the sign it is reported with: the study's
    pruners compare in the study's direction, so a ``prune_metric`` better the other way is
    reported negated (``val/loss`` in a study that maximises ``val/lddt`` reports -loss)."""
    if tune.prune_metric in (None, tune.metric):
        return tune.metric, 1.0
    return tune.prune_metric, 1.0 if tune.prune_direction == tune.direction else -1.0


def suggest(trial: optuna.Trial, tune: TuneConfig) -> dict[str, Any]:
    values = {}
    for key, p in tune.search_space.items():
        if p.type == "float":
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif p.type == "int":
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            values[key] = trial.suggest_categorical(key, p.choices)
    return values


def trial_config(
    base: Config, values: dict[str, Any], output_dir: Path, tune: TuneConfig | None = None
) -> Config:
    data = to_dict(base)
    for key, value in values.items():
        data = merge(data, nested(key, value))
    if tune is not None and tune.time_budget_minutes is not None:
        data = merge(data, nested("trainer.time_limit_minutes", tune.time_budget_minutes))
    if base.data.cache_dir is None:  # trials share the data cache (e.g. the synthetic set)
        data = merge(data, nested("data.cache_dir", str(Path(base.output_dir) / "cache")))
    data["output_dir"] = str(output_dir)
    return from_dict(data)


# ====================================================================== study and storage
def _sampler(tune: TuneConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(tune.n_startup_trials, 1))


def _pruner(tune: TuneConfig, base: Config) -> optuna.pruners.BasePruner:
    if tune.objective == "pareto" or tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "median":
        median = optuna.pruners.MedianPruner(n_startup_trials=tune.n_startup_trials)
        return AfterReports(median, tune.median_warmup_reports)
    # Reports are on the samples-seen axis: Hyperband's rungs must be in samples too, else its
    # first rungs (1, 3, 9, ... samples) all pass at the first report.
    min_samples = tune.min_resource_samples
    if min_samples is None and base.data.source == "synthetic":
        min_samples = base.data.n_train * base.trainer.eval_every_epochs
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_samples or 1, reduction_factor=tune.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=min_samples or 1, reduction_factor=tune.reduction_factor
    )


class AfterReports(optuna.pruners.BasePruner):
    """``pruner``, but no trial is cut before it has made more than ``n_reports`` reports.

    Optuna's ``n_warmup_steps`` counts steps, and a trial's steps here are samples seen, whose
    number per report depends on the data set; counting reports needs no such figure. In the
    tuning benchmark (docs/benchmarks.md) the median pruner with 2 startup trials, replayed on
    200 orders of a recorded ten-trial study, kept the best trial in 49% of them when it could
    cut at the first report, and in all of them when it could cut from the third (on a second,
    16-trial study: 59% and 94%).
    """

    def __init__(self, pruner: optuna.pruners.BasePruner, n_reports: int):
        self._pruner = pruner
        self._n_reports = n_reports

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if len(trial.intermediate_values) <= self._n_reports:
            return False
        return self._pruner.prune(study, trial)


class _WorkerLost:
    """A trial whose worker died: fail its MLflow run, and rerun it up to ``max_retries``."""

    def __init__(self, tune: TuneConfig, tracking_enabled: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max(tune.max_retries, 1)
            )
        self.max_retries = tune.max_retries
        self.tracking_enabled = tracking_enabled

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = f"worker {trial.user_attrs.get('worker', '?')} lost during trial {trial.number}"
        log.warning("tune: %s", reason)
        if self.max_retries > 0:
            self.retry(study, trial)
        parent = trial.user_attrs.get("parent_run_id")
        if self.tracking_enabled and parent:
            _fail_trial_runs(parent, trial.number, reason)


def _open_study(
    tune: TuneConfig, base: Config, url: str | None, root: Path, name: str, seed: int | None
) -> optuna.Study:
    try:
        if url:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage: Any = optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=tune.heartbeat_interval_s,
                    grace_period=tune.grace_period_s,
                    heartbeat_stale_trial_callback=_WorkerLost(tune, base.tracking.enabled),
                )
        else:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            root.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(root / "optuna-journal.log")))
        directions = [tune.direction] + (["maximize"] if tune.objective == "pareto" else [])
        return optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=_sampler(tune, seed),
            pruner=_pruner(tune, base),
            directions=directions,
            load_if_exists=True,
        )
    except ImportError:
        raise PipelineError(
            f"--storage: no database driver for {redact(url)} "
            "(PostgreSQL: pip install 'psycopg[binary]')"
        ) from None
    except (ValueError, optuna.exceptions.OptunaError, SQLAlchemyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"--storage: cannot open the study ({reason})") from None


def _finished_trials(study: optuna.Study, *, running: bool = False) -> int:
    """Trials that count towards ``--n-trials``: complete, pruned, or failed and not retried
    (and, with ``running``, those still running in some worker)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    done = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    return sum(
        t.state in done or (t.state == TrialState.FAIL and t.number not in retried)
        for t in trials
    )


class _StopAt:
    """Stop ``optimize`` once the study's finished and running trials reach ``target``, so that
    workers sharing a study do not overshoot it (a retried trial keeps a worker going)."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        if _finished_trials(study, running=True) >= self.target:
            study.stop()


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ====================================================================== the objective
class _Objective:
    def __init__(self, base: Config, tune: TuneConfig, root: Path, parent_run_id: str | None,
                 study_name: str):
        self.base, self.tune, self.root = base, tune, root
        self.parent_run_id, self.study_name = parent_run_id, study_name

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from pipeline.train.trainer import error_tag, train

        trial.set_user_attr("worker", _worker_id())
        trial.set_user_attr("parent_run_id", self.parent_run_id)
        values = suggest(trial, self.tune)
        config = trial_config(self.base, values, self.root / f"trial-{trial.number:04d}", self.tune)
        pareto = self.tune.objective == "pareto"

        name, sign = pruned_on(self.tune)

        def on_validation(samples_seen: int, metrics: dict[str, float]) -> str | None:
            value = metrics.get(name)
            if pareto or value is None or not math.isfinite(value):
                return None
            trial.report(sign * value, step=samples_seen)
            return "prune" if trial.should_prune() else None

        started = time.monotonic()
        try:
            result = train(
                config,
                parent_run_id=self.parent_run_id,
                on_validation=on_validation,
                extra_tags={"trial": trial.number, "study_name": self.study_name},
            )
        except Exception as exc:
            trial.set_user_attr("error", error_tag(exc))
            raise
        throughput = result.samples_seen / max(time.monotonic() - started, 1e-9)
        trial.set_user_attr("run_id", result.run_id)
        trial.set_user_attr("samples_seen", result.samples_seen)
        trial.set_user_attr("samples_per_s", throughput)
        trial.set_user_attr("status", result.status)
        if result.status == "pruned":
            raise optuna.TrialPruned()
        value = result.metrics.get(self.tune.metric)
        if value is None:
            raise PipelineError(f"trial {trial.number}: no {self.tune.metric} was computed")
        return (value, throughput) if pareto else value


# ====================================================================== entry point
def run_study(
    base: Config,
    *,
    tune_config: str | Path | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    parent_run_id: str | None = None,
    n_workers: int = 1,
    join: bool = False,
    worker: bool = False,
) -> str:
    """Run (or continue) a study; returns a one-paragraph summary.

    ``n_workers > 1`` runs the trials in that many local worker processes. ``join`` (with
    ``parent_run_id``) adds trials to a study another process leads: no parent run is created
    or finished. ``worker`` is such a joining process started by ``n_workers``: it stops when
    the study reaches the launch's target.
    """
    tune = load_tune_config(tune_config)
    _check_space(base, tune)
    for flag, value in (("--n-trials", n_trials), ("--n-workers", n_workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1, got {value}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout: expected a number of seconds > 0, got {timeout:g}")
    if (join or worker) and not parent_run_id and base.tracking.enabled:
        raise ConfigError("--parent-run-id: required to join a study's parent run")
    if tune.objective == "pareto" and tune.pruner != "none":
        log.info("tune: objective pareto: trials are not pruned (Optuna cannot prune them)")
    study_name = study_name or f"diffold-{base.scenario or 'custom'}"
    root = Path(base.output_dir) / "tune" / study_name
    # Workers sharing a study draw their own suggestions (the same seed would repeat them).
    seed = base.seed + os.getpid() if join or worker else base.seed
    study = _open_study(tune, base, storage, root, study_name, seed)
    n_before = len(study.get_trials(deepcopy=False))
    if n_before and not (join or worker):
        # A continued study: a sampler seeded as in the first call would draw that call's
        # suggestions again (the random sampler exactly, TPE its random start-up).
        study.sampler = _sampler(tune, base.seed + n_before)

    if join or worker:
        target = (
            int(study.user_attrs[_TARGET_ATTR])
            if worker
            else _finished_trials(study) + (n_trials or tune.n_trials)
        )
        _optimize(study, base, tune, root, parent_run_id, target, timeout)
        return f"study {study_name}: worker {_worker_id()} done"

    lost = _WorkerLost(tune, base.tracking.enabled)
    _fail_dead_local_trials(study, lost)
    for params in tune.enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    parent_run_id = parent_run_id or _previous_parent(study)
    parent = build_tracker(
        dataclasses.replace(base.tracking, system_metrics=False),
        run_name=f"tune-{study_name}",
        run_id=parent_run_id,
        tags={"study_name": study_name, "role": "tune-parent", "scenario": base.scenario},
    )
    if parent.run_id:
        study.set_user_attr(_PARENT_ATTR, parent.run_id)
    parent.log_params(_study_params(study_name, tune, n_workers, storage))
    target = _finished_trials(study) + (n_trials or tune.n_trials)
    status = "FAILED"
    try:
        if n_workers == 1:
            _optimize(study, base, tune, root, parent.run_id, target, timeout)
        else:
            study.set_user_attr(_TARGET_ATTR, target)
            _run_workers(n_workers, base, tune_config, storage, study, root, parent.run_id,
                         timeout, lost)
        status = "FINISHED"
        return _log_study(parent, study, base, tune, root)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.close(status)


def _optimize(study, base, tune, root, parent_run_id, target, timeout) -> None:
    if _finished_trials(study) >= target:
        return
    # A bar over this process's trials on a terminal (the trainer's step bar shows below it).
    with TrialProgress(target - _finished_trials(study), desc=f"tune {study.study_name}") as bar:
        study.optimize(
            _Objective(base, tune, root, parent_run_id, study.study_name),
            timeout=timeout,
            catch=(PipelineError, RuntimeError),
            callbacks=[_StopAt(target), bar],
        )


def _previous_parent(study: optuna.Study) -> str | None:
    """The parent run of an earlier session of this study, if the tracking store still has it."""
    run_id = study.user_attrs.get(_PARENT_ATTR)
    if not run_id:
        return None
    try:
        import mlflow

        mlflow.MlflowClient().get_run(run_id)
    except Exception:  # another tracking store, or the run was deleted: start a new parent
        return None
    return run_id


def _prune_param(tune: TuneConfig) -> str:
    name, _ = pruned_on(tune)
    return name if name == tune.metric else f"{name} ({tune.prune_direction})"


def _study_params(study_name: str, tune: TuneConfig, n_workers: int, storage: str | None):
    return {
        "study_name": study_name,
        "sampler": tune.sampler,
        "pruner": "none" if tune.objective == "pareto" else tune.pruner,
        "metric": tune.metric,
        "direction": tune.direction,
        "prune_metric": _prune_param(tune),
        "objective": tune.objective,
        "budget": (
            f"{tune.time_budget_minutes} min per trial" if tune.time_budget_minutes else "epochs"
        ),
        "n_workers": n_workers,
        "storage": redact(storage) if storage else "journal file",
        **{f"search.{k}": dataclasses.asdict(v) for k, v in tune.search_space.items()},
    }



# ====================================================================== local workers
def _run_workers(n, base, tune_config, storage, study, root, parent_run_id, timeout, lost):
    """Start ``n`` worker processes on this host and wait; fail the trials of dead workers."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    base_file = root / "base_config.yaml"
    base_file.write_text(to_yaml(base))
    n_gpus = torch.cuda.device_count()
    command = [
        sys.executable, "-m", "pipeline", "tune", "--worker",
        "--config", str(base_file), "--study-name", study.study_name,
    ]
    for flag, value in (("--tune-config", tune_config), ("--storage", storage),
                        ("--parent-run-id", parent_run_id), ("--timeout", timeout)):
        if value is not None:
            command += [flag, str(value)]
    procs = []
    for i in range(n):
        env = dict(os.environ)
        env.pop("MLFLOW_RUN_ID", None)  # workers log child runs, not into the parent
        env["TQDM_DISABLE"] = "1"  # N processes' progress bars on one terminal would garble it
        if n_gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpus)
        else:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        procs.append(subprocess.Popen(command, env=env))
    log.info("tune: %d workers started (pids %s)", n, " ".join(str(p.pid) for p in procs))
    running = list(procs)
    while running:
        time.sleep(1.0)
        for proc in list(running):
            code = proc.poll()
            if code is None:
                continue
            running.remove(proc)
            if code != 0:
                log.warning("tune: worker %d exited with code %d", proc.pid, code)
                _fail_orphans(study, f"{socket.gethostname()}:{proc.pid}", lost)
    if all(p.returncode != 0 for p in procs):
        raise PipelineError(f"tune: all {n} workers failed (see their output above)")


def _fail_orphans(study: optuna.Study, worker: str, lost: _WorkerLost) -> None:
    """Trials left RUNNING by a worker that is gone: FAIL them (and rerun them)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == worker:
            study.tell(trial.number, state=TrialState.FAIL)
            lost(study, study.get_trials(deepcopy=False)[trial.number])


def _fail_dead_local_trials(study: optuna.Study, lost: _WorkerLost) -> None:
    """RUNNING trials of processes of this host that no longer exist (an earlier session that
    was killed): without this, a journal-file study would wait for them forever."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            _fail_orphans(study, f"{host}:{pid}", lost)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fail_trial_runs(parent: str, number: int, reason: str) -> None:
    """Mark the MLflow child run(s) of a trial whose worker died FAILED, with the reason."""
    import mlflow

    try:
        client = mlflow.MlflowClient()
        experiment = client.get_run(parent).info.experiment_id
        runs = client.search_runs(
            [experiment],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent}' and tags.trial = '{number}' "
                "and attributes.status = 'RUNNING'"
            ),
        )
        for run in runs:
            client.set_tag(run.info.run_id, "error", reason)
            client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as exc:  # the study goes on without the bookkeeping
        log.warning("tune: could not mark the MLflow run of trial %d failed (%s)", number, exc)


# ====================================================================== results
def _log_study(parent, study: optuna.Study, base: Config, tune: TuneConfig, root: Path) -> str:
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in sorted(set(states))}
    parent.log_metrics({f"tune/n_{s.lower()}": float(n) for s, n in counts.items()}, step=0)
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in completed:
        parent.log_metrics({f"tune/{tune.metric}": t.values[0]}, step=t.number)
    if not completed:
        return f"study {study.study_name}: no completed trial ({counts})"
    root.mkdir(parents=True, exist_ok=True)
    if tune.objective == "pareto":
        front = sorted(study.best_trials, key=lambda t: t.values[0], reverse=tune.direction == "maximize")
        rows = [
            {"trial": t.number, tune.metric: t.values[0], "samples_per_s": t.values[1],
             "params": t.params, "run_id": t.user_attrs.get("run_id")}
            for t in front
        ]
        text = yaml.safe_dump(rows, sort_keys=False)
        (root / "pareto_front.yaml").write_text(text)
        parent.log_text(text, "pareto_front.yaml")
        best = front[0]
    else:
        best = study.best_trial
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.log_metrics({f"best/{tune.metric}": best.values[0]}, step=0)
    best_config = trial_config(base, best.params, Path(base.output_dir))
    text = to_yaml(best_config)
    (root / "best_config.yaml").write_text(text)
    parent.log_text(text, "best_config.yaml")
    parent.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("run_id")})
    _log_plots(parent, study, tune, len(completed))
    front_note = f"; Pareto front of {len(study.best_trials)}" if tune.objective == "pareto" else ""
    return (
        f"study {study.study_name}: {counts}; best trial {best.number} "
        f"{tune.metric}={best.values[0]:.4f} with "
        f"{yaml.safe_dump(best.params, default_flow_style=True).strip()}{front_note}; "
        f"best config: {root / 'best_config.yaml'}"
    )


def _log_plots(parent, study: optuna.Study, tune: TuneConfig, n_completed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if tune.objective == "pareto":
        names = [tune.metric, "samples/s"]
        plots = [("plots/pareto_front.png", lambda s: ovm.plot_pareto_front(s, target_names=names))]
        quality = {"target": lambda t: t.values[0], "target_name": tune.metric}
    else:
        plots, quality = [], {}
    plots.append(("plots/optimization_history.png",
                  lambda s: ovm.plot_optimization_history(s, **quality)))
    if n_completed >= 2:
        plots.append(("plots/param_importances.png",
                      lambda s: ovm.plot_param_importances(s, **quality)))
    for name, plot in plots:
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
            log.warning("tune: %s not drawn (%s)", name, exc)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax[0].figure
        parent.log_figure(figure, name)
        plt.close(figure)
