"""Terminal progress: a bar with loss, LR, samples/s, health and ETA on a terminal (a fake one,
and the CLI on a pseudo-terminal); no bar and the log lines unchanged when stderr is not a
terminal; neither bar nor INFO lines with --quiet."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import optuna
import pytest

from conftest import TINY_RUN
from pipeline.config.loader import load_config
from pipeline.monitor.progress import StepProgress, TrialProgress, should_draw
from pipeline.train.trainer import train

TINY = [*TINY_RUN, "tracking.enabled=false"]
#: What only a drawn bar writes: a percentage before the bar, and tqdm's ETA.
BAR = re.compile(r"\d+%\||ETA ")
STEP_LINE = re.compile(r"step (\d+)/\d+ loss")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def info(caplog):
    caplog.set_level(logging.INFO, logger="pipeline")


@pytest.fixture
def console(monkeypatch):
    """A console handler on the root logger writing to ``sys.stderr``, as ``basicConfig`` in
    the CLI; the test chooses what ``sys.stderr`` is first."""
    handlers = []

    def install(stream) -> None:
        monkeypatch.setattr(sys, "stderr", stream)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        handlers.append(handler)

    yield install
    for handler in handlers:
        logging.getLogger().removeHandler(handler)


def test_step_bar_on_a_terminal_shows_loss_lr_throughput_health_and_eta(info):
    stream = FakeTerminal()
    with StepProgress(10, stream=stream) as progress:
        assert progress.drawn
        for step in range(1, 11):
            progress.update(step, loss=0.5 / step, lr=2e-4, samples_per_s=12.5,
                            health="warning")
    out = stream.getvalue()
    assert "train: 100%|" in out and "10/10" in out and "ETA " in out
    assert "loss 0.0500 lr 0.0002 12.5 samples/s health warning" in out
    assert not progress.drawn  # closed with the block


def test_log_lines_on_a_terminal_print_above_the_bar_unbroken(info, console):
    stream = FakeTerminal()
    console(stream)
    log = logging.getLogger("pipeline.train.trainer")
    with StepProgress(3, stream=stream) as progress:
        for step in range(1, 4):
            progress.update(step, loss=1.0, lr=1e-3, samples_per_s=1.0, health="healthy")
            log.info("step %d/3 loss %.4f", step, 1.0)
    out = stream.getvalue()
    # Each line starts where the bar was cleared (after "\r") and ends with its newline.
    whole = re.findall(r"[\r\n]INFO pipeline\.train\.trainer: step (\d)/3 loss 1\.0000\n", out)
    assert whole == ["1", "2", "3"]
    assert BAR.search(out)


def test_no_bar_when_not_a_terminal_or_quiet(caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    assert should_draw(FakeTerminal())
    assert not should_draw(io.StringIO())
    caplog.set_level(logging.WARNING, logger="pipeline")  # what --quiet sets
    assert not should_draw(FakeTerminal())
    stream = FakeTerminal()
    with StepProgress(5, stream=stream) as progress:
        progress.update(1, loss=1.0, lr=1e-3, samples_per_s=1.0, health="healthy")
    assert not progress.drawn and stream.getvalue() == ""


def test_trial_bar_counts_trials_by_state_and_shows_the_best(info):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise optuna.TrialPruned()
        return x

    stream = FakeTerminal()
    with TrialProgress(3, desc="tune demo", stream=stream) as progress:
        study.optimize(objective, n_trials=3, callbacks=[progress])
    out = stream.getvalue()
    assert "tune demo: 100%|" in out and "3/3" in out
    best = f"best {study.best_value:.4g} (trial {study.best_trial.number})"
    assert f"complete 2 pruned 1 {best}" in out
    assert progress.states == {"complete": 2, "pruned": 1}


def test_training_off_a_terminal_keeps_the_log_lines_and_draws_no_bar(tmp_path, info, console,
                                                                     capsys):
    console(sys.stderr)  # pytest's capture: not a terminal
    config = load_config(scenario="debug", overrides=[*TINY, f"output_dir={tmp_path}"])
    train(config)
    err = capsys.readouterr().err
    assert [int(n) for n in STEP_LINE.findall(err)] == [1, 2, 3, 4]
    assert re.search(r"^INFO pipeline\.train\.trainer: epoch 2 step 4: .*val/lddt=", err,
                     re.MULTILINE)
    assert not BAR.search(err) and "\r" not in err


def _on_terminal(args: list[str], cwd, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m pipeline *args`` with stdout and stderr on a pseudo-terminal (160
    columns); returns the exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def _train_args(tmp_path) -> list[str]:
    sets = [*TINY, f"output_dir={tmp_path / 'out'}"]
    return ["train", "--scenario", "debug", *[a for s in sets for a in ("--set", s)]]


def test_cli_on_a_terminal_draws_the_bar_with_the_log_lines_above_it(tmp_path):
    code, out = _on_terminal(_train_args(tmp_path), tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(r"train: +\d+%\|.*\| 4/4 \[[^\]]*ETA [^\]]*loss \d+\.\d{4} lr \S+ "
                     r"[\d.]+ samples/s health healthy\]", out), out[-3000:]
    # The terminal turns "\n" into "\r\n"; each step line starts a line of its own.
    steps = re.findall(r"[\r\n]\S+ \S+ INFO pipeline\.train\.trainer: step (\d)/4 loss [^\r\n]*"
                       r"\r\n", out)
    assert steps == ["1", "2", "3", "4"]


def test_cli_quiet_on_a_terminal_prints_neither_bar_nor_info_lines(tmp_path):
    code, out = _on_terminal(["--quiet", *_train_args(tmp_path)], tmp_path)
    assert code == 0, out[-3000:]
    assert " INFO " not in out and not STEP_LINE.search(out) and not BAR.search(out)
    assert "run (untracked) finished: step 4" in out  # the result line on stdout stays
