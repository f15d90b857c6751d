"""The trainer with MLflow: the logged model, checkpoint uploads, error tags, and the plateau
schedule fed by validation. Tiny CPU runs against one sqlite store per module."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from conftest import TINY_RUN
from pipeline.config.loader import load_config
from pipeline.data import build_datasets
from pipeline.evaluation.model_eval import predict
from pipeline.model import build_model
from pipeline.tracking import TrackingConfig
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.train.checkpoint import load_checkpoint, read_entry, write_checkpoint
from pipeline.train.runtime import make_val_batches
from pipeline.train.trainer import error_tag, train

TINY = [*TINY_RUN, "tracking.system_metrics=false"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "mlflow_store")


def _config(tmp_path, *extra):
    return load_config(scenario="debug", overrides=[*TINY, f"output_dir={tmp_path / 'out'}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 4 steps with a checkpoint after every step and model registration."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = _config(tmp_path, "trainer.checkpoint_every_steps=1",
                     "tracking.register_model=diffold-test")
    return config, train(config)


def test_best_model_is_logged_reloads_and_is_registered(finished):
    config, result = finished
    best = load_checkpoint(Path(result.run_dir) / "checkpoints" / "best.pt")
    assert best["step"] < result.step  # the best weights are not the final ones here
    loaded = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    reference = build_model(config.model)
    reference.load_state_dict(best["model"])
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    data = build_datasets(config.data, seed=config.seed, cache_dir=Path(config.output_dir) / "cache",
                          cache=config.loader.cache)
    batch = make_val_batches(data.val, 2, 2)[0]
    ours = predict(reference.eval(), batch, n_samples=1, n_steps=2, seed=0)
    theirs = predict(loaded.eval(), batch, n_samples=1, n_steps=2, seed=0)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    (version,) = mlflow.MlflowClient().search_model_versions("name='diffold-test'")
    assert int(version.version) == 1 and version.run_id == result.run_id


def test_start_up_is_logged_once_at_the_first_step(finished):
    """Set-up, first batch and first step of the run, each once, at step 1, in order."""
    _, result = finished
    client = mlflow.MlflowClient()
    startup = {}
    for key in ("perf/setup_s", "perf/first_batch_s", "perf/first_step_s"):
        (point,) = client.get_metric_history(result.run_id, key)
        assert point.step == 1 and point.value > 0, key
        startup[key] = point.value
    assert startup["perf/first_batch_s"] < startup["perf/first_step_s"]


def test_checkpoints_are_uploaded_newest_overwriting(finished, tmp_path):
    _, result = finished
    client = mlflow.MlflowClient()
    names = sorted(Path(a.path).name for a in client.list_artifacts(result.run_id, "checkpoints"))
    assert names == ["best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256"]
    local = mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/checkpoints",
                                                dst_path=str(tmp_path))
    uploaded = load_checkpoint(Path(local) / "last.pt")  # checksum verified
    final = load_checkpoint(result.checkpoint)
    assert uploaded["step"] == final["step"] == result.step == 4
    assert all(torch.equal(uploaded["model"][k], v) for k, v in final["model"].items())
    checkpoints = Path(result.run_dir) / "checkpoints"
    assert not list(checkpoints.glob(".upload-*"))  # staging links removed after the upload


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"step-{step:08d}.pt"
    write_checkpoint(path, {"format_version": 1, "step": step})
    return path


def test_failed_upload_warns_and_is_retried_at_the_next_checkpoint(tmp_path, monkeypatch, caplog):
    tracker = MlflowTracker(TrackingConfig(system_metrics=False, flush_interval_s=0.05),
                            run_name="flaky-uploads", tags={})
    real = tracker.client.log_artifact
    calls = []

    def flaky(run_id, path, artifact_path=None):
        calls.append(Path(path).name)
        if len(calls) == 1:
            raise MlflowException("artifact store unavailable")
        real(run_id, path, artifact_path)

    monkeypatch.setattr(tracker.client, "log_artifact", flaky)
    best = tmp_path / "best.pt"
    write_checkpoint(best, {"format_version": 1, "step": 2})
    tracker.log_checkpoint(best, "best.pt")  # does not raise
    tracker.flush()
    time.sleep(0.3)  # a few worker rounds: no retry before the next checkpoint
    assert calls == ["best.pt"]
    assert "upload of checkpoints/best.pt failed (artifact store unavailable)" in caplog.text
    tracker.log_checkpoint(_checkpoint(tmp_path, 3), "last.pt")
    tracker.flush()
    assert sorted(calls) == ["best.pt", "best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256"]
    tracker.close()
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{tracker.run_id}/checkpoints",
                                                     dst_path=str(tmp_path / "down")))
    assert load_checkpoint(local / "best.pt")["step"] == 2
    assert load_checkpoint(local / "last.pt")["step"] == 3


def test_upload_runs_off_the_caller_and_newest_replaces_unsent(tmp_path, monkeypatch):
    tracker = MlflowTracker(TrackingConfig(system_metrics=False, flush_interval_s=0.05),
                            run_name="slow-uploads", tags={})
    real = tracker.client.log_artifact
    started, release = threading.Event(), threading.Event()
    uploaded = []

    def slow(run_id, path, artifact_path=None):
        started.set()
        release.wait(timeout=30)
        if path.endswith(".pt"):
            uploaded.append(read_entry(Path(path), "step"))
        real(run_id, path, artifact_path)

    monkeypatch.setattr(tracker.client, "log_artifact", slow)
    seconds = []
    for step in (1, 2, 3):
        start = time.perf_counter()
        tracker.log_checkpoint(_checkpoint(tmp_path, step), "last.pt")
        seconds.append(time.perf_counter() - start)
        if step == 1:
            assert started.wait(timeout=10)  # the worker took step 1 and is stuck uploading it
    assert max(seconds) < 0.5  # the caller never waits for an upload
    release.set()
    tracker.close()
    # Step 2 was replaced by step 3 before it was sent; step 1 was already on its way.
    assert uploaded == [1, 3]
    assert not list(tmp_path.glob(".upload-*"))


def test_failed_run_is_tagged_with_its_error(tmp_path):
    config = _config(tmp_path, "recovery.oom=false", "faults.oom_at_steps=[2]",
                     "tracking.run_name=fails-with-oom")
    with pytest.raises(torch.OutOfMemoryError):
        train(config)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id],
                                filter_string="attributes.run_name = 'fails-with-oom'")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected fault at step 2)"
    )


def test_error_tag_is_type_and_first_line_within_500_characters():
    tag = error_tag(ValueError("x" * 600 + "\nsecond line"))
    assert tag == ("ValueError: " + "x" * 600)[:500] and len(tag) == 500
    assert error_tag(RuntimeError("bad value\ncontext")) == "RuntimeError: bad value"
    assert error_tag(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_plateau_lr_changes_only_when_validation_stalls(tmp_path):
    """2 steps per epoch, validations after steps 2, 4, 6; patience 0 and a threshold no
    val/lddt can beat: the second validation halves the LR from step 5 on."""
    config = _config(tmp_path, "trainer.epochs=3", "scheduler.name=plateau",
                     "scheduler.warmup_steps=0", "scheduler.plateau_patience=0",
                     "scheduler.plateau_threshold=10", "tracking.run_name=plateau")
    result = train(config)
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train/lr")
    lrs = [m.value for m in sorted(history, key=lambda m: m.step)]
    lr = config.optim.lr
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert lrs == pytest.approx([lr] * 4 + [lr / 2] * 2)
    state = load_checkpoint(result.checkpoint)
    # No later validation beats the first by the threshold, so the first stays the plateau's
    # best (whichever validation has the best val/lddt).
    val = mlflow.MlflowClient().get_metric_history(result.run_id, "val/lddt")
    first = min(val, key=lambda m: m.step).value
    assert state["scheduler"]["plateau"]["best"] == pytest.approx(first)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr / 4)  # 3rd validation

