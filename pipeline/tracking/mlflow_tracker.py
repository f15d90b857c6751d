"""MLflow tracker: buffered metrics, sent in batches from a background thread.

A synchronous ``mlflow.log_metrics`` costs 6-9 ms against a sqlite store and MLflow's own async
mode still ~1 ms per call on the enqueue (measured on the GPU machine); a training step is
~30 ms. So ``log_metrics`` here only appends to a list under a lock (microseconds) and a worker
thread sends everything buffered with ``MlflowClient.log_batch`` every ``flush_interval_s``.
Artifact uploads (checkpoints, reports) go through the same worker, in order, off the training
thread. A failed send is kept and retried on the next round, never dropped: beyond
``max_buffered_points`` (a long outage of the tracking server) the points are spooled to
``<run_dir>/tracking/`` and sent first when the server answers again; what is still unsent when
the run ends stays there for ``python -m pipeline sync RUN_DIR`` (:mod:`~pipeline.tracking.spool`).
A resumed run sends no point for a step its MLflow history already has (the steps re-run after
a kill), so the history has one value per step. Checkpoints are
uploaded under fixed names (``checkpoints/last.pt``, ``checkpoints/best.pt``), each newer one
overwriting the last, and a failed checkpoint upload waits for the next checkpoint. The same
worker samples what MLflow's system metrics lack on GPUs (temperature, SM clock, throttle
reasons: :class:`~pipeline.monitor.system.GpuSampler`) every ``system_interval_s``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.monitor.system import GpuSampler
from pipeline.tracking import TrackingConfig
from pipeline.tracking.spool import (
    BATCH_LIMIT,
    PARAM_BATCH_LIMIT,
    Spool,
    offline_uri,
    run_task,
)
from pipeline.train.checkpoint import read_checksum, write_checksum

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_PARAM_VALUE_LIMIT = 6000
_DISTRIBUTION = "diffold-pipeline"  # this package's name on pip (pyproject.toml)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server (``http(s)://``) must answer before a run starts; a one-line
    :class:`PipelineError` otherwise. Any HTTP answer counts (an auth proxy's 401 too)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise PipelineError(
            f"MLFLOW_TRACKING_URI: tracking server {uri} cannot be reached ({reason}); start it "
            "or fix the URI, or set tracking.offline=true to log into the run directory and "
            "upload later with `python -m pipeline sync RUN_DIR`"
        ) from None
    # MLflow's own retries (7, exponential backoff) would hold the worker for minutes per
    # call in an outage; the worker retries by itself. The user's settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class MlflowTracker:
    """One MLflow run. ``run_id`` resumes it (as ``mlflow run`` or ``--resume`` do)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_name: str,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, Any],
        spool_dir: Path | None = None,
    ):
        self.cfg = cfg
        if cfg.offline:
            if spool_dir is None:
                raise ConfigError("tracking.offline: only `train` runs can log offline")
            spool_dir.mkdir(parents=True, exist_ok=True)
            self.uri = offline_uri(spool_dir)
        else:
            self.uri = tracking_uri()
            check_reachable(self.uri)
        self.client = MlflowClient(self.uri)
        self._logged_upto: dict[str, int] = {}  # resumed run: newest step of each metric
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                raise PipelineError(f"run id {run_id}: no such MLflow run at {self.uri}") from None
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._set_tags_now(tags)
        else:
            all_tags = {"mlflow.runName": run_name, **tags}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(
                self._experiment_id(), run_name=run_name, tags=_str_values(all_tags)
            )
            self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.spool = Spool(spool_dir, self.run_id, self.uri) if spool_dir else None
        if run_id:
            self._resume_history()
        self._metrics: list[Metric] = []
        self._in_flight: list[Metric] = []  # taken by the worker, not known to be sent yet
        self._tasks: list[tuple] = []  # ("tags", dict) | ("text", ...) | ("artifact", ...)
        # Checkpoints staged for upload, by artifact name; sent when a new one arrives.
        self._checkpoints: dict[str, Path] = {}
        self._checkpoints_due = False
        self._busy = False  # the worker is sending what it took from the buffers
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._last_error = ""
        self._rounds = 0  # worker rounds done (close waits for one more, not for a dead server)
        self._closing = False
        self._last_step = 0  # GPU samples are logged at the newest training step seen
        self._gpu = GpuSampler.start() if cfg.system_metrics else None
        self._next_gpu_sample = 0.0
        self._worker = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._worker.start()
        self._system = None
        if cfg.system_metrics:
            self._start_system_metrics(resume=bool(run_id))

    # ---------------------------------------------------------------- public interface
    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH_LIMIT):
            try:
                self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH_LIMIT])
            except MlflowException as exc:
                # Re-logging a param with a different value (a resumed run whose config
                # changed) is refused by MLflow; record the new value as a tag instead.
                if "Changing param values is not allowed" not in str(exc):
                    raise
                for p in items[i : i + PARAM_BATCH_LIMIT]:
                    self._log_param_or_tag(p)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        step = int(step)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step > self._logged_upto.get(k, -1)]
        with self._lock:
            self._metrics.extend(batch)
            self._last_step = max(self._last_step, step)

    def unsent_points(self) -> list[list]:
        """Metric points not known to be in MLflow yet, as ``[key, value, timestamp, step]``:
        a checkpoint keeps them, so that a kill before they are sent loses none."""
        with self._lock:
            return [[m.key, m.value, m.timestamp, m.step] for m in self._in_flight + self._metrics]

    def resend(self, points: list[list]) -> None:
        """Points a checkpoint kept (:meth:`unsent_points`), queued ahead of new ones; those
        the run's history already has (sent before the process died) are skipped."""
        todo = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in points
                if int(s) > self._logged_upto.get(k, -1)]
        with self._lock:
            self._metrics[:0] = todo
        if todo:
            log.info("tracking: %d metric points kept by the checkpoint queued for sending",
                     len(todo))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Sent by the worker, in order with metrics and artifacts: never waits on the network."""
        self._submit(("tags", _str_values(tags)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit(("artifact", str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(("text", text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        # Render on the caller's thread (matplotlib is not thread-safe); upload in the worker.
        tmp = Path(tempfile.mkdtemp(prefix="figure-")) / Path(artifact_file).name
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        folder = str(Path(artifact_file).parent) if Path(artifact_file).parent.name else None
        self.log_artifact(tmp, folder)

    def log_checkpoint(self, path: str | Path, name: str) -> None:
        path = Path(path)
        stage = None
        try:
            # Staged under the artifact's name beside the checkpoint: a hard link (no copy)
            # that also keeps the data when the checkpoint manager prunes the file.
            stage = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=path.parent))
            try:
                os.link(path, stage / name)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, stage / name)
            write_checksum(stage / name, read_checksum(path))
        except OSError as exc:
            log.warning("tracking: %s not uploaded: cannot stage it (%s)", path, exc)
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            return
        with self._lock:
            replaced = self._checkpoints.pop(name, None)
            self._checkpoints[name] = stage
            self._checkpoints_due = True
        self._wake.set()
        if replaced is not None:  # never sent: the newer one supersedes it
            shutil.rmtree(replaced, ignore_errors=True)

    def log_model(
        self, model: Any, name: str, *, step: int, registered_model_name: str | None = None
    ) -> None:
        """Pickle format: MLflow's default, ``pt2``, traces the model from a tensor input
        example, and Diffold takes a dict batch. Requirements are given rather than inferred
        (inference loads the model in a subprocess, ~5 s). Synchronous, after a flush, so that
        the run's metrics at ``step`` are there to be linked to the model."""
        self.flush()
        if self._failures:
            log.warning("tracking: model not logged (%s is not answering); its weights are in "
                        "the run's checkpoints", self.uri)
            return
        try:
            self._log_model(model, name, step=step, registered_model_name=registered_model_name)
        except Exception as exc:  # the server is down at the end of the run: keep the run
            log.warning("tracking: model not logged (%s: %s); its weights are in the run's "
                        "checkpoints", type(exc).__name__, str(exc).splitlines()[0][:200])

    def _log_model(
        self, model: Any, name: str, *, step: int, registered_model_name: str | None
    ) -> None:
        import mlflow.pytorch

        # Created here so that the model belongs to the run's experiment with no active
        # (global) MLflow run. log_model is fluent API: it resolves MLFLOW_TRACKING_URI (else
        # sqlite:///mlflow.db) as tracking_uri() does, except for an offline run's store.
        logged = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id
        )
        with _fluent_tracking_uri(self.uri):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=self.run_id,
                step=step,
                serialization_format="pickle",
                pip_requirements=_model_requirements(),
                registered_model_name=registered_model_name,
            )
        registered = (
            f", registered as {registered_model_name} version {info.registered_model_version}"
            if registered_model_name
            else ""
        )
        log.info("tracking: model logged as %s (runs:/%s/%s)%s", info.model_uri, self.run_id,
                 name, registered)

    def flush(self, timeout: float = 60.0) -> None:
        """Send everything buffered so far; waits up to ``timeout`` seconds, or for one more
        round while the server is not answering."""
        deadline = time.monotonic() + timeout
        rounds = self._rounds
        while time.monotonic() < deadline:
            with self._lock:
                idle = not (self._busy or self._metrics or self._tasks or self._checkpoints_due)
            if idle or (self._failures and self._rounds > rounds):
                break
            self._wake.set()
            time.sleep(0.02)
        with self._lock:
            pending = len(self._metrics), len(self._tasks) + len(self._checkpoints)
        if any(pending) and not (self._closing or self._failures):
            log.warning("tracking: %d metric points and %d uploads still pending", *pending)

    def close(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        with self._lock:  # a last try for checkpoint uploads that failed
            self._checkpoints_due = bool(self._checkpoints)
            self._closing = True
        self.flush()
        self._stop.set()
        self._wake.set()
        self._worker.join(timeout=30)
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        with self._lock:
            unsent, self._checkpoints = self._checkpoints, {}
            metrics, self._metrics = self._metrics, []
            tasks, self._tasks = self._tasks, []
        for name, stage in unsent.items():
            log.warning("tracking: checkpoints/%s was not uploaded; it is on local disk only", name)
            shutil.rmtree(stage, ignore_errors=True)
        spooled = self.spool is not None and self.spool.metrics_path.is_file()
        if not (metrics or tasks or spooled):
            try:
                self.client.set_terminated(self.run_id, status=status)
                return
            except Exception as exc:
                log.warning("tracking: cannot set the run's status (%s)", type(exc).__name__)
        if self.spool is None:
            log.warning("tracking: %d metric points and %d tags/artifacts could not be sent to "
                        "%s and are lost", len(metrics), len(tasks), self.uri)
            return
        self.spool.append_metrics(metrics)
        self.spool.save_tasks(tasks, status)
        log.warning(
            "tracking: %s could not be reached at the end of the run; what it lacks is kept in "
            "%s: send it with `python -m pipeline sync %s`",
            self.uri, self.spool.directory, self.spool.directory.parent,
        )

    # ---------------------------------------------------------------- internals
    def _experiment_id(self) -> str:
        env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if env_id:
            return env_id
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.cfg.experiment)

    def _log_param_or_tag(self, param: Param) -> None:
        try:
            self.client.log_param(self.run_id, param.key, param.value)
        except MlflowException:
            self.client.set_tag(self.run_id, f"resumed.{param.key}", param.value)

    def _set_tags_now(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in _str_values(tags).items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def _resume_history(self) -> None:
        """Send what an earlier process of this run spooled, then note each metric's newest
        step: points at or before it are the re-run steps of a resume and are not sent."""
        if self.spool is not None and self.spool.has_anything():
            try:
                sent = self.spool.send_metrics(self.client)
                tasks, _ = self.spool.pending_tasks()
                for task in tasks:
                    run_task(self.client, self.run_id, task)
                self.spool.clear_tasks()
                log.info("tracking: sent %d metric points and %d tags/artifacts kept by an "
                         "earlier process of this run", sent, len(tasks))
            except Exception as exc:
                log.warning("tracking: points kept in %s not sent yet (%s)",
                            self.spool.directory, type(exc).__name__)
        run = self.client.get_run(self.run_id)
        self._logged_upto = {m.key: m.step for m in run.data._metric_objs}
        if self.spool is not None:
            for m in self.spool.read_metrics():
                self._logged_upto[m.key] = max(m.step, self._logged_upto.get(m.key, -1))

    def _submit(self, task: tuple) -> None:
        with self._lock:
            self._tasks.append(task)
        self._wake.set()

    def _run(self) -> None:
        while True:
            timeout = self.cfg.flush_interval_s
            if self._gpu is not None:
                timeout = min(timeout, max(0.0, self._next_gpu_sample - time.monotonic()))
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            self._maybe_sample_gpu()
            with self._lock:  # set before anything leaves the buffers, so flush() waits for it
                self._busy = True
            self._send()
            self._upload_checkpoints()
            with self._lock:
                self._busy = False
            self._rounds += 1
            if self._stop.is_set():
                return

    def _maybe_sample_gpu(self) -> None:
        if self._gpu is None or time.monotonic() < self._next_gpu_sample:
            return
        self._next_gpu_sample = time.monotonic() + self.cfg.system_interval_s
        try:
            values = self._gpu.sample()
        except Exception as exc:  # a sampler bug must not end the worker (and the uploads)
            log.warning("tracking: GPU sampling failed (%s); stopped", exc)
            self._gpu = None
            return
        now = int(time.time() * 1000)
        with self._lock:
            self._metrics.extend(Metric(k, v, now, self._last_step) for k, v in values.items())

    def _send(self) -> None:
        with self._lock:
            metrics, self._metrics = self._metrics, []
            tasks, self._tasks = self._tasks, []
            self._in_flight = metrics
        sent = 0
        try:
            if self.spool is not None and self.spool.metrics_path.is_file():
                self.spool.send_metrics(self.client)  # older than the buffer: first
            while sent < len(metrics):
                chunk = metrics[sent : sent + BATCH_LIMIT]
                self.client.log_batch(self.run_id, metrics=chunk)
                sent += len(chunk)
            while tasks:
                run_task(self.client, self.run_id, tasks[0])
                tasks.pop(0)
            with self._lock:
                self._in_flight = []
            if self._failures:
                log.warning("tracking: %s answers again; sending resumed", self.uri)
            self._failures = 0
        except Exception as exc:  # network, server or store errors: keep and retry later
            self._failures += 1
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            if self._failures == 1 or self._failures % 50 == 0 or first != self._last_error:
                log.warning("tracking: send failed (%s: %s); kept and retried",
                            type(exc).__name__, first)
            self._last_error = first
            with self._lock:
                self._metrics[:0] = metrics[sent:]
                self._in_flight = []
                self._tasks[:0] = tasks
                spill = (self.spool is not None
                         and len(self._metrics) > self.cfg.max_buffered_points)
                if spill:
                    spilled, self._metrics = self._metrics, []
            if spill:
                self.spool.append_metrics(spilled)
                log.warning("tracking: %d unsent metric points spooled to %s",
                            len(spilled), self.spool.metrics_path)
            if not self._closing:
                self._stop.wait(min(5.0, 0.2 * self._failures))

    def _upload_checkpoints(self) -> None:
        with self._lock:
            if not self._checkpoints_due:
                return
            pending, self._checkpoints = self._checkpoints, {}
            self._checkpoints_due = False
        for name, stage in pending.items():
            try:
                for file in (name, f"{name}.sha256"):  # the checksum last, as on disk
                    self.client.log_artifact(self.run_id, str(stage / file), "checkpoints")
            except Exception as exc:  # network, server or store errors
                log.warning("tracking: upload of checkpoints/%s failed (%s); retried at the next "
                            "checkpoint", name, exc)
                with self._lock:  # kept unless a newer one arrived meanwhile
                    kept = self._checkpoints.setdefault(name, stage) is stage
                if kept:
                    continue
            shutil.rmtree(stage, ignore_errors=True)

    def _start_system_metrics(self, *, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._system = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_interval_s,
                resume_logging=resume,
                tracking_uri=self.uri,
            )
            self._system.start()
        except Exception as exc:  # psutil/NVML unavailable: warn once, keep training
            log.warning("tracking: system metrics unavailable (%s)", exc)
            self._system = None


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str):
    """MLflow's fluent API pointed at ``uri`` for a moment; the global URI and the
    ``MLFLOW_TRACKING_URI`` variable are restored exactly (MLflow's own ``_use_tracking_uri``
    unsets the variable when no global URI was set)."""
    if uri == tracking_uri():
        yield
        return
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = old_global
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def download_checkpoint(run_id: str, directory: Path) -> Path:
    """Download run ``run_id``'s checkpoint artifacts into ``directory``: ``last.pt`` (the
    newest) and ``best.pt`` if there is one, each with its ``.sha256`` file; the folder they
    are in. An unknown run is a :class:`PipelineError`, a run without ``checkpoints/last.pt``
    a :class:`CheckpointError`.
    """
    client = MlflowClient(tracking_uri())
    try:
        files = {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")}
    except MlflowException:
        raise PipelineError(f"--run-id {run_id}: no such MLflow run at {tracking_uri()}") from None
    if "last.pt" not in files:
        raise CheckpointError(
            f"--run-id {run_id}: the run has no checkpoint artifact (checkpoints/last.pt)"
        )
    wanted = [n for n in ("last.pt", "last.pt.sha256", "best.pt", "best.pt.sha256") if n in files]
    local = [client.download_artifacts(run_id, f"checkpoints/{n}", str(directory)) for n in wanted]
    return Path(local[0]).parent


def _model_requirements() -> list[str]:
    """pip requirements of a logged model: mlflow, torch, cloudpickle and this package."""
    import mlflow
    import mlflow.pytorch

    requirements = [f"mlflow=={mlflow.__version__}", *mlflow.pytorch.get_default_pip_requirements()]
    try:
        requirements.append(f"{_DISTRIBUTION}=={importlib.metadata.version(_DISTRIBUTION)}")
    except importlib.metadata.PackageNotFoundError:
        log.debug("tracking: %s is not installed; not listed in the model's requirements",
                  _DISTRIBUTION)
    return requirements


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


def _str_values(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if v is not None}
