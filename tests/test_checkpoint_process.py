"""Checkpoints written by the writer process: the same files as the thread writer, errors
raised in the trainer with their errno, a dead writer replaced by the thread, and a writer
that outlives neither the manager nor a Ctrl-C meant for the trainer."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

import pytest
import torch

from pipeline.errors import DiskFullError
from pipeline.train.checkpoint import CheckpointManager, load_checkpoint, rng_state, verify_checkpoint


def _state(fill: float = 0.0) -> dict:
    """Every kind of value a trainer checkpoint holds, tensors of several dtypes and shapes."""
    return {
        "model": {
            "w": torch.full((3, 5), fill),
            "half": torch.arange(7, dtype=torch.bfloat16) + fill,
            "ids": torch.arange(4, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 3),
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(fill), "exp_avg": torch.ones(3, 5) * fill}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },
        "rng": rng_state(),
        "position": (2, [1, 4, 9]),
        "config": {"name": "x", "value": None},
        "step": 12,
    }


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.fixture
def process_manager(tmp_path):
    managers = []

    def make(directory=None, **kwargs) -> CheckpointManager:
        manager = CheckpointManager(directory or tmp_path / "process", writer="process", **kwargs)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


def test_the_writer_process_writes_what_the_thread_writes(tmp_path, process_manager):
    state = _state(fill=1.5)
    thread = CheckpointManager(tmp_path / "thread")
    thread.save(state, 1)
    thread.wait()
    process = process_manager()
    process.save(state, 1)
    process.wait()
    a = tmp_path / "thread" / "step-00000001.pt"
    b = tmp_path / "process" / "step-00000001.pt"
    assert verify_checkpoint(b) is None
    _assert_same(load_checkpoint(a), load_checkpoint(b))  # weights_only loads, equal values
    assert a.read_bytes() == b.read_bytes()


def test_the_snapshot_is_taken_at_save_and_old_steps_are_pruned(process_manager, tmp_path):
    manager = process_manager(keep_last=2)
    state = _state()
    for step in (1, 2, 3):
        manager.save(state, step)
        state["model"]["w"] += 1  # training goes on; the snapshot must not see this
    manager.wait()
    names = sorted(p.name for p in (tmp_path / "process").glob("step-*.pt"))
    assert names == ["step-00000002.pt", "step-00000003.pt"]
    saved = load_checkpoint(tmp_path / "process" / "step-00000003.pt")
    assert torch.equal(saved["model"]["w"], torch.full((3, 5), 2.0))


def test_a_changed_state_layout_gets_a_new_buffer(process_manager, tmp_path):
    manager = process_manager()
    manager.save({"w": torch.ones(2)}, 1)
    manager.save({"w": torch.ones(5, dtype=torch.float64), "v": torch.zeros(3)}, 2)
    manager.wait()
    saved = load_checkpoint(tmp_path / "process" / "step-00000002.pt")
    _assert_same(saved, {"w": torch.ones(5, dtype=torch.float64), "v": torch.zeros(3),
                         "format_version": 1})


def test_an_error_in_the_writer_process_is_raised_with_its_errno(tmp_path, process_manager):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for manager in (CheckpointManager(blocker / "checkpoints"),
                    process_manager(blocker / "checkpoints")):
        manager.save(_state(), 1)
        with pytest.raises(OSError) as raised:
            manager.wait()
        assert raised.value.errno == errno.ENOTDIR


def test_a_killed_writer_process_is_replaced_by_the_thread(process_manager, tmp_path, caplog):
    manager = process_manager()
    manager.save(_state(), 1)
    manager.wait()
    os.kill(manager._process.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        manager.save(_state(fill=3.0), 2)
        manager.wait()
    assert "writing checkpoints in the training process" in caplog.text
    assert manager._process is None
    saved = load_checkpoint(tmp_path / "process" / "step-00000002.pt")
    _assert_same(saved["model"], _state(fill=3.0)["model"])


def test_the_writer_process_ignores_ctrl_c_and_ends_with_close(process_manager, tmp_path):
    manager = process_manager()
    manager.save(_state(), 1)
    manager.wait()
    writer = manager._process
    os.kill(writer.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    os.kill(writer.pid, signal.SIGTERM)
    time.sleep(0.2)
    manager.save(_state(fill=2.0), 2)
    manager.wait()
    assert manager._process is writer  # written by the same process, no fallback
    assert load_checkpoint(tmp_path / "process" / "step-00000002.pt")["step"] == 12
    manager.close()
    assert manager._process is None and not writer._process.is_alive()


def test_a_full_disk_in_the_writer_process_is_a_disk_full_error(small_fs, process_manager):
    point = small_fs("64k")
    manager = process_manager(point / "checkpoints")
    manager.save({"w": torch.zeros(8)}, 1)
    manager.wait()
    manager.save({"w": torch.zeros(1 << 16)}, 2)  # 256 KiB: does not fit
    with pytest.raises(DiskFullError, match="no space left on device"):
        manager.wait()
    assert verify_checkpoint(point / "checkpoints" / "step-00000001.pt") is None
    assert not (point / "checkpoints" / "step-00000002.pt").exists()
