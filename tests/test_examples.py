"""The scripts in ``examples/`` and the library API they are written against (``pipeline.api``).

Every example runs in a subprocess, in a temporary directory with its own MLflow store, as a
user would run it; the custom-loop example's run is then read back from the store. The API's
unit tests inject the faults the monitor must report and compare the LR schedule with the
formulas in torch's documentation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import api
from pipeline.errors import ConfigError
from pipeline.monitor import generate_health_report
from pipeline.tracking import NullTracker
from pipeline.train.optim import Lion, OptimConfig
from pipeline.train.schedule import SchedulerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.py"))
#: What an example may take on a 2-core CPU (the documented budget is 30 s; slack for a
#: loaded machine).
EXAMPLE_BUDGET_S = 90


# ------------------------------------------------------------------------------- examples
class _ExampleRun:
    def __init__(self, path: Path, cwd: Path):
        self.cwd = cwd
        self.uri = f"sqlite:///{cwd / 'mlflow.db'}"
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
        env.update(
            MLFLOW_TRACKING_URI=self.uri,
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        )
        start = time.monotonic()
        self.result = subprocess.run(
            [sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=4 * EXAMPLE_BUDGET_S,
        )
        self.seconds = time.monotonic() - start

    def runs(self) -> list:
        client = MlflowClient(self.uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments) if experiments else []


@pytest.fixture(scope="module")
def run_example(tmp_path_factory):
    """Runs an example once per test module; later calls for the same path reuse the run."""
    done: dict[Path, _ExampleRun] = {}

    def run(path: Path) -> _ExampleRun:
        if path not in done:
            done[path] = _ExampleRun(path, tmp_path_factory.mktemp(path.stem))
        return done[path]

    return run


def test_there_are_examples():
    assert REPO_ROOT / "examples" / "custom_loop.py" in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_to_the_end_and_finishes_its_runs(path, run_example):
    example = run_example(path)
    output = (example.result.stdout + example.result.stderr)[-4000:]
    assert example.result.returncode == 0, output
    assert example.seconds < EXAMPLE_BUDGET_S, f"{path.name} took {example.seconds:.0f} s"
    for run in example.runs():
        assert run.info.status == "FINISHED", (run.info.run_name, output)


def test_custom_loop_logs_every_step_and_a_health_report(run_example):
    example = run_example(REPO_ROOT / "examples" / "custom_loop.py")
    assert example.result.returncode == 0, example.result.stderr[-4000:]
    runs = example.runs()
    assert len(runs) == 1
    run = runs[0]
    client = MlflowClient(example.uri)
    params = run.data.params
    # The example takes one optimizer step per batch of its DataLoader (last batch kept).
    n_steps = int(params["trainer.epochs"]) * math.ceil(
        int(params["data.n_train"]) / int(params["trainer.micro_batch_size"])
    )
    every = int(params["tracking.log_every_steps"])
    assert params["scenario"] == "debug" and run.data.tags["loop"] == "custom"

    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in losses]
    assert len(steps) == len(set(steps)), "more than one train/loss point at a step"
    logged = {s for s in range(1, n_steps + 1) if s % every == 0 or s == 1}
    assert logged <= set(steps) <= set(range(1, n_steps + 1))
    assert all(math.isfinite(m.value) for m in losses)
    for key in ("train/lr", "train/grad_norm", "perf/step_time_ms", "perf/samples_per_s",
                "health/status", "train/grad_norm/encoder"):
        assert key in run.data.metrics, key

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(example.cwd / "got")))
    report = json.loads((artifacts / "health" / "report.json").read_text())
    assert report["step"] == n_steps
    assert report["overall_status"] in ("healthy", "warning", "critical")
    assert len(report["series"]["loss"]) == n_steps
    assert "Overall status" in (artifacts / "health" / "report.md").read_text()
    assert (artifacts / "plots" / "health.png").stat().st_size > 0
    assert (artifacts / "config" / "resolved.yaml").is_file()
    assert f"{n_steps} steps" in example.result.stdout


# ------------------------------------------------------------------------------------ config
def test_config_from_scenario_layers_overrides_over_the_scenario():
    config = api.config_from_scenario("debug", overrides={"optim.lr": 2e-3, "optim.name": "lion"})
    assert (config.optim.lr, config.optim.name) == (2e-3, "lion")
    assert config.data.n_train == 64  # from configs/scenarios/debug.yaml
    assert config.scenario == "debug"


def test_config_from_scenario_names_a_misspelled_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean"):
        api.config_from_scenario("debug", overrides={"optim.lrr": 1e-3})
    with pytest.raises(TypeError, match="mapping"):
        api.config_from_scenario("debug", overrides=["optim.lr=1e-3"])


# ------------------------------------------------------------------------- optim and schedule
@pytest.mark.parametrize(
    ("name", "cls"), [("adamw", torch.optim.AdamW), ("lion", Lion), ("sgd", torch.optim.SGD)]
)
def test_factory_builds_the_configured_optimizer(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    for given in (model, model.parameters()):
        optimizer, _ = api.build_optimizer_and_scheduler(
            given, OptimConfig(name=name, lr=0.1), SchedulerConfig(),
            total_steps=10, steps_per_epoch=5,
        )
        assert type(optimizer) is cls
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters()}
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)  # warmup start


def test_lr_follows_linear_warmup_then_cosine():
    base, start, floor, total, warm = 0.2, 0.1, 0.05, 20, 4
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = api.build_optimizer_and_scheduler(
        model,
        OptimConfig(name="sgd", lr=base),
        SchedulerConfig(name="cosine", warmup_epochs=2.0, warmup_start_factor=start,
                        min_lr_ratio=floor),
        total_steps=total,
        steps_per_epoch=2,  # 2 warmup epochs = 4 steps
    )
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # torch's documented formulas: LinearLR, base * (start + (1 - start) * t / T); then
    # CosineAnnealingLR, eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2.
    eta_min = floor * base
    expected = [base * (start + (1 - start) * t / warm) for t in range(warm)]
    expected += [eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / (total - warm))) / 2
                 for t in range(total - warm)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_factory_rejects_bad_arguments_with_the_value():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="total_steps=0"):
        api.build_optimizer_and_scheduler(
            model, OptimConfig(), SchedulerConfig(), total_steps=0, steps_per_epoch=1
        )
    config = api.config_from_scenario(None)
    with pytest.raises(TypeError, match="config.optim"):
        api.build_optimizer_and_scheduler(
            model, config, config.scheduler, total_steps=5, steps_per_epoch=1
        )


# ------------------------------------------------------------------------------------ data
def test_prefetch_to_device_on_cpu_hands_out_every_batch_once_per_pass():
    source = [{"x": torch.full((2,), float(i)), "names": [f"s{i}"]} for i in range(5)]
    batches = api.prefetch_to_device(source, "cpu", depth=3)
    for _ in range(2):  # one pass per epoch
        got = list(batches)
        assert [b["x"][0].item() for b in got] == [0, 1, 2, 3, 4]
        assert all(b["x"].device.type == "cpu" for b in got)
        assert got[0]["names"] == ["s0"]
        assert batches.last_wait_s >= 0


# ---------------------------------------------------------------------------------- monitor
class _RecordingTracker(NullTracker):
    def __init__(self):
        self.points: dict[int, dict[str, float]] = {}
        self.texts: dict[str, str] = {}

    def log_metrics(self, metrics, step):
        self.points.setdefault(step, {}).update(metrics)

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text


def _steady(monitor, steps, *, loss=1.0, grad_norm=0.5, lr=1e-3):
    for step in steps:
        assert monitor.log_step(step, loss=loss, grad_norm=grad_norm, lr=lr, step_s=0.1) == []


def test_monitor_flags_a_nan_loss_with_a_suggestion_and_logs_that_step():
    tracker = _RecordingTracker()
    monitor = api.TrainingMonitor(base_lr=1e-3, log_every_steps=5, tracker=tracker)
    _steady(monitor, range(1, 8))
    warnings = monitor.log_step(8, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(0.5),
                                lr=1e-3)
    assert [w.check for w in warnings] == ["non_finite"]
    assert warnings[0].step == 8 and "lr" in warnings[0].message
    assert sorted(tracker.points) == [1, 5, 8]  # logged steps, plus the step with a warning
    assert math.isnan(tracker.points[8]["train/loss"])
    assert tracker.points[8]["health/non_finite_count"] == 1
    report, markdown = monitor.report()
    assert report["anomalies"] == {"non_finite": [8]}
    assert "non_finite" in markdown


def test_monitor_flags_an_exploding_loss_and_gradient_naming_the_group():
    monitor = api.TrainingMonitor(base_lr=1e-3)
    _steady(monitor, range(1, 21))
    warnings = monitor.log_step(
        21, loss=50.0, grad_norm=torch.tensor(1e4), lr=1e-3,
        group_norms={"encoder": torch.tensor(9e3), "head": torch.tensor(1.0)},
    )
    by_check = {w.check: w.message for w in warnings}
    assert set(by_check) == {"loss_spike", "grad_explosion"}
    assert "lower optim.lr" in by_check["loss_spike"]
    assert "'encoder'" in by_check["grad_explosion"]
    assert monitor.report()[0]["overall_status"] == "critical"  # > 10x the explosion norm


def test_monitor_times_steps_and_reports_slow_ones():
    tracker = _RecordingTracker()
    monitor = api.TrainingMonitor(base_lr=1e-3, total_steps=100, tracker=tracker)
    for step in range(1, 11):
        monitor.log_step(step, loss=1.0, grad_norm=0.5, lr=1e-3, batch_size=4, step_s=0.1,
                         data_wait_s=0.01)
    warnings = monitor.log_step(11, loss=1.0, grad_norm=0.5, lr=1e-3, batch_size=4, step_s=2.0,
                                data_wait_s=1.9)
    assert [w.check for w in warnings] == ["slow_step"]
    assert "data wait" in warnings[0].message
    point = tracker.points[10]
    assert point["perf/samples_per_s"] == pytest.approx(40.0)
    assert point["perf/step_time_ms"] == pytest.approx(100.0)
    assert point["perf/eta_s"] == pytest.approx(90 * 0.1)


def test_monitor_log_report_sends_the_report_to_the_tracker():
    tracker = _RecordingTracker()
    monitor = api.TrainingMonitor(base_lr=1e-3, tracker=tracker)
    _steady(monitor, range(1, 6))
    report, markdown = monitor.log_report(plot=False)
    assert json.loads(tracker.texts["health/report.json"])["step"] == report["step"] == 5
    assert tracker.texts["health/report.md"] == markdown


def test_build_monitor_takes_thresholds_warmup_and_interval_from_the_config():
    config = api.config_from_scenario(
        "debug", overrides={"tracking.log_every_steps": 4, "health.loss_spike_factor": 10.0}
    )
    monitor = api.build_monitor(config, steps_per_epoch=8)
    assert monitor.log_every_steps == 4
    assert monitor.health.warmup_steps == 8  # scheduler.warmup_epochs 1 x 8 steps
    assert monitor.health.base_lr == config.optim.lr
    _steady(monitor, range(1, 21))
    assert monitor.log_step(21, loss=5.0, grad_norm=0.5, lr=1e-3) == []  # x5 < x10


def test_monitor_rejects_bad_arguments_with_the_value():
    with pytest.raises(ValueError, match="log_every_steps=0"):
        api.TrainingMonitor(base_lr=1e-3, log_every_steps=0)
    monitor = api.TrainingMonitor(base_lr=1e-3)
    with pytest.raises(TypeError, match="step must be an int"):
        monitor.log_step(1.0, loss=1.0, grad_norm=1.0, lr=1e-3)
    with pytest.raises(ValueError, match="batch_size=0"):
        monitor.log_step(1, loss=1.0, grad_norm=1.0, lr=1e-3, batch_size=0)


def test_monitor_report_matches_the_report_over_the_same_history():
    losses = [1.0] * 20 + [float("nan"), 9.0, 1.0]
    grad_norms = [0.5] * 21 + [500.0, 0.5]
    monitor = api.TrainingMonitor(base_lr=1e-3)
    for step, (loss, norm) in enumerate(zip(losses, grad_norms), start=1):
        monitor.log_step(step, loss=loss, grad_norm=norm, lr=1e-3)
    from_history, _ = api.generate_health_report(losses, grad_norms, [1e-3] * len(losses))
    from_monitor, _ = monitor.report()
    assert api.generate_health_report is generate_health_report
    assert from_monitor["checks"] == from_history["checks"]
    assert from_monitor["anomalies"] == from_history["anomalies"] == {
        "non_finite": [21], "loss_spike": [22], "grad_explosion": [22]
    }


# ---------------------------------------------------------------------------------- tracking
def test_start_mlflow_run_with_tracking_off_records_nothing():
    config = api.config_from_scenario("debug", overrides={"tracking.enabled": False})
    tracker = api.start_mlflow_run(config)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.close()
