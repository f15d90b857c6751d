"""The end-of-run report: ``plots/*.png`` and ``summary.md``, written in the run directory and
logged as artifacts of the MLflow run (``plots/<name>.png``, ``summary.md``).

Written once at the end of every run (finished, stopped early, pruned, interrupted or failed)
from what the trainer recorded while it ran: ``Trainer.history``, the ``(step, value)`` points
of the metrics it logged whose names start with :data:`HISTORY_PREFIXES` and every ``val/*``;
the health monitor's report; the per-residue pLDDT and true lDDT of the last validation; its
counters. Every number in a table of ``summary.md`` is a logged value (or the mean, median or
maximum of logged values) of the metric named in the row's first cell. A resumed run's history
starts at the resume, and a rollback drops the points after the step it restored (MLflow keeps
them), so the summary describes the steps this process kept.

Plots, each only when its data exist: ``loss_terms`` (total and per term, train and
validation), ``lr``, ``grad_norm`` (pre-clip, total and per module group, with the clip
threshold), ``memory`` (device and host, GiB), ``throughput`` (samples/s, residues/s and the
data/compute/optimizer/logging split of the sampled steps), ``validation`` (one panel per
``val/*`` metric) and ``plddt_calibration`` (mean true lDDT per pLDDT bin, last validation).
Figures use matplotlib's object-oriented API with the Agg canvas, like
:mod:`pipeline.monitor.plots`. Best effort: what cannot be drawn or written is a warning, never
the run's failure.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.monitor.plots import save_figure

log = logging.getLogger(__name__)

#: Metric names (prefixes) the trainer keeps in ``history`` besides every ``val/*``.
HISTORY_PREFIXES = (
    "train/loss", "train/lr", "train/grad_norm",
    "perf/samples_per_s", "perf/residues_per_s", "perf/step_time_ms", "perf/data_wait_ms",
    "perf/gpu_mem_", "perf/host_mem_", "perf/time/", "perf/train_wall_s",
    "perf/checkpoint_stall_",
)
#: The step-time split of :class:`pipeline.monitor.perf.PhaseTimer`, as ``perf/time/<x>_ms``.
PHASES = ("data", "compute", "optimizer", "logging")
MEMORY_KEYS = (
    ("perf/gpu_mem_allocated_gib", "device allocated"),
    ("perf/gpu_mem_reserved_gib", "device reserved"),
    ("perf/gpu_mem_peak_gib", "device peak allocated"),
    ("perf/host_mem_rss_gib", "host process (RSS)"),
)
THROUGHPUT_KEYS = ("perf/samples_per_s", "perf/residues_per_s", "perf/step_time_ms",
                   "perf/data_wait_ms")
#: Share of a step spent waiting for data above which the summary suggests more loader work.
DATA_WAIT_HINT_SHARE = 0.2
#: Checks that fired listed in the summary (worst first).
TOP_CHECKS = 5

History = dict[str, list[tuple[int, float]]]

@functools.cache
def _this_process():
    import psutil

    return psutil.Process()


def host_memory_metrics() -> dict[str, float]:
    """``perf/host_mem_rss_gib``: resident memory of this process in GiB (the memory plot's
    series on a CPU, where :func:`pipeline.monitor.perf.memory_metrics` has none)."""
    return {"perf/host_mem_rss_gib": _this_process().memory_info().rss / 1024**3}


# ============================================================================ plots
def _figure(n_rows: int, n_cols: int = 1, *, width: float = 9.0, height: float = 2.6,
            sharex: bool = True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, sharex=sharex, squeeze=False)
    return figure, axes


def _plot(ax, points: list[tuple[int, float]], **kwargs) -> list[float]:
    steps, values = zip(*points)
    ax.plot(steps, values, marker="." if len(steps) < 50 else None, **kwargs)
    return list(values)


def _log_scale_if_wide(ax, values: list[float]) -> None:
    """Log scale when all finite values are > 0 and span more than a decade."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")


def _sub_keys(history: History, prefix: str) -> list[str]:
    return sorted(k for k in history if k.startswith(prefix + "/") and history[k])


def plot_loss_terms(history: History):
    """Total loss (train, validation) and each loss term (train solid, validation dashed)."""
    totals = [k for k in ("train/loss", "val/loss") if history.get(k)]
    terms = sorted({k.split("/", 2)[2] for k in _sub_keys(history, "train/loss")
                    + _sub_keys(history, "val/loss")})
    if not totals and not terms:
        return None
    figure, axes = _figure(int(bool(totals)) + int(bool(terms)))
    row = iter(axes[:, 0])
    if totals:
        ax, values = next(row), []
        for key in totals:
            values += _plot(ax, history[key], label=key, linestyle="-" if "train" in key else "--")
        _log_scale_if_wide(ax, values)
        ax.set_ylabel("loss", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    if terms:
        ax, values = next(row), []
        for i, term in enumerate(terms):
            for split, style in (("train", "-"), ("val", "--")):
                points = history.get(f"{split}/loss/{term}")
                if points:
                    values += _plot(ax, points, color=f"C{i % 10}", linestyle=style,
                                    label=f"{split}/{term}")
        _log_scale_if_wide(ax, values)
        ax.set_ylabel("loss terms", fontsize=8)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle("Loss and loss terms (validation dashed)", fontsize=10)
    return figure


def plot_lr(history: History):
    """The learning rate at each logged optimizer step."""
    if not history.get("train/lr"):
        return None
    figure, axes = _figure(1)
    ax = axes[0, 0]
    _plot(ax, history["train/lr"])
    ax.set_ylabel("learning rate", fontsize=8)
    ax.set_xlabel("optimizer step")
    figure.suptitle("Learning rate", fontsize=10)
    return figure


def plot_grad_norm(history: History, *, clip: float | None = None):
    """Pre-clip gradient norm, total and per module group, with the clip threshold."""
    groups = _sub_keys(history, "train/grad_norm")
    if not history.get("train/grad_norm") and not groups:
        return None
    figure, axes = _figure(1, height=3.4)
    ax, values = axes[0, 0], []
    if history.get("train/grad_norm"):
        values += _plot(ax, history["train/grad_norm"], color="black", linewidth=1.5,
                        label="total")
    for i, key in enumerate(groups):
        values += _plot(ax, history[key], color=f"C{i % 10}", linewidth=1,
                        label=key.rsplit("/", 1)[1])
    if clip:
        ax.axhline(clip, color="grey", linestyle=":", label=f"clip {clip:g}")
    _log_scale_if_wide(ax, values + ([clip] if clip else []))
    ax.set_ylabel("pre-clip grad norm", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7, loc="upper right")
    figure.suptitle("Gradient norm (before clipping)", fontsize=10)
    return figure


def plot_memory(history: History):
    """Device memory (allocated, reserved, peak) and host process memory, GiB."""
    present = [(k, label) for k, label in MEMORY_KEYS if history.get(k)]
    if not present:
        return None
    figure, axes = _figure(1, height=3.2)
    ax = axes[0, 0]
    for key, label in present:
        _plot(ax, history[key], label=f"{label} ({key.removeprefix('perf/')})")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GiB", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7, loc="lower right")
    figure.suptitle("Memory", fontsize=10)
    return figure


def plot_throughput(history: History):
    """Samples/s and residues/s per logged step; below, the step-time split of the sampled
    steps (stacked, ms)."""
    rates = [k for k in ("perf/samples_per_s", "perf/residues_per_s") if history.get(k)]
    split = _phase_split(history)
    if not rates and not split:
        return None
    figure, axes = _figure(int(bool(rates)) + int(bool(split)))
    row = iter(axes[:, 0])
    if rates:
        ax = next(row)
        _plot(ax, history[rates[0]], color="C0", label=rates[0])
        ax.set_ylabel(rates[0].removeprefix("perf/").replace("_per_s", "/s"), fontsize=8)
        if len(rates) > 1:
            twin = ax.twinx()
            _plot(twin, history[rates[1]], color="C1", linewidth=0.8, label=rates[1])
            twin.set_ylabel(rates[1].removeprefix("perf/").replace("_per_s", "/s"), fontsize=8)
            twin.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="lower left")
    if split:
        ax = next(row)
        steps = split["steps"]
        ax.stackplot(steps, *(split[p] for p in PHASES), labels=PHASES, alpha=0.8)
        ax.set_ylabel("step time split (ms)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle("Throughput and where step time went", fontsize=10)
    return figure


def _phase_split(history: History) -> dict[str, list] | None:
    """``{"steps": [...], phase: [ms, ...]}`` over the sampled steps that have all phases."""
    series = {p: dict(history.get(f"perf/time/{p}_ms") or []) for p in PHASES}
    steps = sorted(set.intersection(*(set(s) for s in series.values())))
    if not steps:
        return None
    return {"steps": steps, **{p: [series[p][s] for s in steps] for p in PHASES}}


def plot_validation(history: History):
    """One panel per validation metric (``val/*`` except the loss terms, which
    :func:`plot_loss_terms` draws)."""
    keys = [k for k in sorted(history) if k.startswith("val/") and not k.startswith("val/loss/")
            and history[k]]
    if not keys:
        return None
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    figure, axes = _figure(n_rows, n_cols, width=3.4 * n_cols, height=2.4, sharex=False)
    for ax, key in zip(axes.flat, keys):
        values = _plot(ax, history[key])
        if not any(math.isfinite(v) for v in values):
            ax.text(0.5, 0.5, "not defined (NaN)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="grey")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    figure.suptitle("Validation (sampled structures vs native, C3')", fontsize=10)
    return figure


def plot_plddt_calibration(plddt, true_lddt, *, step: int | None = None):
    """Reliability diagram of per-residue pLDDT (0-100) against the true lDDT (fraction) of
    the residues of one validation, via :func:`pipeline.metrics.calibration_table`."""
    import torch

    from pipeline.metrics import calibration_table, plot_calibration

    plddt = torch.as_tensor(plddt).detach().float().cpu().flatten()
    true_lddt = torch.as_tensor(true_lddt).detach().float().cpu().flatten()
    if plddt.numel() == 0:
        return None
    every = torch.ones_like(plddt, dtype=torch.bool)
    table = calibration_table(plddt[None], true_lddt[None], every[None])
    at = f" at step {step}" if step is not None else ""
    return plot_calibration(
        table, title=f"pLDDT calibration{at}: {plddt.numel()} residues, ECE {table.ece:.1f}"
    )


def draw_plots(history: History, folder: str | Path, *, grad_clip: float | None = None,
               calibration: tuple[Any, Any] | None = None,
               calibration_step: int | None = None) -> list[Path]:
    """Draw every plot that has data into ``folder`` (``<name>.png``); returns the files
    written. A plot that fails is a warning; the others are still drawn."""
    makers: dict[str, Callable[[], Any]] = {
        "loss_terms": lambda: plot_loss_terms(history),
        "lr": lambda: plot_lr(history),
        "grad_norm": lambda: plot_grad_norm(history, clip=grad_clip),
        "memory": lambda: plot_memory(history),
        "throughput": lambda: plot_throughput(history),
        "validation": lambda: plot_validation(history),
        "plddt_calibration": lambda: (
            plot_plddt_calibration(*calibration, step=calibration_step) if calibration else None
        ),
    }
    written = []
    for name, make in makers.items():
        try:
            figure = make()
            if figure is not None:
                written.append(save_figure(figure, Path(folder) / f"{name}.png"))
        except Exception as exc:  # one broken plot must not cost the others (or the run)
            log.warning("plot %s.png not written: %s: %s", name, type(exc).__name__, exc)
    return written


# ============================================================================ summary.md
def _num(value: float) -> str:
    return f"{value:.6g}"


def _last(points: list[tuple[int, float]]) -> tuple[int, float]:
    return points[-1]


def better_is_lower(metric: str) -> bool:
    """Direction of a validation metric: RMSD and losses are better lower, the rest higher."""
    return metric.endswith("rmsd") or "/loss" in metric


def _best(points: list[tuple[int, float]], lower: bool) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        return None
    return (min if lower else max)(finite, key=lambda p: p[1])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def summary_markdown(history: History, run: dict, *, health: dict | None = None,
                     plots: list[str] = ()) -> str:
    """``summary.md`` from the recorded history, facts about the run and its health report.

    ``run`` keys: ``name``, ``id``, ``scenario``, ``preset``, ``status`` (MLflow),
    ``stop_reason``, ``step``, ``total_steps``, ``epoch``, ``samples_seen``, ``elapsed_s``,
    and optionally ``resumed_from`` (a checkpoint path), ``run_dir``, ``best_metric``,
    ``early_stopping`` (its metric's name), ``counts`` (recovery counters).
    """
    lines = [
        *_overview(run, health),
        *_metrics_section(history, run),
        *_health_section(health, run.get("counts") or {},
                         plotted="plots/health.png" in plots),
        *_time_section(history, run),
        *_throughput_and_memory_section(history),
    ]
    if plots:
        lines += ["", "## Plots", "", ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def _overview(run: dict, health: dict | None) -> list[str]:
    steps = f"{run.get('step', 0)} of {run.get('total_steps', '?')} (epoch {run.get('epoch', 0)})"
    if run.get("resumed_from"):
        steps += f"; resumed from `{run['resumed_from']}`: the tables cover the steps since"
    rows = [
        ["run id", f"`{run.get('id') or '(untracked)'}`"],
        ["scenario / preset", f"{run.get('scenario') or 'custom'} / {run.get('preset') or '-'}"],
        ["status", f"{run.get('status')}, stop reason: {run.get('stop_reason')}"],
        ["optimizer steps", steps],
        ["samples seen", str(run.get("samples_seen", 0))],
        ["health", health["overall_status"] if health else "checks off"],
    ]
    if run.get("run_dir"):
        rows.append(["run directory", f"`{run['run_dir']}`"])
    return [f"# Run summary: {run.get('name') or '(unnamed)'}", "", *_table(["", ""], rows)]


def _metrics_section(history: History, run: dict) -> list[str]:
    lines = []
    train_keys = [k for k in ("train/loss", "train/lr", "train/grad_norm") if history.get(k)]
    train_keys[1:1] = _sub_keys(history, "train/loss")
    train_keys += _sub_keys(history, "train/grad_norm")
    if train_keys:
        rows = [[f"`{k}`", str(_last(history[k])[0]), _num(_last(history[k])[1])]
                for k in train_keys]
        lines += ["", "## Training metrics (last logged step)", "",
                  *_table(["metric", "step", "final"], rows)]
    val_keys = [k for k in sorted(history) if k.startswith("val/") and history[k]]
    if val_keys:
        rows = []
        for key in val_keys:
            step, value = _last(history[key])
            best = _best(history[key], better_is_lower(key))
            rows.append([f"`{key}`", str(step), _num(value),
                         _num(best[1]) if best else "-", str(best[0]) if best else "-"])
        lines += ["", "## Validation metrics", "",
                  ("Final: the last validation; best: over all validations (lowest for RMSD "
                   "and losses, highest otherwise)."), "",
                  *_table(["metric", "step", "final", "best", "best step"], rows)]
    if run.get("best_metric") is not None:
        best = f"`best.pt` holds the weights of the best `{run.get('early_stopping')}`"
        lines += ["", f"{best}: {_num(run['best_metric'])}."]
    return lines


def _health_section(health: dict | None, counts: dict[str, float], *,
                    plotted: bool = True) -> list[str]:
    """The status, then the checks that fired (worst first, then most frequent) with their
    suggestions, and the recovery counters."""
    lines = ["", f"## Health: {health['overall_status'] if health else 'checks off'}", ""]
    if health is None:
        lines.append("Health checks were off (`health.enabled=false`).")
    else:
        fired = [(name, c) for name, c in health["checks"].items() if c["status"] != "healthy"]
        fired.sort(key=lambda nc: ({"critical": 0, "warning": 1}.get(nc[1]["status"], 2),
                                   -nc[1]["count"]))
        for name, check in fired[:TOP_CHECKS]:
            lines.append(f"- **{name}** ({check['status']}, fired {check['count']} "
                         f"time{'s' if check['count'] != 1 else ''}): "
                         f"{check['suggestion'] or '-'}")
        if len(fired) > TOP_CHECKS:
            lines.append(f"- ... and {len(fired) - TOP_CHECKS} more")
        if not fired:
            lines.append("No health check fired.")
        lines += ["", "Details: `health/report.md`"
                  + ("; anomalies are marked in `plots/health.png`." if plotted else ".")]
    counts = {k: v for k, v in counts.items() if v}
    if counts:
        lines += ["", "Recovery: " + ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items()))
                  + "."]
    return lines


def _time_section(history: History, run: dict) -> list[str]:
    """Wall time and checkpoint stall (logged at the end of a finished run), then the mean
    data/compute/optimizer/logging split of the sampled steps."""
    lines = ["", "## Where time went", ""]
    ended = [k for k in ("perf/train_wall_s", "perf/checkpoint_stall_total_s",
                         "perf/checkpoint_stall_share") if history.get(k)]
    if ended:
        lines += _table(["metric", "value"],
                        [[f"`{k}`", _num(_last(history[k])[1])] for k in ended])
    else:
        lines.append(f"Wall time until the run stopped: {run.get('elapsed_s', math.nan):.1f} s "
                     "(not logged: the run did not finish).")
    split = _phase_split(history)
    if split:
        means = {p: statistics.fmean(split[p]) for p in PHASES}
        total = sum(means.values())
        rows = [[f"`perf/time/{p}_ms`", _num(means[p]),
                 f"{100 * means[p] / total:.1f}%" if total > 0 else "-"] for p in PHASES]
        intro = (f"Step-time split, mean of {len(split['steps'])} sampled steps (data: waiting "
                 "for the loader; compute: forward + backward; optimizer: unscale, clip, finite "
                 "check, step; logging: health checks and metrics):")
        lines += ["", intro, "", *_table(["metric", "mean ms", "share"], rows)]
        if total > 0 and means["data"] / total > DATA_WAIT_HINT_SHARE:
            hint = (f"Data wait is {100 * means['data'] / total:.0f}% of a step: raise "
                    "`loader.num_workers` or `loader.prefetch_factor`.")
            lines += ["", hint]
    return lines


def _throughput_and_memory_section(history: History) -> list[str]:
    lines = []
    present = [k for k in THROUGHPUT_KEYS if history.get(k)]
    if present:
        rows = []
        for key in present:
            values = [v for _, v in history[key]]
            rows.append([f"`{key}`", _num(statistics.median(values)), _num(values[-1]),
                         _num(max(values))])
        lines += ["", "## Throughput (logged steps)", "",
                  *_table(["metric", "median", "last", "max"], rows)]
    present = [(k, label) for k, label in MEMORY_KEYS if history.get(k)]
    if present:
        rows = [[f"`{k}`", _num(max(v for _, v in history[k])), _num(history[k][-1][1]), label]
                for k, label in present]
        lines += ["", "## Memory (logged steps, GiB)", "",
                  *_table(["metric", "peak", "last", "what"], rows)]
    return lines


# ============================================================================ the trainer's hook
def run_facts(trainer, status: str, error: BaseException | None) -> dict:
    """What :func:`summary_markdown` needs to know about ``trainer``'s run besides history."""
    from pipeline.train.runtime import run_name

    cfg = trainer.cfg
    stop_reason = getattr(trainer, "_stop_reason", None)
    signum = getattr(trainer, "_stop_signal", None)
    if error is not None:
        from pipeline.train.trainer import error_tag

        stop_reason = error_tag(error)
    elif status == "KILLED" and signum is not None:
        import signal

        stop_reason = f"stopped by {signal.Signals(signum).name}; checkpoint written"
    resumed = getattr(trainer, "_resumed_from", None)
    return {
        "name": run_name(cfg),
        "id": trainer.tracker.run_id,
        "scenario": cfg.scenario,
        "preset": cfg.preset,
        "status": status,
        "stop_reason": stop_reason or ("failed" if status == "FAILED" else "finished"),
        "step": trainer.step,
        "total_steps": trainer.total_steps,
        "epoch": trainer.epoch,
        "samples_seen": trainer.samples_seen,
        "elapsed_s": time.monotonic() - trainer._started,
        "resumed_from": str(resumed) if resumed else None,
        "run_dir": str(trainer.run_dir),
        "best_metric": trainer.best_metric,
        "early_stopping": cfg.trainer.early_stopping.metric,
        "counts": dict(trainer.counts),
    }


def write_run_report(trainer, status: str) -> None:
    """Draw ``plots/*.png`` and write ``summary.md`` in ``trainer``'s run directory, and log
    them to its tracker. Called once, just before the tracker is closed (from
    ``Trainer.fit``'s ``finally``), with the status the MLflow run is closed with
    (``FINISHED``; ``KILLED``: interrupted or pruned; ``FAILED``: the exception propagating
    through that ``finally`` is the run's error). Rank 0 only. Never raises: a report that
    cannot be written is a warning."""
    if trainer.ctx.rank != 0:
        return
    error = sys.exc_info()[1] if status == "FAILED" else None
    try:
        trainer.plots.wait()  # matplotlib's text layout is not thread-safe: one figure at a time
        health = trainer.health.report() if trainer.health.cfg.enabled else None
        residues = getattr(trainer.validator, "last_residues", None)
        folder = Path(trainer.run_dir) / "plots"
        written = draw_plots(
            trainer.history, folder, grad_clip=trainer.cfg.trainer.grad_clip,
            calibration=residues, calibration_step=getattr(trainer, "_validated_at", None),
        ) if trainer.draws_plots() else []
        for path in written:
            trainer.tracker.log_artifact(path, "plots")
        plots = [f"plots/{p.name}" for p in written]
        if (folder / "health.png").is_file():
            plots.append("plots/health.png")
        text = summary_markdown(trainer.history, run_facts(trainer, status, error), health=health,
                                plots=plots)
        summary = Path(trainer.run_dir) / "summary.md"
        summary.write_text(text)
        trainer.tracker.log_artifact(summary)
        log.info("run report: %s and %d plots in %s", summary.name, len(written),
                 trainer.run_dir)
    except Exception as exc:  # the report must never hide the run's own outcome
        log.warning("run report not written: %s: %s", type(exc).__name__, exc)
