"""Experiment tracking behind one small interface: :class:`Tracker`.

``build_tracker`` returns an :class:`~pipeline.tracking.mlflow_tracker.MlflowTracker` or, when
tracking is off (or on non-zero DDP ranks), a :class:`NullTracker` that does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.config.fields import spec


@dataclass
class TrackingConfig:
    enabled: bool = spec(True, help="log to MLflow (MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    experiment: str = spec("diffold", help="MLflow experiment name (unless set by `mlflow run`)")
    run_name: str | None = spec(None, help="run name; default: scenario-preset-<config hash>")
    log_every_steps: int = spec(10, ge=1, help="optimizer steps between train/* metric points")
    flush_interval_s: float = spec(
        2.0, gt=0, help="seconds between batched sends of buffered metrics (background thread)"
    )
    system_metrics: bool = spec(
        True,
        help="MLflow's system/* sampler (CPU, RAM, GPU via NVML), plus GPU temperature, SM clock "
        "and throttle reasons",
    )
    system_interval_s: float = spec(10.0, gt=0, help="seconds between system/* samples")
    log_checkpoints: bool = spec(
        True, help="upload each checkpoint (as last.pt) and best.pt to checkpoints/ as written"
    )
    plots: Literal["always", "unless_pruned", "never"] = spec(
        "unless_pruned",
        help="draw the run's figures (plots/*.png: training curves, health, run report): "
        "always; unless_pruned (a tuning trial stopped by the pruner keeps its metrics, "
        "health report and summary.md, but its end-of-run figures are not drawn: they cost "
        "seconds per trial, as much as its training on short trials); never",
    )
    register_model: str | None = spec(
        None, help="register the logged model under this name in the MLflow model registry"
    )
    offline: bool = spec(
        False,
        help="log to a store in the run directory (<run_dir>/tracking/offline.db) instead of "
        "the tracking server; `python -m pipeline sync RUN_DIR` uploads the run later",
    )
    max_buffered_points: int = spec(
        100_000, ge=100, help="metric points kept in memory while the tracking server cannot "
        "be reached; beyond that they are spooled to <run_dir>/tracking/ (never dropped)"
    )

    def validate(self) -> list[str]:
        if self.register_model is not None and not self.register_model.strip():
            return ["tracking.register_model: expected a model name or null, got ''"]
        return []


class Tracker(Protocol):
    """What the trainer, evaluator and tuner need from a tracker."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def unsent_points(self) -> list[list]:
        """Metric points logged but not known to be sent, ``[key, value, timestamp, step]``."""
        ...

    def resend(self, points: list[list]) -> None:
        """Queue points that :meth:`unsent_points` gave (to an earlier process of the run)."""
        ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_checkpoint(self, path: str | Path, name: str) -> None:
        """Upload checkpoint ``path`` and its ``.sha256`` file as ``checkpoints/<name>`` off the
        caller's thread; a newer one of the same name replaces one not sent yet. A failed
        upload is a warning, retried at the next call; it never raises."""
        ...

    def log_model(
        self, model: Any, name: str, *, step: int, registered_model_name: str | None = None
    ) -> None:
        """Log ``model`` (a torch module) as the run's model ``name`` (loadable with
        ``mlflow.pytorch.load_model``), linked to the run's metrics at ``step``; with
        ``registered_model_name``, also register it as a new version of that model."""
        ...

    def flush(self) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """A tracker that records nothing (tracking disabled, or a DDP rank other than 0)."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def unsent_points(self):
        return []

    def resend(self, points):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_figure(self, figure, artifact_file):
        pass

    def log_checkpoint(self, path, name):
        pass

    def log_model(self, model, name, *, step, registered_model_name=None):
        pass

    def flush(self):
        pass

    def close(self, status="FINISHED"):
        pass


def build_tracker(
    cfg: TrackingConfig,
    *,
    run_name: str,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    enabled: bool = True,
    spool_dir: Path | None = None,
) -> Tracker:
    """A tracker for one run: ``run_id`` resumes an existing run, otherwise one is created.
    ``spool_dir`` (the run's ``tracking/`` folder) holds what could not be sent, and the
    offline store."""
    if not (cfg.enabled and enabled):
        return NullTracker()
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(
        cfg, run_name=run_name, run_id=run_id, parent_run_id=parent_run_id, tags=tags or {},
        spool_dir=spool_dir,
    )
