"""Injected faults on the CPU: OOM, NaN loss, SIGTERM + resume. Each asserts the outcome."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import TINY_RUN
from pipeline.config.loader import load_config
from pipeline.train.checkpoint import find_latest, load_checkpoint, read_entry
from pipeline.train.trainer import Interrupted, NonFiniteStop, train

TINY = [*TINY_RUN, "data.n_train=16", "tracking.system_metrics=false"]


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _config(tmp_path, *extra):
    return load_config(scenario="debug", overrides=[*TINY, f"output_dir={tmp_path / 'out'}", *extra])


def test_oom_is_retried_in_smaller_chunks_without_losing_samples(tmp_path):
    clean = train(_config(tmp_path, "tracking.enabled=false"))
    faulty = train(_config(tmp_path, "tracking.enabled=false", "faults.oom_at_steps=[2]",
                           "recovery.grow_back_after_steps=null"))
    assert faulty.status == "finished"
    assert faulty.step == clean.step and faulty.samples_seen == clean.samples_seen == 32
    state = load_checkpoint(faulty.checkpoint)
    assert state["counts"]["oom_recoveries"] == 1
    assert state["split"] == 2  # later micro-batches run as two chunks of 2


def test_epoch_end_checkpoints_follow_checkpoint_every_epochs(tmp_path):
    result = train(_config(tmp_path, "tracking.enabled=false", "trainer.epochs=4",
                           "trainer.keep_last=10", "trainer.checkpoint_every_epochs=2"))
    per_epoch = result.step // 4
    written = sorted(p.name for p in (tmp_path / "out").rglob("step-*.pt"))
    assert written == [f"step-{2 * per_epoch:08d}.pt", f"step-{4 * per_epoch:08d}.pt"]
    assert read_entry(Path(result.checkpoint), "epoch") == 4


def test_split_grows_back_after_a_stable_period(tmp_path):
    result = train(_config(tmp_path, "tracking.enabled=false", "faults.oom_at_steps=[2]",
                           "recovery.grow_back_after_steps=3"))
    state = load_checkpoint(result.checkpoint)
    assert state["counts"]["oom_recoveries"] == 1
    assert state["split"] == 1  # split at step 2, whole micro-batches again from step 5
    assert result.samples_seen == 32


def test_oom_without_recovery_fails_after_checkpointing(tmp_path):
    config = _config(tmp_path, "tracking.enabled=false", "recovery.oom=false",
                     "faults.oom_at_steps=[3]")
    with pytest.raises(torch.OutOfMemoryError):
        train(config)
    latest = find_latest(tmp_path / "out")
    assert latest is not None and load_checkpoint(latest)["step"] == 2  # a failing run saves first


def test_nan_loss_is_skipped_before_the_update(tmp_path):
    result = train(_config(tmp_path, "faults.nan_loss_at_steps=[2,3]"))
    assert result.status == "finished"
    state = load_checkpoint(result.checkpoint)
    assert state["counts"]["non_finite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["health/non_finite_count"] == 2
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/health/report.md")
    assert "non_finite" in report and "update skipped" in report


def test_repeated_nan_stops_with_a_report(tmp_path):
    config = _config(tmp_path, "faults.nan_loss_at_steps=[1,2,3,4]",
                     "recovery.max_consecutive_non_finite=3")
    with pytest.raises(NonFiniteStop, match="3 non-finite update"):
        train(config)
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert (tmp_path / "out").glob("runs/*/health/report.md")


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_checkpoints_and_resume_continues_the_same_run(tmp_path, writer, caplog):
    uninterrupted = train(_config(tmp_path / "a", "trainer.deterministic=true"))
    with pytest.raises(Interrupted) as stop, caplog.at_level(logging.INFO, "pipeline.train"):
        train(_config(tmp_path / "b", "trainer.deterministic=true", "faults.sigterm_at_step=3",
                      f"trainer.checkpoint_writer={writer}"))
    assert ("serialised by writer process" in caplog.text) == (writer == "process")
    assert stop.value.signum == signal.SIGTERM
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("diffold").experiment_id],
                              filter_string="tags.stop_reason = 'SIGTERM'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    resumed = train(_config(tmp_path / "b", "trainer.deterministic=true",
                            f"trainer.checkpoint_writer={writer}"), resume="auto")
    assert resumed.run_id == runs[0].info.run_id  # one continuous MLflow run
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == resumed.step
    a = load_checkpoint(uninterrupted.checkpoint)["model"]
    b = load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def test_sigterm_then_continue_the_run_on_another_machine(tmp_path, capsys):
    """`train --run-id` with an empty output_dir downloads the run's uploaded checkpoint
    (checksum verified), continues the same MLflow run and ends bit-identical."""
    from pipeline.cli import main

    sets = [*TINY, "data.n_train=8", "trainer.deterministic=true"]  # 2 steps/epoch, 4 in all
    reference = train(load_config(scenario="debug", overrides=[
        *sets, "tracking.enabled=false", f"output_dir={tmp_path / 'reference'}"]))
    with pytest.raises(Interrupted):  # after step 3: one validation (best.pt) and a checkpoint
        train(load_config(scenario="debug", overrides=[
            *sets, "faults.sigterm_at_step=3", f"output_dir={tmp_path / 'first'}"]))
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert run.info.status == "KILLED"
    capsys.readouterr()
    args = ["train", "--scenario", "debug", *[a for s in sets for a in ("--set", s)],
            "--set", f"output_dir={tmp_path / 'second'}", "--run-id", run.info.run_id]
    assert main(args) == 0
    assert f"run {run.info.run_id} finished: step 4" in capsys.readouterr().out
    (after,) = client.search_runs([run.info.experiment_id])  # no second run
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # one history, no gap, no step twice
    # The downloaded checkpoint went where a local one would be, best.pt beside it.
    (run_dir,) = (tmp_path / "second" / "runs").iterdir()
    assert run_dir.name == next((tmp_path / "first" / "runs").iterdir()).name
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    a = load_checkpoint(reference.checkpoint)["model"]
    b = load_checkpoint(find_latest(tmp_path / "second"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    uploaded = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/checkpoints/last.pt", dst_path=str(tmp_path / "down"))
    assert read_entry(Path(uploaded), "step") == 4  # uploads went on into the same run


def test_run_id_without_a_run_or_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from pipeline.cli import main

    args = ["train", "--scenario", "debug", "--set", f"output_dir={tmp_path / 'out'}"]
    assert main([*args, "--run-id", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --run-id 0123456789abcdef0123456789abcdef: no such MLflow run at "
                   f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    empty = client.create_run(client.create_experiment("empty")).info.run_id
    assert main([*args, "--run-id", empty]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --run-id {empty}: the run has no checkpoint artifact "
                   "(checkpoints/last.pt)")


def _train_cmd(out, *extra):
    sets = [*TINY, "trainer.epochs=3", "trainer.deterministic=true",
            "trainer.checkpoint_every_steps=2", f"output_dir={out}", *extra]
    return [sys.executable, "-m", "pipeline", "train", "--scenario", "debug",
            *[a for s in sets for a in ("--set", s)]]


KILL_RUN = ["trainer.micro_batch_size=2", "tracking.log_every_steps=1",
            "faults.checkpoint_write_delay_s=0.3"]


@pytest.mark.slow
def test_ten_sigkills_then_resume_is_exact_with_one_continuous_history(tmp_path):
    """Ten SIGKILLs, each followed by `--resume auto`: five right after a random step (during
    the next step or a background checkpoint write), five while a checkpoint's temporary file
    is written and not yet renamed (writes are held 0.3 s by fault injection to make the
    window). The final weights equal an uninterrupted run's; each resume starts at the newest
    checkpoint that was complete when the process died (a kill mid-write loses that write
    only); and the MLflow run is one history: `train/loss` has each step 1..24 once, with the
    uninterrupted run's values."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    clean = subprocess.run(_train_cmd(tmp_path / "clean", *KILL_RUN), env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    total = 24  # 16 structures / micro-batch 2 x 3 epochs
    rng = random.Random(7)
    completed = 0  # last step seen completed before a kill
    newest = 0  # newest complete checkpoint when the last process died
    kills = {"after_step": 0, "during_write": 0}
    for attempt in range(11):  # ten kills, then a run to the end
        mode = None if attempt == 10 else ("after_step", "during_write")[attempt % 2]
        target = min(completed + rng.randint(1, 3), total - 2)
        log_path = tmp_path / f"attempt-{attempt}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(_train_cmd(tmp_path / "killed", *KILL_RUN) + ["--resume", "auto"],
                                    env=env, stdout=log_file, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if mode is not None and _kill_moment(mode, log_path, tmp_path / "killed", target):
                    proc.send_signal(signal.SIGKILL)
                    kills[mode] += 1
                    break
                time.sleep(0.005)
            proc.wait(timeout=60)
        text = log_path.read_text()
        resumed = re.search(r"resuming from \S+ \(step (\d+)\)", text)
        start = int(resumed.group(1)) if resumed else 0
        assert attempt == 0 or resumed, text[-2000:]  # the first kill follows a checkpoint
        assert start == newest and completed - start <= 4, (attempt, completed, start, newest)
        steps = [int(n) for n in re.findall(r"step (\d+)/\d+ loss", text)]
        completed = steps[-1] if steps else start
        newest = max((int(p.name[5:13]) for p in (tmp_path / "killed").glob(
            "runs/*/checkpoints/step-*.pt.sha256")), default=0)
        if mode is None:
            assert proc.returncode == 0, text[-2000:]
        else:
            assert proc.returncode == -signal.SIGKILL, (mode, text[-2000:])
    assert kills == {"after_step": 5, "during_write": 5}
    final = lambda root: load_checkpoint(find_latest(root))  # noqa: E731
    a, b = final(tmp_path / "clean"), final(tmp_path / "killed")
    assert a["step"] == b["step"] == total
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(b["run_id"]).info.status == "FINISHED"
    killed, uninterrupted = _history(client, b["run_id"], "train/loss"), _history(
        client, a["run_id"], "train/loss")
    assert [s for s, _ in killed] == list(range(1, total + 1))
    assert killed == uninterrupted
    val_steps = [s for s, _ in _history(client, b["run_id"], "val/lddt")]
    assert val_steps == sorted(set(val_steps)) and len(val_steps) == 3


def _kill_moment(mode: str, log_path: Path, out: Path, target: int) -> bool:
    """after_step: step >= target is logged and a complete checkpoint exists;
    during_write: a checkpoint's temporary file of a step >= target exists."""
    if mode == "during_write":
        return any(int(p.name.split("-")[1].split(".")[0]) >= target
                   for p in out.glob("runs/*/checkpoints/.step-*.pt.tmp-*"))
    steps = [int(n) for n in re.findall(r"step (\d+)/\d+ loss", log_path.read_text())]
    return bool(steps) and steps[-1] >= target and any(
        out.glob("runs/*/checkpoints/step-*.pt.sha256"))


ROLLBACK = ["recovery.non_finite=rollback", "recovery.max_consecutive_non_finite=2",
            "trainer.checkpoint_every_steps=2"]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in the order logged (a rollback logs some steps twice)."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return [(m.step, m.value) for m in points]


def test_nan_streak_rolls_back_once_at_half_the_lr_and_finishes(tmp_path, caplog):
    """NaN at steps 3 and 4 (after the checkpoint of step 2): one rollback to step 2, the
    re-run steps at half the LR the schedule gave them, then the run finishes."""
    caplog.set_level("WARNING", logger="pipeline.train.trainer")
    result = train(_config(tmp_path, *ROLLBACK, "faults.nan_loss_at_steps=[3,4]",
                           "trainer.deterministic=true"))
    assert result.status == "finished" and result.step == 8 and result.samples_seen == 32
    state = load_checkpoint(result.checkpoint)
    assert state["counts"]["rollbacks"] == 1 and state["counts"]["non_finite_skipped"] == 2
    assert state["lr_scale"] == 0.5
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    client = mlflow.MlflowClient()
    lrs = _history(client, result.run_id, "train/lr")
    assert [s for s, _ in lrs] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    first, rerun = dict(lrs[2:4]), dict(lrs[4:6])
    assert rerun[3] == pytest.approx(0.5 * first[3]) and rerun[4] == pytest.approx(0.5 * first[4])
    losses = [v for _, v in _history(client, result.run_id, "train/loss")]
    assert [math.isnan(v) for v in losses] == [False, False, True, True] + [False] * 6
    # The loss terms (the injected NaN multiplies only the total) of step 3 before and after
    # the rollback: same weights, batch and noise, so the checkpoint's weights, data position
    # and RNG state were all restored.
    term = _history(client, result.run_id, "train/loss/diffusion")
    assert term[2][0] == term[4][0] == 3 and term[4][1] == pytest.approx(term[2][1], rel=1e-6)
    assert client.get_run(result.run_id).data.metrics["recovery/rollbacks"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if "rollback 1:" in r.getMessage()]
    assert "restored the checkpoint of step 2" in warning
    assert f"lr now {rerun[3]:.3g}" in warning
    report = json.loads(next((tmp_path / "out").glob("runs/*/health/report.json")).read_text())
    assert report["anomalies"]["non_finite"] == [3, 4] and report["anomalies"]["rollback"] == [4]


def test_persistent_nan_stops_after_two_rollbacks_with_exit_code_1(tmp_path, capsys):
    """NaN in every step from 3 on, re-runs included: two rollbacks to step 2 do not help, the
    third streak stops the run (exit 1, one error line, a report that says why)."""
    from pipeline.cli import main

    sets = [*TINY, *ROLLBACK, "faults.nan_loss_from_step=3", f"output_dir={tmp_path / 'out'}"]
    assert main(["train", "--scenario", "debug", *[a for s in sets for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: training stopped at step 4: 2 non-finite update(s) in a row "
        "(recovery.non_finite=rollback) after 2 rollback(s) that did not get past step 4 "
        "(recovery.max_rollbacks=2; LR now x0.25 of the schedule); see health/report.md"
    )
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["recovery/rollbacks"] == 2
    run_dir = next((tmp_path / "out").glob("runs/*"))
    report = json.loads((run_dir / "health" / "report.json").read_text())
    assert report["stopped"] == err[-1].removeprefix("error: ")
    assert report["recovery"]["rollbacks"] == 2 and report["recovery"]["non_finite_skipped"] == 6
    assert report["anomalies"]["rollback"] == [4, 4]
    assert report["checks"]["non_finite"]["status"] == "critical"
    markdown = (run_dir / "health" / "report.md").read_text()
    assert "**Run stopped:** training stopped at step 4" in markdown
    assert "| rollback | 4, 4 |" in markdown
    assert (run_dir / "plots" / "health.png").is_file()
    # No checkpoint was written during the streaks: the newest is still the good one.
    assert load_checkpoint(find_latest(tmp_path / "out"))["step"] == 2


def test_rollback_before_the_first_checkpoint_stops_with_a_clear_message(tmp_path):
    config = _config(tmp_path, "tracking.enabled=false", *ROLLBACK, "faults.nan_loss_from_step=1")
    with pytest.raises(NonFiniteStop, match="no checkpoint to roll back to yet"):
        train(config)


def test_loader_worker_processes_end_with_the_run(tmp_path):
    """Persistent DataLoader workers are stopped when train() returns, not at a later garbage
    collection (which, in a tuning study, stalled a later trial for tens of seconds)."""
    import gc

    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    gc.disable()  # nothing may rely on the collector to stop them
    try:
        result = train(_config(tmp_path, "tracking.enabled=false", "loader.num_workers=2",
                               "trainer.epochs=1"))
        # multiprocessing's fork server and resource tracker, children of this process, stay
        # for its lifetime (reused by every later loader); the workers, forked from the fork
        # server (so one level further down), are what must be gone
        helpers = {p.pid for p in me.children()
                   if any(h in " ".join(p.cmdline()) for h in ("forkserver", "resource_tracker"))}
        left = [p for p in me.children(recursive=True)
                if p.pid not in before | helpers and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        gc.enable()
    assert result.status == "finished"
    assert left == []
