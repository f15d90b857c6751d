"""End to end on the CPU: train (debug) -> MLflow run -> evaluate -> tune; and `mlflow run`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import free_port
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Small enough for CI, large enough to have several optimizer steps and two validations.
FAST = [
    "--set", "data.n_train=32",
    "--set", "data.n_val=4",
    "--set", "trainer.epochs=2",
    "--set", "trainer.val_max_structures=4",
    "--set", "tracking.system_interval_s=1",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e")
    old_cwd = os.getcwd()
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
    yield path
    os.chdir(old_cwd)
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri


@pytest.fixture(scope="module")
def trained(workdir):
    out = workdir / "outputs"
    code = main(["train", "--scenario", "debug", *FAST, "--set", f"output_dir={out}"])
    assert code == 0
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert len(runs) == 1
    return runs[0], out


def test_train_run_is_tracked(trained):
    run, _ = trained
    client = mlflow.MlflowClient()
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["trainer.epochs"] == "2" and params["data.n_train"] == "32"
    assert params["scenario"] == "debug" and params["optim.lr"] == str(3e-4)
    assert run.data.tags["scenario"] == "debug" and run.data.tags["preset"] == "small_model"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss) >= 4 and len({m.step for m in loss}) == len(loss)
    lddt = client.get_metric_history(run.info.run_id, "val/lddt")
    assert len(lddt) == 2 and all(0.0 <= m.value <= 1.0 for m in lddt)
    for key in ("val/rmsd", "val/gdt_ts", "val/tm_score", "val/plddt_pearson", "train/lr",
                "train/grad_norm", "perf/step_time_ms", "perf/data_wait_ms", "health/status"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert any(p.endswith(".pt") for p in artifacts)
    resolved = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/resolved.yaml")
    assert "n_train: 32" in resolved
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/health/report.md")
    assert "Overall status" in report


def test_checkpoint_loads_weights_only(trained):
    _, out = trained
    ckpt = sorted(out.glob("runs/*/checkpoints/step-*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "data", "step", "epoch", "model_hash"):
        assert key in state


def test_evaluate_run_id(trained, workdir):
    run, _ = trained
    output = workdir / "eval" / "targets.csv"
    assert main(["evaluate", "--run-id", run.info.run_id, "--n-samples", "2",
                 "--output", str(output)]) == 0
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 4
    assert all(0.0 <= float(r["lddt"]) <= 1.0 and float(r["rmsd"]) >= 0 for r in rows)
    client = mlflow.MlflowClient()
    evals = [r for r in client.search_runs([run.info.experiment_id])
             if r.data.tags.get("role") == "evaluate"]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert evals[0].data.tags["source_run_id"] == run.info.run_id
    assert "val/lddt" in evals[0].data.metrics


def test_tune_two_trials_parent_and_children(workdir):
    out = workdir / "tune-out"
    code = main(["tune", "--n-trials", "2", "--scenario", "debug", *FAST,
                 "--set", "trainer.epochs=1", "--set", f"output_dir={out}",
                 "--study-name", "e2e"])
    assert code == 0
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("diffold").experiment_id
    parents = [r for r in client.search_runs([exp]) if r.data.tags.get("role") == "tune-parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert len(children) == 2
    assert all("val/lddt" in c.data.metrics for c in children)
    searched = {c.data.params["trainer.accumulation_steps"] for c in children}
    assert searched <= {"1", "2", "4", "8"}
    best = out / "tune" / "e2e" / "best_config.yaml"
    assert best.is_file() and "accumulation_steps" in best.read_text()


def _mlflow_run(project_args: list[str], env: dict, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), *project_args,
         "--env-manager", "local", "--experiment-name", "mlproject"],
        env=env, capture_output=True, text=True, timeout=600, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]



def test_mlflow_run_entry_points_and_the_ui_server(tmp_path):
    """`mlflow run . -e train|evaluate|tune` exactly as the README says, then `mlflow ui`
    on 127.0.0.1 lists the runs they made."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    overrides = " ".join(a for a in FAST if a != "--set") + f" output_dir={tmp_path / 'out'}"
    _mlflow_run(["-e", "train", "-P", "scenario=debug", "-P", "epochs=1",
                 "-P", f"overrides={overrides}"], env, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mlproject").experiment_id
    (run,) = client.search_runs([experiment])  # the trainer logged into `mlflow run`'s run
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.epochs"] == "1"
    assert "train/loss" in run.data.metrics and "val/lddt" in run.data.metrics

    _mlflow_run(["-e", "evaluate", "-P", f"run_id={run.info.run_id}", "-P", "n_samples=1",
                 "-P", f"output={tmp_path / 'eval.csv'}"], env, tmp_path)
    _mlflow_run(["-e", "tune", "-P", "n_trials=2", "-P", "scenario=debug",
                 "-P", f"overrides={overrides} trainer.epochs=1"], env, tmp_path)
    runs = client.search_runs([experiment])
    roles = sorted(r.data.tags.get("role", "train") for r in runs)
    assert roles == ["evaluate", "train", "train", "train", "tune-parent"]
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if r.data.tags.get("role") == "tune-parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2

    port = free_port()  # the README's `mlflow ui --host 127.0.0.1`, on a free port
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        body = json.dumps({"experiment_ids": [experiment]}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    listed = json.load(response)["runs"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        assert len(listed) == 5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200  # the UI page itself is served
    finally:
        server.terminate()
        server.wait(timeout=30)


def _mlflow_train_one_epoch(tmp_path: Path, scenario: str, overrides: str):
    """`mlflow run . -e train -P scenario=SCENARIO -P epochs=1 -P overrides=...` with a small
    validation, into a fresh sqlite store; the client and the one run it made."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    overrides += (f" trainer.val_max_structures=2 trainer.val_sampler_steps=4 "
                  f"output_dir={tmp_path / 'out'}")
    _mlflow_run(["-e", "train", "-P", f"scenario={scenario}", "-P", "epochs=1",
                 "-P", f"overrides={overrides}"], env, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mlproject").experiment_id])
    return client, run


def test_mlflow_run_of_the_main_job_with_the_balanced_scenario(tmp_path):
    """The README's main job, `mlflow run . -e train -P scenario=balanced --env-manager local`,
    on a CPU-sized slice of the shipped synthetic data (one epoch of 16 structures): the
    balanced scenario's loader worker processes, step checkpoints and health checks run."""
    client, run = _mlflow_train_one_epoch(
        tmp_path, "balanced", "data.n_train=16 data.n_val=2 data.max_length=32")
    assert run.info.status == "FINISHED"
    assert run.data.tags["scenario"] == "balanced"
    assert run.data.params["loader.num_workers"] == "2"
    assert "val/lddt" in run.data.metrics


def test_mlflow_run_trains_on_a_directory_of_real_structure_files(tmp_path, rna_puzzles):
    """`mlflow run . -e train -P scenario=debug -P overrides="data.source=files data.path=DIR"`
    on the 18 RNA-Puzzles natives: every file is read, the run trains and validates."""
    natives = rna_puzzles / "natives"
    client, run = _mlflow_train_one_epoch(
        tmp_path, "debug", f"data.source=files data.path={natives}")
    assert run.info.status == "FINISHED"
    assert run.data.params["data.source"] == "files"
    stats = json.loads(Path(client.download_artifacts(run.info.run_id, "data/stats.json",
                                                      str(tmp_path))).read_text())
    n_files = len([p for p in natives.iterdir() if p.suffix in (".pdb", ".cif")])
    assert stats["files_found"] == stats["structures_used"] == n_files == 18
    assert stats["n_train"] + stats["n_val"] == n_files and stats["n_val"] >= 1
    assert "val/lddt" in run.data.metrics


def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun with two gloo processes: one MLflow run, metrics reduced across ranks."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "-m", "pipeline", "train", "--scenario", "debug", *FAST,
         "--set", f"output_dir={tmp_path / 'out'}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("diffold").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    seen = client.get_metric_history(run.info.run_id, "train/samples_seen")
    assert max(m.value for m in seen) == 64  # 32 structures x 2 epochs, split over 2 ranks
    assert "val/lddt" in run.data.metrics
    assert len(list((tmp_path / "out").glob("runs/*"))) == 1  # rank 0 alone writes checkpoints
