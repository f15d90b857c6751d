"""An Optuna study over ``train(config)``.

* The search space (``configs/tune.yaml``) names dotted config keys; suggested values are merged
  over the base config (scenario/preset/--set) and validated like any config.
* Every trial trains for the same number of epochs, so every trial sees the same samples
  whatever its accumulation steps; intermediate values are reported against *samples seen*, an
  axis that does not depend on accumulation, so the pruner compares like with like.
* MLflow: one parent run for the study (under ``mlflow run`` that is the run it created); each
  trial is a child run created when the trial starts; pruned trials end KILLED with a tag.
* Storage: an Optuna journal file in the output directory by default (re-running with the same
  study name continues the study); any Optuna storage URL (e.g. PostgreSQL) with ``--storage``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config.fields import spec
from pipeline.config.loader import (
    configs_dir,
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
from pipeline.tracking import build_tracker

log = logging.getLogger(__name__)


@dataclass
class SearchParam:
    type: Literal["float", "int", "categorical"] = spec("float", help="kind of parameter")
    low: float | None = spec(None, help="lower bound (float, int)")
    high: float | None = spec(None, help="upper bound (float, int)")
    log: bool = spec(False, help="sample on a log scale")
    choices: list[int | float | str] | None = spec(None, help="values (categorical)")


@dataclass
class TuneConfig:
    metric: str = spec("val/lddt", help="validation metric to optimise")
    direction: Literal["maximize", "minimize"] = spec("maximize", help="optimisation direction")
    sampler: Literal["tpe", "random"] = spec("tpe", help="Optuna sampler")
    pruner: Literal["median", "hyperband", "none"] = spec("median", help="Optuna pruner")
    n_startup_trials: int = spec(2, ge=0, help="trials completed before pruning starts")
    n_trials: int = spec(20, ge=1, help="trials when --n-trials is not given")
    search_space: dict[str, SearchParam] = field(default_factory=dict)

    def validate(self) -> list[str]:
        errors = []
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


def trial_config(base: Config, values: dict[str, Any], output_dir: Path) -> Config:
    data = to_dict(base)
    for key, value in values.items():
        data = merge(data, nested(key, value))
    data["output_dir"] = str(output_dir)
    return from_dict(data)


def _sampler(tune: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(tune.n_startup_trials, 1))


def _pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.n_startup_trials)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _storage(url: str | None, output_dir: Path):
    if url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    output_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(output_dir / "optuna-journal.log")))


def run_study(
    base: Config,
    *,
    tune_config: str | Path | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Run (or continue) a study; returns a one-paragraph summary."""
    from pipeline.train.trainer import train

    tune = load_tune_config(tune_config)
    _check_space(base, tune)
    study_name = study_name or f"diffold-{base.scenario or 'custom'}"
    root = Path(base.output_dir) / "tune" / study_name
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=_storage(storage, root),
            sampler=_sampler(tune, base.seed),
            pruner=_pruner(tune),
            direction=tune.direction,
            load_if_exists=True,
        )
    except (ValueError, ImportError, optuna.exceptions.OptunaError, SQLAlchemyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"--storage: cannot open the study ({reason})") from None
    parent = build_tracker(
        dataclasses.replace(base.tracking, system_metrics=False),
        run_name=f"tune-{study_name}",
        run_id=parent_run_id,
        tags={"study_name": study_name, "role": "tune-parent", "scenario": base.scenario},
    )
    parent.log_params(
        {
            "study_name": study_name,
            "sampler": tune.sampler,
            "pruner": tune.pruner,
            "metric": tune.metric,
            "direction": tune.direction,
            **{f"search.{k}": dataclasses.asdict(v) for k, v in tune.search_space.items()},
        }
    )

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, tune)
        config = trial_config(base, values, root / f"trial-{trial.number:04d}")

        def on_validation(samples_seen: int, metrics: dict[str, float]) -> str | None:
            value = metrics.get(tune.metric)
            if value is None or not math.isfinite(value):
                return None
            trial.report(value, step=samples_seen)
            return "prune" if trial.should_prune() else None

        result = train(
            config,
            parent_run_id=parent.run_id,
            on_validation=on_validation,
            extra_tags={"trial": trial.number, "study_name": study_name},
        )
        trial.set_user_attr("run_id", result.run_id)
        trial.set_user_attr("samples_seen", result.samples_seen)
        if result.status == "pruned":
            raise optuna.TrialPruned()
        value = result.metrics.get(tune.metric)
        if value is None:
            raise PipelineError(f"trial {trial.number}: no {tune.metric} was computed")
        parent.log_metrics({f"tune/{tune.metric}": value}, step=trial.number)
        return value

    status = "FAILED"
    try:
        study.optimize(
            objective,
            n_trials=n_trials or tune.n_trials,
            timeout=timeout,
            catch=(PipelineError, RuntimeError),
        )
        status = "FINISHED"
        return _log_study(parent, study, base, tune, root)
    finally:
        parent.close(status)


def _log_study(parent, study: optuna.Study, base: Config, tune: TuneConfig, root: Path) -> str:
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in sorted(set(states))}
    parent.log_metrics({f"tune/n_{s.lower()}": float(n) for s, n in counts.items()}, step=0)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return f"study {study.study_name}: no completed trial ({counts})"
    best = study.best_trial
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.log_metrics({f"best/{tune.metric}": best.value}, step=0)
    best_config = trial_config(base, best.params, Path(base.output_dir))
    text = to_yaml(best_config)
    root.mkdir(parents=True, exist_ok=True)
    (root / "best_config.yaml").write_text(text)
    parent.log_text(text, "best_config.yaml")
    parent.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("run_id")})
    _log_plots(parent, study, len(completed))
    return (
        f"study {study.study_name}: {counts}; best trial {best.number} "
        f"{tune.metric}={best.value:.4f} with {yaml.safe_dump(best.params, default_flow_style=True).strip()}; "
        f"best config: {root / 'best_config.yaml'}"
    )


def _log_plots(parent, study: optuna.Study, n_completed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = [("plots/optimization_history.png", ovm.plot_optimization_history)]
    if n_completed >= 2:
        plots.append(("plots/param_importances.png", ovm.plot_param_importances))
    for name, plot in plots:
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
            log.warning("tune: %s not drawn (%s)", name, exc)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax[0].figure
        parent.log_figure(figure, name)
        plt.close(figure)
