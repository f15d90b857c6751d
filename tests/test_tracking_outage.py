"""Tracking outages: a real `mlflow server` (PostgreSQL backend on 127.0.0.1) stopped mid-run
and at the end of a run, a server that cannot be reached at start, and offline mode.

Training must not wait on the network, and no metric point may be lost: they are buffered and
re-sent, spooled to disk past `tracking.max_buffered_points`, and what is still unsent when the
run ends is sent later by `python -m pipeline sync RUN_DIR`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests

from conftest import free_port

STEPS = 128  # 16 structures / micro-batch 2 x 16 epochs: ~50 s, room for a slow restart
RUN = [
    "data.n_train=16", "data.n_val=2", "data.max_length=28", "trainer.micro_batch_size=2",
    "trainer.epochs=16", "trainer.val_max_structures=2", "trainer.val_sampler_steps=2",
    "tracking.system_metrics=false", "tracking.log_every_steps=1",
    "tracking.flush_interval_s=0.5", "tracking.max_buffered_points=200",
    # Steps of ~0.3 s, so that an outage of seconds falls in the middle of the run.
    f"faults.slow_batch_at_steps=[{','.join(str(i) for i in range(1, STEPS + 1))}]",
    "faults.slow_batch_seconds=0.3",
]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 that can be stopped and started again on the same port."""

    def __init__(self, backend: str, artifacts: Path, log: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"mlflow server did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path, pg_url):
    srv = MlflowServer(pg_url, tmp_path / "server-artifacts", tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _train(out: Path, uri: str, log_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    sets = [*RUN, f"output_dir={out}", *extra]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train", "--scenario", "debug",
             *[a for s in sets for a in ("--set", s)]],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent,
        )


def _last_step(log_path: Path) -> int:
    steps = re.findall(r"step (\d+)/\d+ loss", log_path.read_text())
    return int(steps[-1]) if steps else 0


def _wait_for_step(proc: subprocess.Popen, log_path: Path, step: int, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while _last_step(log_path) < step:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_outages_mid_run_and_at_the_end_lose_no_metric_point(tmp_path, server):
    """Two outages of a PostgreSQL-backed tracking server in one run.

    1. Stopped at step 3 and started again (a restart takes 10-20 s here): training goes on
       meanwhile (steps are logged during the outage), unsent points pass
       `max_buffered_points` and are spooled to disk, and everything is sent once the server
       is back.
    2. Stopped near the end and left down: the run still finishes (exit 0), keeps what it
       could not send in `<run_dir>/tracking/`, and says to run `python -m pipeline sync`;
       after the server is back, `sync` sends it.

    Afterwards the run has `train/loss` at every step 1..128 exactly once, its validation
    points, its health report and status FINISHED."""
    out = tmp_path / "out"
    out.mkdir()
    log_path = tmp_path / "train.log"
    proc = _train(out, server.uri, log_path)

    _wait_for_step(proc, log_path, 3)
    down_at = time.monotonic()
    server.stop()
    step_at_stop = _last_step(log_path)
    time.sleep(3)
    server.start()
    first_outage_s = time.monotonic() - down_at
    steps_during_outage = _last_step(log_path) - step_at_stop
    spool = next((out / "runs").iterdir()) / "tracking" / "unsent-metrics.jsonl"
    deadline = time.monotonic() + 120
    while "answers again" not in log_path.read_text() or spool.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)
    assert _last_step(log_path) < STEPS - 10, "the run must still be going for the 2nd outage"

    server.stop()  # second outage: until the run has ended
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "unsent metric points spooled to" in text  # past max_buffered_points
    assert "answers again; sending resumed" in text
    sync_hint = re.search(r"`python -m pipeline sync (\S+)`", text)
    assert sync_hint, text[-3000:]
    run_dir = Path(sync_hint.group(1))
    assert (run_dir / "tracking" / "unsent.json").is_file()

    # Training never waited on the server: ~0.4 s per step (plus validations), so well over
    # one step per second down; a loop waiting on the network would log none.
    assert steps_during_outage >= first_outage_s, (steps_during_outage, first_outage_s)
    print(f"first outage {first_outage_s:.1f} s, {steps_during_outage} steps meanwhile")

    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    sync = subprocess.run([sys.executable, "-m", "pipeline", "sync", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "status FINISHED" in sync.stdout
    assert not (run_dir / "tracking" / "unsent.json").exists()
    assert not (run_dir / "tracking" / "unsent-metrics.jsonl").exists()

    client = mlflow.MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "train/loss") == list(range(1, STEPS + 1))
    assert _steps(client, run.info.run_id, "train/lr") == list(range(1, STEPS + 1))
    assert len(_steps(client, run.info.run_id, "val/lddt")) == 16
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "health")}
    assert "health/report.md" in artifacts
    assert run.data.tags.get("status") == "finished"


def test_unreachable_tracking_server_at_start_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--scenario", "debug",
         "--set", f"output_dir={tmp_path / 'out'}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLFLOW_TRACKING_URI: tracking server")
    assert "tracking.offline=true" in lines[0]
    assert not (tmp_path / "out" / "runs").exists()  # nothing started


@pytest.mark.slow
def test_offline_run_is_uploaded_by_sync(tmp_path):
    """`tracking.offline=true` trains with an unreachable server, into the run directory's
    store; `sync` copies params, the full metric history, artifacts and status to the server
    (here a sqlite store), once: a second `sync` adds nothing."""
    out = tmp_path / "out"
    out.mkdir()
    log_path = tmp_path / "train.log"
    proc = _train(out, f"http://127.0.0.1:{free_port()}", log_path, "tracking.offline=true",
                  "trainer.epochs=2", "faults.slow_batch_at_steps=[]")  # 16 steps
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    target = f"sqlite:///{tmp_path / 'central.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": target}
    for _ in range(2):
        sync = subprocess.run([sys.executable, "-m", "pipeline", "sync", str(run_dir)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert sync.returncode == 0, sync.stderr[-3000:]
    client = mlflow.MlflowClient(target)
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.epochs"] == "2"
    assert _steps(client, run.info.run_id, "train/loss") == list(range(1, 17))
    assert {"health", "config"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
