"""The end-of-run report: plots/*.png and summary.md as MLflow artifacts of every run (a failed
one included), with summary.md's numbers checked against the run's MLflow metric history.
Tiny CPU runs against one sqlite store for the module."""

from __future__ import annotations

import logging
import math
import re
import statistics
import types
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_RUN
from pipeline.config.loader import load_config
from pipeline.monitor import run_report
from pipeline.monitor.run_report import draw_plots, write_run_report
from pipeline.train.trainer import NonFiniteStop, train

TINY = [*TINY_RUN, "tracking.system_metrics=false"]
PLOTS = ("loss_terms", "lr", "grad_norm", "memory", "throughput", "validation",
         "plddt_calibration")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "mlflow_store")


def _config(tmp_path, *extra):
    return load_config(scenario="debug",
                       overrides=[*TINY, f"output_dir={tmp_path / 'out'}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """4 optimizer steps, 2 validations, every step logged and timed."""
    return train(_config(tmp_path_factory.mktemp("finished")))


def _artifact(run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{path}",
                                                    dst_path=str(tmp_path)))


def _metric_tables(markdown: str) -> dict[str, dict[str, str]]:
    """``{metric: {column: cell}}`` of every table whose first column is ``metric``."""
    rows: dict[str, dict[str, str]] = {}
    header = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "metric":
            header = cells
        elif header is not None and not set(line) <= set("|-"):
            rows[cells[0].strip("`")] = dict(zip(header[1:], cells[1:]))
    return rows


def _same(cell: str, expected: float) -> bool:
    if math.isnan(expected):
        return cell == "nan"
    return float(cell) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_every_plot_and_the_summary_are_artifacts_of_the_run(finished, tmp_path):
    client = mlflow.MlflowClient()
    logged = {Path(a.path).name for a in client.list_artifacts(finished.run_id, "plots")}
    assert {f"{name}.png" for name in PLOTS} <= logged
    for name in PLOTS:
        png = _artifact(finished.run_id, f"plots/{name}.png", tmp_path).read_bytes()
        assert png.startswith(PNG_SIGNATURE), name
        assert len(png) > 10_000, f"{name}.png: {len(png)} bytes"
        assert (Path(finished.run_dir) / "plots" / f"{name}.png").read_bytes() == png
    assert "summary.md" in {a.path for a in client.list_artifacts(finished.run_id)}
    summary = _artifact(finished.run_id, "summary.md", tmp_path).read_text()
    assert summary == (Path(finished.run_dir) / "summary.md").read_text()


def test_summary_numbers_equal_the_mlflow_metric_history(finished, tmp_path):
    client = mlflow.MlflowClient()
    run = client.get_run(finished.run_id)
    summary = _artifact(finished.run_id, "summary.md", tmp_path).read_text()
    assert f"`{finished.run_id}`" in summary
    assert "| scenario / preset | debug / small_model |" in summary
    assert "| status | FINISHED, stop reason: finished |" in summary
    assert f"| health | {finished.health_status} |" in summary
    assert f"| optimizer steps | {finished.step} of 4 (epoch {finished.epoch}) |" in summary
    tables = _metric_tables(summary)
    # What the issue asks for: final and best metrics, where time went, throughput, memory.
    for metric in ("train/loss", "train/loss/diffusion", "train/lr", "train/grad_norm/trunk",
                   "val/lddt", "val/rmsd", "perf/train_wall_s", "perf/checkpoint_stall_total_s",
                   "perf/time/data_ms", "perf/time/compute_ms", "perf/time/optimizer_ms",
                   "perf/time/logging_ms", "perf/samples_per_s", "perf/host_mem_rss_gib"):
        assert metric in tables, metric
    checked = 0
    for metric, cells in tables.items():
        points = sorted(client.get_metric_history(finished.run_id, metric),
                        key=lambda m: (m.step, m.timestamp))
        assert points, f"{metric}: in summary.md but not logged"
        values = [m.value for m in points]
        assert run.data.metrics[metric] == pytest.approx(values[-1], nan_ok=True)
        lower = metric.endswith("rmsd") or "/loss" in metric
        finite = [m for m in points if math.isfinite(m.value)]
        best = (min if lower else max)(finite, key=lambda m: m.value) if finite else None
        expected = {
            "step": points[-1].step,
            "final": values[-1], "last": values[-1], "value": values[-1],
            "median": statistics.median(values), "max": max(values), "peak": max(values),
            "mean ms": statistics.fmean(values),
            "best": best.value if best else None, "best step": best.step if best else None,
        }
        for column, cell in cells.items():
            if column in ("share", "what"):
                continue
            if expected[column] is None:
                assert cell == "-", (metric, column, cell)
            else:
                assert _same(cell, expected[column]), (metric, column, cell, expected[column])
            checked += 1
    assert checked > 50
    means = {p: float(tables[f"perf/time/{p}_ms"]["mean ms"]) for p in run_report.PHASES}
    for phase, mean in means.items():
        share = float(tables[f"perf/time/{phase}_ms"]["share"].rstrip("%"))
        assert share == pytest.approx(100 * mean / sum(means.values()), abs=0.06)


def test_a_failed_run_still_gets_its_report(tmp_path):
    config = _config(tmp_path, "faults.nan_loss_from_step=3", "recovery.non_finite=stop",
                     "tracking.run_name=fails-with-nan")
    with pytest.raises(NonFiniteStop):
        train(config)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id],
                                filter_string="attributes.run_name = 'fails-with-nan'")
    assert run.info.status == "FAILED"
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"loss_terms.png", "lr.png", "validation.png", "plddt_calibration.png"} <= logged
    summary = _artifact(run.info.run_id, "summary.md", tmp_path).read_text()
    assert "| status | FAILED, stop reason: NonFiniteStop: training stopped at step 3" in summary
    assert "not logged: the run did not finish" in summary
    assert "- **non_finite** (warning, fired 1 time): non-finite loss" in summary


def _fake_trainer(tmp_path, **history) -> types.SimpleNamespace:
    health = types.SimpleNamespace(cfg=types.SimpleNamespace(enabled=False))
    config = load_config(scenario="debug")
    return types.SimpleNamespace(
        ctx=types.SimpleNamespace(rank=0), cfg=config, history=history, health=health,
        plots=types.SimpleNamespace(wait=lambda: None), validator=None, run_dir=tmp_path,
        tracker=types.SimpleNamespace(run_id=None, log_artifact=lambda *a: None),
        step=1, total_steps=1, epoch=0, samples_seen=4, best_metric=None, counts={},
        _started=0.0, draws_plots=lambda: True,
    )


def test_the_report_never_raises_into_the_trainer(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_report, "summary_markdown", broken)
    write_run_report(_fake_trainer(tmp_path, **{"train/loss": [(1, 1.0)]}), "FINISHED")
    assert "run report not written: OSError: disk full" in caplog.text


def test_a_broken_plot_costs_only_itself_and_device_memory_is_drawn(tmp_path, monkeypatch,
                                                                    caplog):
    def broken(history):
        raise ValueError("no axes")

    monkeypatch.setattr(run_report, "plot_lr", broken)
    history = {
        "train/loss": [(1, 2.0), (2, 1.5)],
        "train/lr": [(1, 1e-4), (2, 2e-4)],
        "perf/gpu_mem_allocated_gib": [(1, 3.0), (2, 3.2)],
        "perf/gpu_mem_peak_gib": [(1, 3.5), (2, 3.9)],
    }
    with caplog.at_level(logging.WARNING):
        written = draw_plots(history, tmp_path)
    assert sorted(p.name for p in written) == ["loss_terms.png", "memory.png"]
    assert "plot lr.png not written: ValueError: no axes" in caplog.text
    markdown = run_report.summary_markdown(history, {"status": "FINISHED"})
    memory = _metric_tables(markdown)["perf/gpu_mem_peak_gib"]
    assert (memory["peak"], memory["last"]) == ("3.9", "3.9")


def test_summary_markdown_lists_the_worst_health_checks_first():
    health = {"overall_status": "critical", "checks": {
        "loss_spike": {"status": "warning", "count": 7, "suggestion": "lower optim.lr"},
        "grad_explosion": {"status": "critical", "count": 2, "suggestion": "clip harder"},
        "stagnation": {"status": "healthy", "count": 0, "suggestion": ""},
    }}
    markdown = run_report.summary_markdown({}, {"status": "FINISHED"}, health=health)
    fired = re.findall(r"^- \*\*(\w+)\*\* \((\w+), fired (\d+) times?\): (.*)$", markdown,
                       re.MULTILINE)
    assert fired == [("grad_explosion", "critical", "2", "clip harder"),
                     ("loss_spike", "warning", "7", "lower optim.lr")]
    assert "## Health: critical" in markdown


def test_summary_suggests_loader_work_when_data_wait_dominates():
    times = {"data": 30.0, "compute": 60.0, "optimizer": 8.0, "logging": 2.0}
    history = {f"perf/time/{p}_ms": [(1, ms), (10, ms)] for p, ms in times.items()}
    markdown = run_report.summary_markdown(history, {"status": "FINISHED"})
    assert "Step-time split, mean of 2 sampled steps" in markdown
    assert _metric_tables(markdown)["perf/time/data_ms"] == {"mean ms": "30", "share": "30.0%"}
    assert "Data wait is 30% of a step: raise `loader.num_workers`" in markdown
