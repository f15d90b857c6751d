"""A full disk, on a real small file system (tmpfs, mounted for the test; needs root):
too little space is a one-line error before training, and a disk that fills up mid-run is a
clean stop that keeps the last good checkpoint, from which the run resumes exactly."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.train.checkpoint import find_latest, load_checkpoint, verify_checkpoint

STEPS = 24  # 16 structures / micro-batch 2 x 3 epochs
RUN = [
    "data.n_train=16", "data.n_val=2", "data.max_length=28", "trainer.micro_batch_size=2",
    "trainer.epochs=3", "trainer.val_max_structures=2", "trainer.val_sampler_steps=2",
    "trainer.checkpoint_every_steps=2", "trainer.deterministic=true",
    "tracking.system_metrics=false",
    f"faults.slow_batch_at_steps=[{','.join(str(i) for i in range(1, STEPS + 1))}]",
    "faults.slow_batch_seconds=0.2",
]


def _train(out: Path, tmp_path: Path, log_path: Path, *args: str) -> subprocess.Popen:
    """`train` in the background, stderr to ``log_path``; ``args``: more CLI arguments."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sets = [*RUN, f"output_dir={out}"]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train", "--scenario", "debug", *args,
             *[a for s in sets for a in ("--set", s)]],
            env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path,
        )


def _fill(directory: Path) -> Path:
    """Write a file until the file system has no space left."""
    filler = directory / "filler.bin"
    chunk = b"\0" * (1 << 20)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while chunk:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk = chunk[: len(chunk) // 16]
    finally:
        os.close(fd)
    return filler


def test_too_little_space_is_one_line_before_training(tmp_path, small_fs):
    fs = small_fs("2m")  # the debug model's checkpoints need ~19 MB
    log_path = tmp_path / "train.log"
    proc = _train(fs / "out", tmp_path, log_path)
    assert proc.wait(timeout=300) == 2
    lines = log_path.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output_dir: "), lines
    assert "MB free at" in lines[0] and "checkpoints need about" in lines[0]
    assert not (fs / "out" / "runs").exists()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0"]) == []


@pytest.mark.slow
def test_disk_full_mid_run_stops_cleanly_and_the_resume_is_exact(tmp_path, small_fs):
    """The file system under `output_dir` is filled up after step 6: the next checkpoint
    write fails; its temporary file is removed, the run stops with exit 1 and one `error:`
    line naming the checkpoint and the last good one, and the MLflow run is FAILED with the
    error. Once space is freed, `--resume auto` finishes the run with weights equal to an
    uninterrupted run's."""
    clean_log = tmp_path / "clean.log"
    clean = _train(tmp_path / "clean", tmp_path, clean_log)
    assert clean.wait(timeout=300) == 0, clean_log.read_text()[-3000:]

    fs = small_fs("64m")
    out = fs / "out"
    log_path = tmp_path / "full.log"
    proc = _train(out, tmp_path, log_path)
    deadline = time.monotonic() + 300
    while not re.search(r"step [6-9]/\d+ loss", log_path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    filler = _fill(fs)
    assert proc.wait(timeout=300) == 1, log_path.read_text()[-3000:]
    last = log_path.read_text().strip().splitlines()[-1]
    match = re.fullmatch(r"error: checkpoint (\S+): no space left on device; the last good "
                         r"checkpoint is (\S+) \(free space, then `train --resume auto`\)", last)
    assert match, last
    good = Path(match.group(2))
    assert verify_checkpoint(good) is None
    assert not list(out.glob("runs/*/checkpoints/.*tmp*"))  # no partial file left behind
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(load_checkpoint(good)["run_id"])
    assert run.info.status == "FAILED"
    assert "no space left on device" in run.data.tags["error"]

    filler.unlink()
    resume_log = tmp_path / "resumed.log"
    resumed = _train(out, tmp_path, resume_log, "--resume", "auto")
    assert resumed.wait(timeout=300) == 0, resume_log.read_text()[-3000:]
    assert f"resuming from {good}" in resume_log.read_text()
    a, b = load_checkpoint(find_latest(tmp_path / "clean")), load_checkpoint(find_latest(out))
    assert a["step"] == b["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
