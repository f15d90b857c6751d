"""The health plot: loss, pre-clip gradient norm, LR, throughput and device memory over
optimizer steps, with every anomaly of the health report marked.

Drawn from a health report dict alone (``report["series"]`` and ``report["anomalies"]``), so
the plot and ``health/report.json`` always agree. Uses matplotlib's object-oriented API with
the Agg canvas (no pyplot state): safe off the main thread, nothing opens a window.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Panels in order: series name in the report, title, log scale when all values are > 0.
PANELS = (
    ("loss", "train/loss", True),
    ("grad_norm", "pre-clip grad norm", True),
    ("lr", "learning rate", False),
    ("samples_per_s", "samples/s", False),
    ("gpu_mem_gib", "device memory allocated (GiB)", False),
)
#: Recovery events (drawn solid; the checks that fired are dashed).
RECOVERY_KINDS = ("rollback", "oom_recovery")
#: Marker colour of each anomaly kind (others: grey).
ANOMALY_COLORS = {
    "non_finite": "tab:red",
    "rollback": "black",
    "oom_recovery": "tab:purple",
    "loss_spike": "tab:orange",
    "grad_explosion": "tab:brown",
    "grad_vanishing": "tab:olive",
    "stagnation": "tab:cyan",
    "lr": "tab:pink",
    "throughput_drop": "tab:blue",
}


def plot_health(report: dict):
    """A :class:`matplotlib.figure.Figure` of the report's series (one panel each, memory only
    when present) with the anomaly steps marked as vertical lines, one collection per kind and
    panel with ``gid="anomaly:<kind>"``; ``None`` when the report has no series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = report.get("series") or {}
    panels = [p for p in PANELS if series.get(p[0])]
    if not panels:
        return None
    figure = Figure(figsize=(10, 2.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    anomalies = {k: v for k, v in (report.get("anomalies") or {}).items() if v}
    for ax, (name, title, log_scale) in zip(axes, panels):
        steps, values = zip(*series[name])
        ax.plot(steps, values, linewidth=1, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(title, fontsize=8)
        finite = [v for v in values if math.isfinite(v)]
        if log_scale and finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            ax.set_yscale("log")  # only when the values span more than a decade
        for kind, marked in sorted(anomalies.items()):
            ax.vlines(
                marked, 0, 1, transform=ax.get_xaxis_transform(),
                colors=ANOMALY_COLORS.get(kind, "grey"),
                linestyles="-" if kind in RECOVERY_KINDS else "--", linewidth=1, alpha=0.8,
                label=f"{kind} ({len(marked)})", gid=f"anomaly:{kind}",
            )
    axes[-1].set_xlabel("optimizer step")
    if anomalies:
        axes[0].legend(fontsize=7, loc="upper right")
    figure.suptitle(
        f"Health at step {report.get('step', '?')}: {report.get('overall_status', '?')}",
        fontsize=10,
    )
    return figure


def save_health_plot(report: dict, path: str | Path) -> Path | None:
    """Render :func:`plot_health` to ``path`` (PNG) atomically; ``None`` if nothing to plot."""
    figure = plot_health(report)
    if figure is None:
        return None
    return save_figure(figure, path)


def save_figure(figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` (PNG) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class HealthPlotWriter:
    """Renders the health plot of the newest submitted report to ``path`` off the training
    thread (a plot takes a few hundred ms; a report every few hundred steps would otherwise
    cost the loop several percent), then calls ``on_written(path)`` (the upload). Reports
    submitted while one renders replace each other: only the newest is drawn next."""

    def __init__(self, path: str | Path, *, on_written: Callable[[Path], None] | None = None):
        self.path = Path(path)
        self.on_written = on_written
        self._lock = threading.Lock()
        self._pending: dict | None = None
        self._thread: threading.Thread | None = None

    def submit(self, report: dict) -> None:
        with self._lock:
            self._pending = report
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="health-plot", daemon=True)
                self._thread.start()

    def wait(self) -> None:
        """Return once every submitted report is drawn (and handed to ``on_written``)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                report, self._pending = self._pending, None
                if report is None:
                    self._thread = None
                    return
            try:
                path = save_health_plot(report, self.path)
                if path is not None and self.on_written is not None:
                    self.on_written(path)
            except Exception as exc:  # a plot must never stop training; say so and go on
                log.warning("health plot %s not written: %s", self.path, exc)
