"""Corrupt and mismatched checkpoints for ``train --resume PATH`` and ``--resume auto``.

Each is reported in one line naming the file; ``auto`` skips it with a warning naming it and
resumes from the newest checkpoint that is valid and written for the configured model; with
none, it starts fresh (as ``train`` documents).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.config.loader import load_config, model_hash
from pipeline.train.checkpoint import load_checkpoint, write_checkpoint

SETS = [
    "data.n_train=8",
    "data.n_val=2",
    "data.max_length=24",
    "trainer.micro_batch_size=4",
    "trainer.epochs=2",
    "trainer.val_max_structures=2",
    "trainer.val_sampler_steps=2",
    "trainer.checkpoint_every_steps=1",
    "trainer.keep_last=4",
    "tracking.system_metrics=false",
    "tracking.log_checkpoints=false",
]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _argv(out: Path, *extra: str) -> list[str]:
    sets = [*SETS, f"output_dir={out}", *extra]
    return ["train", "--scenario", "debug", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run (4 optimizer steps, a checkpoint at each): ``<root>/out``, ``mlflow.db``."""
    root = tmp_path_factory.mktemp("trained")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        assert main(_argv(root / "out")) == 0
    finally:
        if old is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return root


@pytest.fixture
def out(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained run's output and MLflow store; cwd is ``tmp_path``."""
    shutil.copytree(trained / "out", tmp_path / "out")
    shutil.copy(trained / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "out"


def _checkpoints(out: Path) -> list[Path]:
    """Step checkpoints, oldest first, with strictly increasing modification times."""
    paths = sorted(out.glob("runs/*/checkpoints/step-*.pt"))
    now = time.time()
    for i, path in enumerate(paths):
        os.utime(path, (now - 100 + i, now - 100 + i))
    return paths


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_for_preset(path: Path, preset: str) -> None:
    """Re-save ``path`` (valid checksum) as written for the model of another size preset."""
    state = load_checkpoint(path)
    other = load_config(scenario="debug", preset=preset, overrides=SETS)
    state["model_hash"] = model_hash(other)
    write_checkpoint(path, state)


def _running_runs() -> list[str]:
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments) if r.info.status == "RUNNING"]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "checksum mismatch"),
        (_flip_bit, "checksum mismatch"),
        (lambda p: _rewrite_for_preset(p, "base_model"), "written for another model configuration"),
    ],
    ids=["truncated", "bit-flipped", "other-preset"],
)
def test_resume_from_a_damaged_path_is_one_line_naming_the_file(out, damage, reason, capsys):
    path = _checkpoints(out)[-1]
    damage(path)
    assert main([*_argv(out), "--resume", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and reason in line
    assert _running_runs() == []


def test_resume_path_written_for_another_model_width_is_refused(out, capsys):
    path = _checkpoints(out)[-1]
    assert main([*_argv(out), "--resume", str(path), "--set", "model.d_single=32"]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "another model configuration" in line


def test_resume_auto_skips_every_bad_checkpoint_and_uses_the_newest_good_one(
    out, caplog, capsys
):
    *older, good, wrong_width, flipped, truncated = _checkpoints(out)
    # A checkpoint with a valid checksum but another model width: the run's own, re-saved.
    state = load_checkpoint(wrong_width)
    state["model_hash"] = model_hash(load_config(scenario="debug", overrides=[*SETS, "model.d_single=32"]))
    write_checkpoint(wrong_width, state)
    _flip_bit(flipped)
    _truncate(truncated)
    _checkpoints(out)  # re-establish the order after rewriting

    with caplog.at_level(logging.INFO):
        code = main([*_argv(out, "trainer.epochs=3"), "--resume", "auto"])
    assert code == 0, capsys.readouterr().err
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert any(str(truncated) in m and "checksum mismatch" in m for m in skipped), skipped
    assert any(str(flipped) in m and "checksum mismatch" in m for m in skipped), skipped
    assert any(str(wrong_width) in m and "another model configuration" in m for m in skipped), skipped
    assert all(str(good) not in m for m in skipped)
    assert any(r.getMessage().startswith(f"resuming from {good} ") for r in caplog.records)
    assert _running_runs() == []


def test_resume_auto_with_no_usable_checkpoint_starts_fresh(out, caplog, capsys):
    existing = _checkpoints(out)
    for path in existing:
        _rewrite_for_preset(path, "base_model")
    runs_before = set(p.name for p in (out / "runs").iterdir())
    with caplog.at_level(logging.INFO):
        assert main([*_argv(out), "--resume", "auto"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if m.startswith("skipping checkpoint")]
    assert all(any(str(p) in m and "another model" in m for m in skipped) for p in existing)
    assert any("no valid checkpoint of this model" in m and "starting fresh" in m for m in messages)
    assert not any(m.startswith("resuming from") for m in messages)
    assert len(set(p.name for p in (out / "runs").iterdir()) - runs_before) == 1  # a new run dir
    assert _running_runs() == []
