"""Monitoring: per-group gradient norms, the step-time split, throughput drops, allocator and
NVML readings, the health plot and the health-report API for other training loops.

Unit tests feed the components directly (fake CUDA events, a fake NVML module); one tiny CPU
run with injected faults (OOM at step 3, NaN at step 5, slow batches at steps 8 and 9) checks
what the trainer logs."""

from __future__ import annotations

import json
import logging
import time
import types
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config.loader import load_config
from pipeline.monitor import HealthConfig, HealthMonitor, generate_health_report
from pipeline.monitor.grads import grad_norms_by_group, module_groups
from pipeline.monitor.perf import PhaseTimer, memory_metrics
from pipeline.monitor.plots import plot_health
from pipeline.monitor.system import GpuSampler
from pipeline.tracking import TrackingConfig
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "mlflow_store")


# ----------------------------------------------------------------------------- gradient groups
class _Parts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.encoder = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 1)
        self.unused = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        return self.scale * self.head(torch.tanh(self.encoder(x))).sum()


def test_group_grad_norms_are_the_norms_of_each_top_level_modules_gradients():
    torch.manual_seed(0)
    model = _Parts()
    model(torch.randn(5, 3)).backward()
    groups = module_groups(model)
    assert list(groups) == ["root", "encoder", "head", "unused"]  # frozen: nothing to train
    norms = grad_norms_by_group(model)
    for name, child in (("encoder", model.encoder), ("head", model.head)):
        flat = torch.cat([p.grad.flatten() for p in child.parameters()])
        assert norms[name].item() == pytest.approx(torch.sqrt((flat**2).sum()).item(), rel=1e-6)
    assert norms["root"].item() == pytest.approx(abs(model.scale.grad.item()), rel=1e-6)
    assert norms["unused"].item() == 0.0  # no gradient reached it
    assert all(t.ndim == 0 and t.dtype == torch.float32 for t in norms.values())


def _health(**overrides) -> HealthMonitor:
    return HealthMonitor(HealthConfig(window=10, **overrides), base_lr=1e-3, warmup_steps=2)


def test_explosion_and_vanishing_name_the_group_that_causes_them():
    h = _health(grad_explosion_norm=100.0, grad_vanishing_norm=1e-6)
    for step in range(1, 6):
        h.observe(step, loss=1.0, grad_norm=1.0, lr=1e-3)
    groups = {"trunk": 3.0, "diffusion": 4000.0, "confidence": 0.5}
    assert h.observe(6, loss=1.0, grad_norm=4000.0, lr=1e-3, group_norms=groups) == [
        "grad_explosion"
    ]
    check = h.report()["checks"]["grad_explosion"]
    assert "largest in group 'diffusion' (4e+03)" in check["suggestion"]
    assert check["evidence"][-1]["group"] == "diffusion"
    # The global norm is fine, one group gets nothing: vanishing, naming that group.
    groups = {"trunk": 0.3, "diffusion": 0.9, "confidence": 0.0}
    assert h.observe(7, loss=1.0, grad_norm=1.0, lr=1e-3, group_norms=groups) == ["grad_vanishing"]
    check = h.report()["checks"]["grad_vanishing"]
    assert "group 'confidence'" in check["suggestion"]
    assert check["evidence"][-1] == {"step": 7, "grad_norm": 1.0, "group": "confidence",
                                     "group_norm": 0.0}
    assert h.report()["grad_norms_by_group"] == groups
    # Without per-group norms (unlogged steps) the checks work on the global norm alone.
    assert h.observe(8, loss=1.0, grad_norm=1.0, lr=1e-3) == []


def _feed_throughput(h, start, n, *, samples_per_s, data_wait_s, step_s):
    fired = {}
    for step in range(start, start + n):
        fired[step] = h.observe(step, loss=1.0, grad_norm=1.0, lr=1e-3,
                                samples_per_s=samples_per_s, data_wait_s=data_wait_s,
                                step_s=step_s)
    return fired


@pytest.mark.parametrize("cause", ["data wait", "compute"])
def test_throughput_drop_fires_once_per_drop_with_its_cause(cause):
    h = _health(throughput_window=3, throughput_drop_fraction=0.5)
    # 8 samples per step: 0.1 s steps (10 ms of it waiting for data), then 0.4 s steps.
    before = _feed_throughput(h, 1, 12, samples_per_s=80.0, data_wait_s=0.01, step_s=0.1)
    wait = 0.31 if cause == "data wait" else 0.01
    during = _feed_throughput(h, 13, 6, samples_per_s=20.0, data_wait_s=wait, step_s=0.4)
    assert not any(before.values())
    # The median of the last 3 steps is slow from the second slow step on; said once.
    assert [s for s, f in during.items() if "throughput_drop" in f] == [14]
    check = h.report()["checks"]["throughput_drop"]
    assert check["count"] == 1 and check["evidence"][0]["cause"] == cause
    assert "25% of the earlier median 80" in check["suggestion"]
    expected = "loader.num_workers" if cause == "data wait" else "other jobs on the GPU"
    assert expected in check["suggestion"]
    # Back to speed re-arms the check: a second drop is a second warning.
    _feed_throughput(h, 19, 20, samples_per_s=80.0, data_wait_s=0.01, step_s=0.1)
    again = _feed_throughput(h, 39, 3, samples_per_s=20.0, data_wait_s=wait, step_s=0.4)
    assert [s for s, f in again.items() if "throughput_drop" in f] == [40]
    assert h.report()["anomalies"]["throughput_drop"] == [14, 40]


# ----------------------------------------------------------------------------- timing, memory
class _FakeEvent:
    """Stands in for torch.cuda.Event on one stream: records a fake device clock; completes
    when told (or by ``synchronize``, with every event recorded before it)."""

    clock = 0.0
    made: list[_FakeEvent] = []

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.time: float | None = None
        self.done = False
        self.synchronized = False
        _FakeEvent.made.append(self)

    def record(self, stream=None):
        self.time = _FakeEvent.clock

    def query(self):
        return self.done

    def synchronize(self):  # one stream: the events recorded before it complete first
        self.synchronized = True
        for event in _FakeEvent.made[: _FakeEvent.made.index(self) + 1]:
            event.done = True

    def elapsed_time(self, end):
        assert self.done and end.done, "elapsed_time before completion would block"
        return end.time - self.time


def test_phase_timer_on_cuda_times_only_sampled_steps_and_never_waits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(_FakeEvent, "made", [])
    timer = PhaseTimer(torch.device("cuda", 0), every=3)
    for step in range(1, 7):
        timer.begin(step, data_wait_s=0.002)
        for phase_ms in (5.0, 2.0, 0.5):  # compute, optimizer, logging
            _FakeEvent.clock += phase_ms
            timer.mark()
        assert timer.ready() == []  # nothing has completed on the "device"
    assert len(_FakeEvent.made) == 3 * 4  # steps 1, 3 and 6, four marks each
    for event in _FakeEvent.made[:4]:  # step 1's events complete
        event.done = True
    (ready,) = timer.ready()
    assert ready == (1, {"perf/time/data_ms": 2.0, "perf/time/compute_ms": 5.0,
                         "perf/time/optimizer_ms": 2.0, "perf/time/logging_ms": 0.5})
    assert not any(e.synchronized for e in _FakeEvent.made)
    assert [s for s, _ in timer.ready(wait=True)] == [3, 6]  # end of run: waits, once per step
    assert [e.synchronized for e in _FakeEvent.made] == [False] * 7 + [True] + [False] * 3 + [True]


def test_memory_metrics_include_allocator_retries_and_ooms(monkeypatch):
    gib = 1024**3
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (2 * gib, 8 * gib))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: 3 * gib)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: 5 * gib)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device: 4 * gib)
    monkeypatch.setattr(cuda, "memory_stats",
                        lambda device: {"num_alloc_retries": 7, "num_ooms": 1, "other": 3})
    metrics = memory_metrics(torch.device("cuda", 0))
    assert metrics == {
        "perf/gpu_mem_allocated_gib": 3.0, "perf/gpu_mem_reserved_gib": 5.0,
        "perf/gpu_mem_peak_gib": 4.0, "perf/gpu_mem_used_fraction": 0.75,
        "perf/gpu_alloc_retries": 7.0, "perf/gpu_ooms": 1.0,
    }
    assert memory_metrics(torch.device("cpu")) == {}


# ----------------------------------------------------------------------------- NVML
class _NVMLError(Exception):
    pass


def _fake_nvml(n_gpus: int = 2, *, init_error: bool = False) -> types.SimpleNamespace:
    """A stand-in for the pynvml module: GPU 1 cannot report its temperature."""
    calls: list[str] = []

    def temperature(handle, sensor):
        calls.append(f"temperature {handle}")
        if handle == 1:
            raise _NVMLError("Not Supported")
        return 60 + handle

    def init():
        if init_error:
            raise _NVMLError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        NVMLError=_NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, calls=calls,
        nvmlInit=init, nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: n_gpus, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetClockInfo=lambda handle, clock: 1980 - 100 * handle if clock == 1 else -1,
        nvmlDeviceGetCurrentClocksEventReasons=lambda handle: [0x4, 0x0][handle],
    )


def test_gpu_sampler_reads_temperature_clock_and_throttle_reasons(caplog):
    nvml = _fake_nvml()
    sampler = GpuSampler.start(nvml)
    with caplog.at_level(logging.INFO, logger="pipeline.monitor.system"):
        first, second = sampler.sample(), sampler.sample()
    assert first == second == {
        "system/gpu_0_temperature_c": 60.0, "system/gpu_0_sm_clock_mhz": 1980.0,
        "system/gpu_0_throttle_reasons": 4.0,  # SW power cap
        "system/gpu_1_sm_clock_mhz": 1880.0, "system/gpu_1_throttle_reasons": 0.0,
    }
    # The unsupported reading is said once and not asked again.
    assert nvml.calls == ["temperature 0", "temperature 1", "temperature 0"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "system: GPU 1: no temperature_c reading (Not Supported); not sampled again"
    sampler.close()
    assert nvml.calls[-1] == "shutdown"


def test_without_nvml_one_info_line_and_no_sampler(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.monitor.system"):
        assert GpuSampler.start(_fake_nvml(init_error=True)) is None
        assert GpuSampler.start(_fake_nvml(n_gpus=0)) is None
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]
    assert "NVML unavailable (NVML Shared Library Not Found)" in caplog.records[0].getMessage()
    assert "NVML sees no GPU" in caplog.records[1].getMessage()


def test_tracker_logs_gpu_samples_at_the_newest_training_step(monkeypatch):
    nvml = _fake_nvml(n_gpus=1)
    monkeypatch.setattr(GpuSampler, "start", classmethod(lambda cls: cls(nvml, [0])))
    tracker = MlflowTracker(
        TrackingConfig(system_metrics=True, system_interval_s=0.05, flush_interval_s=0.05),
        run_name="gpu-samples", tags={},
    )
    tracker.log_metrics({"train/loss": 1.0}, step=7)
    time.sleep(0.3)
    tracker.close()
    history = mlflow.MlflowClient().get_metric_history(tracker.run_id, "system/gpu_0_temperature_c")
    assert {m.value for m in history} == {60.0}
    assert 7 in {m.step for m in history}  # samples after step 7 was logged sit at step 7
    assert nvml.calls[-1] == "shutdown"


# ----------------------------------------------------------------------------- a run with faults
LOG_EVERY = 2
FAULTS = {"oom_recovery": [3], "non_finite": [5]}
SLOW = [8, 9]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """10 optimizer steps; OOM at 3, NaN loss at 5 (skipped), 1.5 s slow batches at 8 and 9."""
    out = tmp_path_factory.mktemp("faulty") / "out"
    config = load_config(scenario="debug", overrides=[
        "data.n_train=40", "data.n_val=2", "data.max_length=28", "trainer.micro_batch_size=4",
        "trainer.epochs=1", "trainer.val_max_structures=2", "trainer.val_sampler_steps=2",
        "tracking.system_metrics=false", f"tracking.log_every_steps={LOG_EVERY}",
        "health.window=5", "health.throughput_window=3", "recovery.grow_back_after_steps=null",
        f"faults.oom_at_steps={FAULTS['oom_recovery']}",
        f"faults.nan_loss_at_steps={FAULTS['non_finite']}",
        f"faults.slow_batch_at_steps={SLOW}", "faults.slow_batch_seconds=1.5",
        f"output_dir={out}",
    ])
    result = train(config)
    report = json.loads((Path(result.run_dir) / "health" / "report.json").read_text())
    return result, report


def _metric(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def test_grad_norms_per_group_are_logged_on_logged_steps_only(faulty_run):
    result, report = faulty_run
    logged = [1, 2, 4, 6, 8, 10]  # step 1 and every LOG_EVERY-th
    for group in ("trunk", "diffusion", "distogram", "confidence"):
        norms = _metric(result.run_id, f"train/grad_norm/{group}")
        assert sorted(norms) == logged, group
        assert all(v > 0 for v in norms.values())
    total = _metric(result.run_id, "train/grad_norm")
    groups = [_metric(result.run_id, f"train/grad_norm/{g}") for g in report["grad_norms_by_group"]]
    for step in logged:  # the groups partition the parameters: squares add up
        assert sum(g[step] ** 2 for g in groups) == pytest.approx(total[step] ** 2, rel=1e-4)


def test_step_time_split_is_logged_on_sampled_steps_and_adds_up(faulty_run):
    result, _ = faulty_run
    parts = {p: _metric(result.run_id, f"perf/time/{p}_ms")
             for p in ("data", "compute", "optimizer", "logging")}
    step_ms = _metric(result.run_id, "perf/step_time_ms")
    for part, values in parts.items():
        assert sorted(values) == [1, 2, 4, 6, 8, 10], part  # timing_every_steps = log_every
    for step in parts["data"]:
        measured = parts["data"][step] + parts["compute"][step] + parts["optimizer"][step]
        assert measured == pytest.approx(step_ms[step], rel=0.05, abs=2.0), step
        assert 0 < parts["logging"][step] < step_ms[step]
    # The slow batch sleeps before the forward pass: compute, not data wait.
    assert parts["compute"][8] > 1500 and parts["data"][8] < 100
    eta = _metric(result.run_id, "perf/eta_s")
    assert eta[10] == 0.0
    # At step 2: 8 steps left at the median (here: mean) of the two step times so far.
    assert eta[2] == pytest.approx(8 * (step_ms[1] + step_ms[2]) / 2 / 1000, rel=1e-6)


def test_injected_slow_batches_raise_a_throughput_drop_warning(faulty_run):
    result, report = faulty_run
    check = report["checks"]["throughput_drop"]
    assert check["status"] == "warning"
    evidence = {e["step"]: e for e in check["evidence"]}
    assert 9 in evidence  # the recent 3 steps (7, 8, 9): two of them slow
    assert evidence[9]["cause"] == "compute" and "other jobs on the GPU" in check["suggestion"]
    assert evidence[9]["samples_per_s"] < 0.5 * evidence[9]["samples_per_s_before"]
    assert mlflow.MlflowClient().get_run(result.run_id).data.metrics[
        "health/throughput_drop_count"] >= 1


def test_health_plot_marks_the_injected_fault_steps(faulty_run, tmp_path):
    result, report = faulty_run
    for kind, steps in FAULTS.items():
        assert report["anomalies"][kind] == steps
    assert (Path(result.run_dir) / "plots" / "health.png").stat().st_size > 10_000
    client = mlflow.MlflowClient()
    assert "plots/health.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}
    figure = plot_health(report)
    titles = [ax.get_ylabel() for ax in figure.axes]
    assert titles == ["train/loss", "pre-clip grad norm", "learning rate", "samples/s"]  # no GPU
    for ax in figure.axes:
        marked = {
            c.get_gid().split(":", 1)[1]: [round(seg[0][0]) for seg in c.get_segments()]
            for c in ax.collections if (c.get_gid() or "").startswith("anomaly:")
        }
        assert marked == report["anomalies"]
        for kind, steps in FAULTS.items():
            assert marked[kind] == steps
    (loss_steps, *_) = zip(*report["series"]["loss"])
    assert list(loss_steps) == list(range(1, 11))


# ----------------------------------------------------------------------------- library API
def test_generate_health_report_for_a_custom_training_loop(tmp_path, faulty_run):
    torch.manual_seed(0)
    model = _Parts()
    model(torch.randn(5, 3)).backward()
    model.head.weight.grad.mul_(1e4)  # the head's gradients explode
    losses = [1.0 - 0.01 * i for i in range(30)] + [8.0]
    grad_norms = [0.5] * 30 + [500.0]
    lrs = [1e-3] * 31
    report, markdown = generate_health_report(
        losses, grad_norms, lrs, model=model, plot=tmp_path / "health.png"
    )
    assert report["overall_status"] == "warning"
    # The spike, the head's explosion, and the child no gradient reaches ("unused").
    assert report["anomalies"] == {"loss_spike": [31], "grad_explosion": [31],
                                   "grad_vanishing": [31]}
    assert "group 'unused'" in report["checks"]["grad_vanishing"]["suggestion"]
    explosion = report["checks"]["grad_explosion"]
    assert explosion["evidence"] == [
        {"step": 31, "grad_norm": 500.0, "group": "head",
         "group_norm": pytest.approx(report["grad_norms_by_group"]["head"])}
    ]
    assert "largest in group 'head'" in explosion["suggestion"]
    # Group norms are rescaled to the given pre-clip norm of the last step (500).
    groups = report["grad_norms_by_group"]
    assert sum(v**2 for v in groups.values()) == pytest.approx(500.0**2)
    raw = {k: v.item() for k, v in grad_norms_by_group(model).items()}
    assert groups["head"] / groups["encoder"] == pytest.approx(raw["head"] / raw["encoder"])
    assert "| grad_explosion | warning | 1 |" in markdown
    assert (tmp_path / "health.png").stat().st_size > 10_000
    # The same report as the trainer's (which adds its recovery counters and slow steps).
    _, trainer_report = faulty_run
    assert set(trainer_report) - set(report) == {"recovery", "slow_steps"}
    assert set(report["checks"]) == set(trainer_report["checks"])
    with pytest.raises(ValueError, match="same length, but got 31, 30 and 31"):
        generate_health_report(losses, grad_norms[:-1], lrs)
