"""What a run could not send to its tracking server, kept on disk, and ``sync``, which sends it.

A run's ``<run_dir>/tracking/`` folder holds:

- ``unsent-metrics.jsonl``: metric points the tracker could not send (one JSON object per
  line, oldest first). The tracker spills its memory buffer here during a long outage and at
  the end of a run whose server is down, and sends this file first whenever the server answers
  again (also when the run is resumed).
- ``unsent.json``: the run id and tracking URI they belong to, the run's final status if it
  could not be set, and the tags, texts and artifacts not sent (artifact files are copied to
  ``unsent-artifacts/``).
- ``offline.db`` and ``offline-artifacts/``: the whole run, logged there with
  ``tracking.offline=true``.

``python -m pipeline sync RUN_DIR`` sends both kinds to the tracking server that
``MLFLOW_TRACKING_URI`` names, and says what it sent. Hand-written because MLflow has no
offline mode or run copy of its own (``mlflow.log_*`` to a file store, then an export tool,
is the usual advice; that would mean a second dependency for a few dozen lines).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

METRICS_FILE = "unsent-metrics.jsonl"
PENDING_FILE = "unsent.json"
ARTIFACTS_DIR = "unsent-artifacts"
OFFLINE_DB = "offline.db"
OFFLINE_ARTIFACTS = "offline-artifacts"
SYNCED_FILE = "synced.json"
BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_BATCH_LIMIT = 100  # and at most 100 params


def offline_uri(directory: Path) -> str:
    return f"sqlite:///{Path(directory).resolve() / OFFLINE_DB}"


class Spool:
    """The unsent points and tasks of run ``run_id`` in ``directory``. Used from one thread
    at a time (the tracker's worker, or the tracker before its worker starts)."""

    def __init__(self, directory: Path, run_id: str, uri: str):
        self.directory = Path(directory)
        self.run_id = run_id
        self.uri = uri
        self.metrics_path = self.directory / METRICS_FILE

    # ------------------------------------------------------------------ metric points
    def append_metrics(self, metrics: list[Metric]) -> None:
        if not metrics:
            return
        self._write_meta()
        with open(self.metrics_path, "a") as fh:
            for m in metrics:
                fh.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[Metric]:
        if not self.metrics_path.is_file():
            return []
        points = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                key, value, timestamp, step = json.loads(line)
            except ValueError:  # a line cut by a kill in the middle of a write
                continue
            points.append(Metric(key, float(value), int(timestamp), int(step)))
        return points

    def keep_metrics(self, metrics: list[Metric]) -> None:
        """Replace the file's points with ``metrics`` (the ones still unsent)."""
        if not metrics:
            self.metrics_path.unlink(missing_ok=True)
            self._remove_meta_if_empty()
            return
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n"
                               for m in metrics))
        os.replace(tmp, self.metrics_path)

    def send_metrics(self, client: MlflowClient) -> int:
        """Send the file's points in order; those not sent stay. Raises what the client does."""
        points = self.read_metrics()
        sent = 0
        try:
            while sent < len(points):
                chunk = points[sent : sent + BATCH_LIMIT]
                client.log_batch(self.run_id, metrics=chunk)
                sent += len(chunk)
        finally:
            if points:
                self.keep_metrics(points[sent:])
        return sent

    # ------------------------------------------------------------------ tasks and status
    def save_tasks(self, tasks: list[tuple], status: str | None) -> None:
        """Record tasks (``("tags", dict)``, ``("text", text, file)``, ``("artifact", path,
        folder)``) and the run's final status; artifact files are copied into the spool."""
        meta = self._read_meta()
        saved = meta.setdefault("tasks", [])
        for task in tasks:
            if task[0] == "artifact":
                source = Path(task[1])
                if not source.exists():
                    log.warning("tracking: %s is gone; not kept for sync", source)
                    continue
                target = self.directory / ARTIFACTS_DIR / str(len(saved)) / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
                task = ("artifact", str(target), task[2])
            saved.append(list(task))
        if status is not None:
            meta["status"] = status
        self._write_meta(meta)

    def pending_tasks(self) -> tuple[list[tuple], str | None]:
        meta = self._read_meta()
        return [tuple(t) for t in meta.get("tasks", [])], meta.get("status")

    def clear_tasks(self) -> None:
        meta = self._read_meta()
        meta.pop("tasks", None)
        meta.pop("status", None)
        self._write_meta(meta)
        shutil.rmtree(self.directory / ARTIFACTS_DIR, ignore_errors=True)
        self._remove_meta_if_empty()

    def has_anything(self) -> bool:
        tasks, status = self.pending_tasks()
        return self.metrics_path.is_file() or bool(tasks) or status is not None

    # ------------------------------------------------------------------ internals
    def _read_meta(self) -> dict[str, Any]:
        path = self.directory / PENDING_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_meta(self, meta: dict[str, Any] | None = None) -> None:
        meta = self._read_meta() if meta is None else meta
        meta.update(run_id=self.run_id, tracking_uri=self.uri)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (PENDING_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.directory / PENDING_FILE)

    def _remove_meta_if_empty(self) -> None:
        meta = self._read_meta()
        if not meta.get("tasks") and meta.get("status") is None and not self.metrics_path.exists():
            (self.directory / PENDING_FILE).unlink(missing_ok=True)


def run_task(client: MlflowClient, run_id: str, task: tuple) -> None:
    kind = task[0]
    if kind == "tags":
        tags = [RunTag(k, str(v)) for k, v in task[1].items() if v is not None]
        if tags:
            client.log_batch(run_id, tags=tags)
    elif kind == "text":
        client.log_text(run_id, task[1], task[2])
    elif kind == "artifact":
        path = Path(task[1])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), task[2])
        else:
            client.log_artifact(run_id, str(path), task[2])
    else:
        raise ValueError(f"unknown tracking task {kind!r}")


# ---------------------------------------------------------------------------- sync
def sync(run_dir: Path, uri: str) -> str:
    """Send what ``run_dir`` kept (unsent points and tasks, an offline run) to ``uri``."""
    directory = Path(run_dir) / "tracking"
    if (directory / OFFLINE_DB).is_file():  # a local store never fails: nothing else is kept
        return _copy_offline_run(directory, uri)
    if not (directory / PENDING_FILE).is_file():
        raise PipelineError(
            f"sync {run_dir}: nothing to send (no {directory / PENDING_FILE} or "
            f"{directory / OFFLINE_DB})"
        )
    meta = json.loads((directory / PENDING_FILE).read_text())
    if meta.get("tracking_uri") != uri:
        log.info("sync: the run was logged to %s; sending to %s", meta.get("tracking_uri"), uri)
    return _send_spool(Spool(directory, meta["run_id"], uri), MlflowClient(uri))


def _send_spool(spool: Spool, client: MlflowClient) -> str:
    try:
        client.get_run(spool.run_id)
    except Exception:
        raise PipelineError(
            f"sync: run {spool.run_id} is not at {spool.uri} (set MLFLOW_TRACKING_URI to the "
            f"server the run was logged to)"
        ) from None
    n_points = spool.send_metrics(client)
    tasks, status = spool.pending_tasks()
    for task in tasks:
        run_task(client, spool.run_id, task)
    if status is not None:
        client.set_terminated(spool.run_id, status=status)
    spool.clear_tasks()
    return (f"run {spool.run_id}: sent {n_points} metric points, {len(tasks)} tags/artifacts"
            + (f", status {status}" if status else "") + f" to {spool.uri}")


def _copy_offline_run(directory: Path, uri: str) -> str:
    """Copy each run of the offline store to ``uri`` once (recorded in ``synced.json``)."""
    source = MlflowClient(offline_uri(directory))
    target = MlflowClient(uri)
    synced_path = directory / SYNCED_FILE
    synced = json.loads(synced_path.read_text()) if synced_path.is_file() else {}
    copied = []
    for experiment in source.search_experiments():
        for run in source.search_runs([experiment.experiment_id]):
            if run.info.status == "RUNNING":
                log.warning("sync: offline run %s is still RUNNING (a killed run: resume it "
                            "first to finish it); copying what it has", run.info.run_id)
            new_id = synced.get(run.info.run_id)
            if new_id is None:
                new_id = _new_run(target, experiment.name, run)
            _copy_run(source, target, run, new_id)
            synced[run.info.run_id] = new_id
            synced_path.write_text(json.dumps(synced, indent=1))
            copied.append(new_id)
    if not copied:
        raise PipelineError(f"sync: {directory / OFFLINE_DB} holds no run")
    return f"offline run(s) copied to {uri} as {', '.join(copied)}"


def _new_run(target: MlflowClient, experiment_name: str, run) -> str:
    experiment = target.get_experiment_by_name(experiment_name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else target.create_experiment(experiment_name))
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    tags["mlflow.runName"] = run.info.run_name
    tags["offline_run_id"] = run.info.run_id
    created = target.create_run(experiment_id, start_time=run.info.start_time, tags=tags,
                                run_name=run.info.run_name)
    return created.info.run_id


def _copy_run(source: MlflowClient, target: MlflowClient, run, new_id: str) -> None:
    """Params, tags, full metric histories (points the target has are not sent twice),
    artifacts and status of ``run`` into ``new_id``."""
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), PARAM_BATCH_LIMIT):
        target.log_batch(new_id, params=params[i : i + PARAM_BATCH_LIMIT])
    tags = [RunTag(k, v) for k, v in run.data.tags.items() if not k.startswith("mlflow.")]
    if tags:
        target.log_batch(new_id, tags=tags)
    have = {m.key: m.step for m in target.get_run(new_id).data._metric_objs}
    points = []
    for key in run.data.metrics:
        points += [m for m in source.get_metric_history(run.info.run_id, key)
                   if m.step > have.get(key, -1)]
    points.sort(key=lambda m: (m.step, m.timestamp))
    for i in range(0, len(points), BATCH_LIMIT):
        target.log_batch(new_id, metrics=points[i : i + BATCH_LIMIT])
    scratch = Path(tempfile.mkdtemp(prefix="sync-"))
    try:
        if source.list_artifacts(run.info.run_id):
            local = source.download_artifacts(run.info.run_id, "", str(scratch))
            target.log_artifacts(new_id, local)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if run.info.status != "RUNNING":
        target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
