"""Tuning on the CPU with the debug scenario: pruning, resume, crashes, Pareto/time budget, and
worker processes sharing a PostgreSQL study (127.0.0.1:5432, a throwaway database per test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pipeline.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--scenario", "debug",
    "--set", "data.n_train=32",
    "--set", "data.n_val=4",
    "--set", "trainer.val_max_structures=4",
    "--set", "tracking.system_metrics=false",
]
N_TRAIN = 32


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return tmp_path


def _tune_file(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _journal_study(out: Path, name: str) -> optuna.Study:
    journal = out / "tune" / name / "optuna-journal.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage)


def _runs(role: str | None = None, parent: str | None = None):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("diffold").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    if role is not None:
        runs = [r for r in runs if r.data.tags.get("role") == role]
    if parent is not None:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    return runs


def test_a_continued_study_does_not_repeat_its_suggestions(workdir):
    """A seeded sampler restarted on the same study would draw the first call's parameter
    sets again (the random sampler exactly): the continued call must propose new ones."""
    tune = _tune_file(
        workdir / "tune.yaml", sampler="random", pruner="none",
        search_space={"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True}},
    )
    args = ["tune", "--tune-config", str(tune), "--study-name", "s", *TINY,
            "--set", "trainer.epochs=1", "--set", f"output_dir={workdir / 'out'}",
            "--n-trials", "2"]
    assert main(args) == 0
    assert main(args) == 0
    lrs = [t.params["optim.lr"] for t in _journal_study(workdir / "out", "s").trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs


def test_pruned_trial_is_killed_resume_adds_trials_and_best_config_trains(workdir):
    # The second trial cannot learn (lr 1e-9): the median pruner stops it at its first report.
    tune = _tune_file(
        workdir / "tune.yaml",
        sampler="random", pruner="median", n_startup_trials=1, median_warmup_reports=0,
        enqueue=[{"optim.lr": 0.003}, {"optim.lr": 1.0e-9}],
        search_space={"optim.lr": {"type": "categorical", "choices": [0.003, 1.0e-9]}},
    )
    out = workdir / "out"
    args = ["tune", "--tune-config", str(tune), "--study-name", "s", *TINY,
            "--set", "trainer.epochs=2", "--set", f"output_dir={out}"]
    assert main([*args, "--n-trials", "2"]) == 0

    study = _journal_study(out, "s")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    # Reports are on the samples-seen axis: one epoch of N_TRAIN structures, whatever the
    # accumulation; the completed trial reported after each of its two epochs.
    assert sorted(study.trials[0].intermediate_values) == [N_TRAIN, 2 * N_TRAIN]
    assert sorted(study.trials[1].intermediate_values) == [N_TRAIN]
    pruned_value = study.trials[1].intermediate_values[N_TRAIN]
    assert pruned_value < study.trials[0].intermediate_values[N_TRAIN]

    (parent,) = _runs("tune-parent")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pruner"] == "median"
    children = {int(r.data.tags["trial"]): r for r in _runs(parent=parent.info.run_id)}
    assert children[0].info.status == "FINISHED"
    assert children[1].info.status == "KILLED"
    assert children[1].data.tags["status"] == "pruned"
    # The pruned trial keeps its report but draws no figures (tracking.plots=unless_pruned).
    client = mlflow.MlflowClient()
    for number, drawn in ((0, True), (1, False)):
        run_id = children[number].info.run_id
        top = {a.path for a in client.list_artifacts(run_id)}
        assert "summary.md" in top and "health" in top
        plots = {a.path for a in client.list_artifacts(run_id, "plots")}
        assert bool(plots) is drawn, (number, plots)
        if drawn:
            assert {"plots/training.png", "plots/health.png", "plots/lr.png"} <= plots
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "best_config.yaml" in artifacts

    # Re-running the same study adds trials to it, under the same parent run.
    assert main([*args, "--n-trials", "1"]) == 0
    study = _journal_study(out, "s")
    assert len(study.trials) == 3
    assert study.trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    (parent_again,) = _runs("tune-parent")
    assert parent_again.info.run_id == parent.info.run_id
    assert len(_runs(parent=parent.info.run_id)) == 3

    # The trials shared one data cache (the synthetic set was generated once).
    assert (out / "cache" / "features").is_dir()
    assert not list(out.glob("tune/s/trial-*/cache"))

    best = out / "tune" / "s" / "best_config.yaml"
    assert yaml.safe_load(best.read_text())["optim"]["lr"] == 0.003
    assert main(["train", "--config", str(best), "--set", "trainer.epochs=1",
                 "--set", f"output_dir={workdir / 'from-best'}"]) == 0


def test_trials_report_the_prune_metric_in_the_study_direction(workdir):
    """With ``prune_metric: val/loss`` (minimize) in a study that maximises val/lddt, each
    report the pruner sees is minus the validation loss the child run logged at that point,
    and the trial's value is still its val/lddt."""
    tune = _tune_file(
        workdir / "tune.yaml", sampler="random", pruner="median", prune_metric="val/loss",
        prune_direction="minimize",
        search_space={"optim.lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-3}},
    )
    out = workdir / "out"
    assert main(["tune", "--tune-config", str(tune), "--study-name", "s", *TINY, "--set",
                 "trainer.epochs=2", "--set", f"output_dir={out}", "--n-trials", "1"]) == 0
    (trial,) = _journal_study(out, "s").trials
    (parent,) = _runs("tune-parent")
    assert parent.data.params["prune_metric"] == "val/loss (minimize)"
    (child,) = _runs(parent=parent.info.run_id)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(child.info.run_id, "val/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    reports = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    assert len(reports) == 2 and reports == [-v for v in losses]
    assert all(v < 0 for v in reports)
    assert trial.value == child.data.metrics["val/lddt"]


def test_a_crashed_trial_is_recorded_and_the_study_goes_on(workdir):
    # Every trial meets an OOM at step 2; trial 0 may not retry it (OOM beyond recovery).
    tune = _tune_file(
        workdir / "tune.yaml",
        sampler="random", pruner="none",
        enqueue=[{"recovery.max_oom_retries": 0}, {"recovery.max_oom_retries": 2}],
        search_space={"recovery.max_oom_retries": {"type": "categorical", "choices": [0, 2]}},
    )
    out = workdir / "out"
    assert main(["tune", "--tune-config", str(tune), "--study-name", "crash", "--n-trials", "2",
                 *TINY, "--set", "trainer.epochs=1", "--set", "faults.oom_at_steps=[2]",
                 "--set", "trainer.micro_batch_size=4", "--set", f"output_dir={out}"]) == 0
    study = _journal_study(out, "crash")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "OutOfMemoryError" in study.trials[0].user_attrs["error"]
    (parent,) = _runs("tune-parent")
    children = {int(r.data.tags["trial"]): r for r in _runs(parent=parent.info.run_id)}
    assert children[0].info.status == "FAILED"
    assert children[1].info.status == "FINISHED"
    assert children[1].data.metrics["recovery/oom_recoveries"] == 1


def test_pareto_objective_with_a_time_budget(workdir):
    tune = _tune_file(
        workdir / "tune.yaml",
        sampler="random", objective="pareto", time_budget_minutes=0.05,
        search_space={"loader.prefetch_factor": {"type": "int", "low": 1, "high": 8}},
    )
    out = workdir / "out"
    # epochs is only an upper bound under a time budget: no trial gets near it in 3 s.
    assert main(["tune", "--tune-config", str(tune), "--study-name", "p", "--n-trials", "2",
                 *TINY, "--set", "trainer.epochs=500", "--set", f"output_dir={out}"]) == 0
    study = _journal_study(out, "p")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        quality, throughput = t.values
        assert 0 < quality <= 1 and throughput > 0
        assert t.user_attrs["samples_seen"] < 500 * N_TRAIN
        assert t.user_attrs["status"] == "time_limit"
    front = yaml.safe_load((out / "tune" / "p" / "pareto_front.yaml").read_text())
    assert {row["trial"] for row in front} == {t.number for t in study.best_trials}
    (parent,) = _runs("tune-parent")
    assert parent.data.params["pruner"] == "none"  # Optuna cannot prune multi-objective studies
    assert parent.data.params["objective"] == "pareto"
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in plots


# ============================================================== PostgreSQL and worker processes
def _pg_study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "tune", *args]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial_with_run(url: str, name: str):
    """A RUNNING trial whose MLflow child run exists (the worker is inside train())."""
    try:
        study = _pg_study(url, name)
    except KeyError:
        return None
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        if "worker" in t.user_attrs and any(
            r.data.tags.get("trial") == str(t.number) and r.data.tags.get("study_name") == name
            for r in _runs()
        ):
            return t
    return None


def test_two_workers_share_a_postgresql_study_and_survive_a_killed_worker(workdir, pg_url):
    tune = _tune_file(
        workdir / "tune.yaml", sampler="random", pruner="none", heartbeat_interval_s=1,
        grace_period_s=3,
        search_space={"scheduler.warmup_epochs": {"type": "float", "low": 0.0, "high": 2.0}},
    )
    launcher = subprocess.Popen(
        _cli("--tune-config", str(tune), "--study-name", "pg", "--n-trials", "4",
             "--n-workers", "2", "--storage", pg_url, *TINY, "--set", "trainer.epochs=1",
             "--set", f"output_dir={workdir / 'out'}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
    )
    try:
        victim = _wait_for(lambda: _running_trial_with_run(pg_url, "pg"), 240, "a running trial")
        os.kill(int(victim.user_attrs["worker"].rpartition(":")[2]), signal.SIGKILL)
        output, _ = launcher.communicate(timeout=400)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    for problem in ("deadlock", "could not obtain lock", "Traceback"):
        assert problem not in output, output[-3000:]

    study = _pg_study(pg_url, "pg")
    states = {t.number: t.state for t in study.trials}
    assert states[victim.number] == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 4
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2

    (parent,) = _runs("tune-parent")
    assert parent.info.status == "FINISHED"
    children = _runs(parent=parent.info.run_id)
    lost = [r for r in children if r.data.tags["trial"] == str(victim.number)]
    assert [r.info.status for r in lost] == ["FAILED"]
    assert "lost" in lost[0].data.tags["error"]
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 4


def test_a_stale_trial_of_another_host_is_failed_by_heartbeat_and_rerun(workdir, pg_url):
    """A worker joining with --parent-run-id (as on another host) dies; the next worker finds
    the trial's heartbeat stale, fails it and runs it again."""
    tune = _tune_file(
        workdir / "tune.yaml", sampler="random", pruner="none", heartbeat_interval_s=1,
        grace_period_s=2,
        search_space={"scheduler.warmup_epochs": {"type": "float", "low": 0.0, "high": 2.0}},
    )
    mlflow.set_experiment("diffold")
    parent = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name("diffold").experiment_id, tags={"role": "tune-parent"}
    ).info.run_id
    optuna.create_study(study_name="hb", storage=pg_url, direction="maximize")
    join = _cli("--tune-config", str(tune), "--study-name", "hb", "--n-trials", "1",
                "--parent-run-id", parent, "--storage", pg_url, *TINY,
                "--set", "trainer.epochs=2", "--set", f"output_dir={workdir / 'out'}")
    first = subprocess.Popen(join, cwd=workdir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        victim = _wait_for(lambda: _running_trial_with_run(pg_url, "hb"), 240, "a running trial")
    finally:
        first.kill()
        first.wait()
    # Optuna looks for stale trials once, before a worker's first trial: a second worker that
    # started within the grace period of the victim's last heartbeat would run a fresh trial
    # beside it (a race, seen in CI). Let the grace period pass, as it would between hosts.
    time.sleep(2 + 1.5)
    second = subprocess.run(join, cwd=workdir, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    study = _pg_study(pg_url, "hb")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].params == victim.params
    assert study.trials[1].system_attrs["failed_trial"] == victim.number
    runs = {r.data.tags["trial"]: r for r in _runs(parent=parent)}
    assert runs["0"].info.status == "FAILED" and "lost" in runs["0"].data.tags["error"]
    assert runs["1"].info.status == "FINISHED"


# ============================================================== the tune config
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("enqueue: [{optim.lr: 0.1}]\nsearch_space: {trainer.accumulation_steps: "
         "{type: categorical, choices: [1, 2]}}", "enqueue[0].optim.lr: not in search_space"),
        ("enqueue: [{trainer.accumulation_steps: 3}]\nsearch_space: {trainer.accumulation_steps: "
         "{type: categorical, choices: [1, 2]}}", "enqueue[0].trainer.accumulation_steps: 3 is outside"),
        ("enqueue: [{scheduler.warmup_epochs: 11}]\nsearch_space: {scheduler.warmup_epochs: "
         "{type: float, low: 0, high: 10}}", "enqueue[0].scheduler.warmup_epochs: 11 is outside"),
        ("enqueue: [7]\nsearch_space: {scheduler.warmup_epochs: {type: float, low: 0, high: 1}}",
         "enqueue: expected a list of values of a mapping"),
        ("objective: both\nsearch_space: {scheduler.warmup_epochs: {type: float, low: 0, high: 1}}",
         "objective: expected one of 'quality', 'pareto'"),
        ("time_budget_minutes: 0\nsearch_space: {scheduler.warmup_epochs: "
         "{type: float, low: 0, high: 1}}", "time_budget_minutes: expected a value > 0"),
        ("prune_metric: val/loss\nsearch_space: {scheduler.warmup_epochs: "
         "{type: float, low: 0, high: 1}}", "prune_direction: required with prune_metric"),
        ("prune_direction: minimize\nsearch_space: {scheduler.warmup_epochs: "
         "{type: float, low: 0, high: 1}}", "prune_direction: 'minimize' applies to a prune"),
    ],
)
def test_bad_tune_config_is_one_line_error(tmp_path, capsys, text, message):
    code = main(["tune", "--tune-config", str(_write(tmp_path, text)), "--scenario", "debug",
                 "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_missing_database_driver_is_one_line_error(tmp_path, capsys):
    code = main(["tune", "--scenario", "debug", "--set", f"output_dir={tmp_path}",
                 "--storage", "mysql+nosuchdriver://u:secret@127.0.0.1/db"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --storage"), err
    assert "secret" not in err  # the password is not echoed


def test_successive_halving_cuts_on_the_samples_axis():
    """With the synthetic set, the first rung is one validation interval of samples
    (data.n_train x eval_every_epochs = 16): a report before it never prunes; at it, a trial
    below the best 1/reduction_factor of those that reached it is pruned, a better one is not.
    Decisions are Optuna's; the test checks that the configured rungs are where they belong."""
    from pipeline.config.loader import load_config
    from pipeline.tune.study import TuneConfig, _pruner

    base = load_config(scenario="debug", overrides=["data.n_train=16"])
    pruner = _pruner(TuneConfig(pruner="successive_halving", reduction_factor=3), base)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def report(value: float, samples: int) -> bool:
        trial = study.ask()
        trial.report(value, samples)
        pruned = trial.should_prune()
        study.tell(trial, state=TrialState.PRUNED) if pruned else study.tell(trial, value)
        return pruned

    assert not report(0.01, 8)  # before the first rung: never
    for value in (0.9, 0.8, 0.7, 0.6, 0.5):
        report(value, 16)
    assert report(0.05, 16)  # worst at the rung
    assert not report(0.95, 16)  # best at the rung


def test_median_pruner_waits_for_the_configured_reports():
    """The default median pruner cuts no trial at its first two reports, however far below
    the median it is (the first reports rank trials poorly), and cuts it at the third; with
    median_warmup_reports=0 the first report is enough."""
    from pipeline.config.loader import load_config
    from pipeline.tune.study import TuneConfig, _pruner

    base = load_config(scenario="debug", overrides=["data.n_train=16"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def first_cut(pruner) -> int | None:
        """The report (1-based) at which a trial far below two finished ones is cut."""
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for _ in range(2):  # the startup trials, good at every report
            trial = study.ask()
            for k in range(1, 5):
                trial.report(0.8, 16 * k)
            study.tell(trial, 0.8)
        trial = study.ask()
        for k in range(1, 5):
            trial.report(0.1, 16 * k)
            if trial.should_prune():
                return k
        return None

    assert TuneConfig().median_warmup_reports == 2
    assert first_cut(_pruner(TuneConfig(pruner="median"), base)) == 3
    assert first_cut(_pruner(TuneConfig(pruner="median", median_warmup_reports=0), base)) == 1
