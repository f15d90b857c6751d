"""Terminal progress: a tqdm bar over optimizer steps (and one over tuning trials).

The bar is drawn only where a person watches: when stderr is a terminal and INFO is logged
(not ``--quiet``). Otherwise (CI logs, files, pipes, ``--quiet``, DDP ranks other than 0, whose
level is WARNING) nothing is drawn and the log lines are the only output, exactly as without
this module. While a bar is drawn, console log handlers write through ``tqdm.write``, so a log
line appears above the bar instead of breaking it. ``TQDM_DISABLE=1`` turns bars off.

The step bar shows steps done / total, elapsed time, tqdm's ETA and, as its postfix, the loss,
LR, samples/s and health status of the newest step; the trial bar shows trials finished and
the best value so far.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import IO, Any

#: Loggers whose console handlers are redirected while a bar is drawn: the root (the CLI's
#: ``basicConfig`` handler) and the libraries that install their own console handler.
REDIRECTED_LOGGERS = ("", "mlflow", "optuna")
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]"
)


def should_draw(stream: IO[str] | None = None) -> bool:
    """Whether to draw a bar on ``stream`` (default: ``sys.stderr``): it is a terminal and the
    ``pipeline`` logger logs INFO (``--quiet`` sets WARNING)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        on_terminal = bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        on_terminal = False
    return on_terminal and logging.getLogger("pipeline").isEnabledFor(logging.INFO)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


class _Bar:
    """A tqdm bar opened on ``with`` (when :func:`should_draw`), with console logging redirected
    through ``tqdm.write`` while it is open; every method does nothing when no bar is drawn."""

    unit = "it"

    def __init__(self, total: int, *, desc: str, initial: int = 0, stream: IO[str] | None = None):
        if total < 0:
            raise ValueError(f"total must be at least 0, but got total={total}.")
        self.total = total
        self.desc = desc
        self.initial = initial
        self.stream = stream
        self.bar: Any = None  # tqdm instance while drawn
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self):
        if not should_draw(self.stream):
            return self
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack = contextlib.ExitStack()
        self.bar = stack.enter_context(
            tqdm(
                total=self.total, initial=self.initial, desc=self.desc, unit=self.unit,
                file=self.stream if self.stream is not None else sys.stderr,
                bar_format=BAR_FORMAT, dynamic_ncols=True, leave=None,
            )
        )
        loggers = [logging.getLogger(name) for name in REDIRECTED_LOGGERS]
        # Only loggers that print to the console now: tqdm adds its handler to every logger
        # it is given, which would make a silent (propagating) logger print twice.
        loggers = [lg for lg in loggers if any(_is_console(h) for h in lg.handlers)]
        if loggers:
            stack.enter_context(logging_redirect_tqdm(loggers=loggers))
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._stack, self.bar = self._stack, None, None
        if stack is not None:
            stack.close()

    @property
    def drawn(self) -> bool:
        return self.bar is not None


class StepProgress(_Bar):
    """The training bar over optimizer steps ``initial..total`` (a resumed run starts at its
    step).

    Example::

        with StepProgress(total_steps, initial=step) as progress:
            for step in range(step + 1, total_steps + 1):
                ...
                progress.update(step, loss=loss, lr=lr, samples_per_s=rate, health="healthy")
    """

    unit = "step"

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
                 stream: IO[str] | None = None):
        super().__init__(total, desc=desc, initial=initial, stream=stream)

    def update(self, step: int, *, loss: float, lr: float, samples_per_s: float,
               health: str) -> None:
        """Show step ``step`` (it may go back: a rollback) with its values; tqdm redraws at
        most every 0.1 s, so this costs microseconds per step."""
        bar = self.bar
        if bar is None:
            return
        bar.set_postfix_str(
            f"loss {loss:.4f} lr {lr:.3g} {samples_per_s:.1f} samples/s health {health}",
            refresh=False,
        )
        bar.update(step - bar.n)


class TrialProgress(_Bar):
    """The tuning bar over ``total`` trials; pass it as an Optuna ``callbacks`` entry.

    Example::

        with TrialProgress(n_trials, desc="tune") as progress:
            study.optimize(objective, n_trials=n_trials, callbacks=[progress])
    """

    unit = "trial"

    def __init__(self, total: int, *, desc: str = "tune", stream: IO[str] | None = None):
        super().__init__(total, desc=desc, stream=stream)
        self.states: dict[str, int] = {}

    def __call__(self, study: Any, trial: Any) -> None:
        """Optuna callback: one more trial finished (complete, pruned or failed)."""
        state = trial.state.name.lower()
        self.states[state] = self.states.get(state, 0) + 1
        if self.bar is None:
            return
        parts = [f"{k} {v}" for k, v in sorted(self.states.items())]
        if len(study.directions) == 1:
            with contextlib.suppress(ValueError):  # no complete trial yet
                parts.append(f"best {study.best_value:.4g} (trial {study.best_trial.number})")
        else:
            parts.append(f"pareto front {len(study.best_trials)}")
        self.bar.set_postfix_str(" ".join(parts), refresh=False)
        self.bar.update(1)
