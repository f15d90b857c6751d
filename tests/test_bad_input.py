"""A corpus of bad inputs through the real command line (in-process): every one is exit code 2,
exactly one line ``error: ...`` on stderr naming the offending key, file or flag, and no MLflow
run left RUNNING."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.config.loader import load_config, redact
from pipeline.train import runtime

#: Cases as (id, argv with ``{d}`` for the case's directory, a substring the line must hold).
#: ``{ref}`` is a real RNA structure (the RNA-Puzzles 1 native).
TRAIN = ["train", "--scenario", "debug", "--set", "output_dir={d}/out"]
FILES = [*TRAIN, "--set", "data.source=files", "--set"]
EVAL = ["evaluate", "--reference", "{ref}", "--predictions"]

CASES = [
    # config files
    ("yaml-malformed", ["train", "--config", "{d}/malformed.yaml"], "malformed.yaml: invalid YAML"),
    ("yaml-tab-indent", ["train", "--config", "{d}/tabs.yaml"], "tabs.yaml: invalid YAML"),
    ("yaml-list", ["train", "--config", "{d}/list.yaml"], "list.yaml: expected a mapping"),
    ("yaml-python-tag", ["train", "--config", "{d}/tag.yaml"], "tag.yaml: invalid YAML"),
    ("yaml-binary", ["train", "--config", "{d}/binary.bin"], "binary.bin"),
    ("yaml-unknown-key", ["train", "--config", "{d}/unknown.yaml"], "trainer.epochz: unknown key"),
    ("yaml-wrong-type", ["train", "--config", "{d}/wrongtype.yaml"], "optim.lr: expected a number"),
    ("yaml-out-of-range", ["train", "--config", "{d}/range.yaml"], "trainer.epochs: expected a value >= 1"),
    ("yaml-section-scalar", ["train", "--config", "{d}/scalar_section.yaml"], "model: expected a mapping"),
    ("config-missing", ["train", "--config", "{d}/nope.yaml"], "nope.yaml: file not found"),
    ("config-is-dir", ["train", "--config", "{d}"], "file not found"),
    # --set and --overrides
    ("set-no-equals", ["train", "--set", "foo"], "--set foo"),
    ("set-empty-key", ["train", "--set", "=1"], "--set =1"),
    ("set-empty-part", ["train", "--set", "a..b=1"], "--set a..b=1"),
    ("set-bad-yaml-value", ["train", "--set", "optim.lr=[1"], "--set optim.lr"),
    ("set-unknown-section", ["train", "--set", "optimiser.lr=1"], "optimiser: unknown key"),
    ("set-wrong-type-bool", ["train", "--set", "trainer.deterministic=maybe"], "trainer.deterministic"),
    ("set-wrong-type-list", ["train", "--set", "faults.nan_loss_at_steps=[a]"], "faults.nan_loss_at_steps"),
    ("set-negative-width", ["train", "--set", "model.d_single=-4"], "model.d_single"),
    ("set-nan-number", ["train", "--set", "optim.lr=.nan"], "optim.lr: expected a finite number"),
    ("set-conflict-lengths", ["train", "--set", "data.min_length=60", "--set", "data.max_length=20"],
     "data.min_length"),
    ("set-fp16-on-cpu", [*TRAIN, "--set", "trainer.device=cpu", "--set", "trainer.precision=fp16"],
     "trainer.precision"),
    ("set-cuda-without-gpu", [*TRAIN, "--set", "trainer.device=cuda"], "trainer.device"),
    ("overrides-unbalanced-quote", ["train", "--overrides", "optim.lr='1e-3"], "--overrides"),
    ("overrides-bad-item", ["train", "--overrides", "optim.lr=1e-3 nokey"], "--set nokey"),
    # CLI numbers and options
    ("epochs-negative", ["train", "--epochs", "-1"], "trainer.epochs"),
    ("epochs-zero", ["train", "--epochs", "0"], "trainer.epochs"),
    ("n-trials-zero", ["tune", "--n-trials", "0"], "--n-trials"),
    ("n-trials-text", ["tune", "--n-trials", "many"], "--n-trials"),
    ("n-workers-zero", ["tune", "--n-workers", "0"], "--n-workers"),
    ("timeout-negative", ["tune", "--timeout", "-5"], "--timeout"),
    ("tune-config-missing", ["tune", "--tune-config", "{d}/nope-tune.yaml", "--set",
                             "output_dir={d}/out"], "nope-tune.yaml"),
    ("unknown-flag", ["train", "--bogus"], "--bogus"),
    ("unknown-scenario", ["train", "--scenario", "fastest"], "--scenario"),
    ("evaluate-atoms", ["evaluate", "--atoms", "CA", "--checkpoint", "x.pt"], "--atoms"),
    ("evaluate-n-samples-zero", ["evaluate", "--checkpoint", "{d}/nope.pt", "--n-samples", "0"],
     "--n-samples"),
    ("evaluate-two-sources", ["evaluate", "--checkpoint", "a.pt", "--run-id", "abc"], "--run-id"),
    ("evaluate-no-reference", ["evaluate", "--predictions", "{ref}"], "--reference"),
    # missing files and runs
    ("checkpoint-missing", ["evaluate", "--checkpoint", "{d}/nope.pt"], "nope.pt"),
    ("resume-missing", [*TRAIN, "--resume", "{d}/gone.pt"], "gone.pt"),
    ("train-run-id-unknown", [*TRAIN, "--run-id", "0" * 32], "--run-id " + "0" * 32),
    ("evaluate-run-id-unknown", ["evaluate", "--run-id", "f" * 32], "--run-id " + "f" * 32),
    ("predictions-missing", [*EVAL, "{d}/nope.pdb"], "nope.pdb"),
    ("reference-missing", ["evaluate", "--predictions", "{ref}", "--reference", "{d}/nope.pdb"],
     "nope.pdb"),
    ("data-path-missing", [*FILES, "data.path={d}/no-such-dir"], "no-such-dir"),
    ("output-dir-under-a-file", [*TRAIN, "--set", "output_dir={d}/afile/out"], "output_dir: "),
    ("data-source-files-no-path", [*TRAIN, "--set", "data.source=files"], "data.path"),
    # unusable structure files: evaluation
    ("eval-empty", [*EVAL, "{d}/structs/empty.pdb"], "empty.pdb"),
    ("eval-truncated", [*EVAL, "{d}/structs/truncated.pdb"], "truncated.pdb"),
    ("eval-binary", [*EVAL, "{d}/structs/binary.pdb"], "binary.pdb"),
    ("eval-protein", [*EVAL, "{d}/structs/protein.pdb"], "protein.pdb"),
    ("eval-reference-protein", ["evaluate", "--predictions", "{ref}", "--reference",
                                "{d}/structs/protein.pdb"], "protein.pdb"),
    ("eval-dir-all-bad", [*EVAL, "{d}/structs"], "structs"),
    ("eval-dir-no-structures", [*EVAL, "{d}/nostructs"], "nostructs"),
    # unusable structure files: data check and training on files
    ("data-check-missing", ["data", "--check", "{d}/no-such-dir"], "no-such-dir"),
    ("data-check-all-bad", ["data", "--check", "{d}/structs"], "structs"),
    ("data-check-empty-file", ["data", "--check", "{d}/structs/empty.pdb"], "empty.pdb"),
    ("data-check-protein", ["data", "--check", "{d}/structs/protein.pdb"], "protein.pdb"),
    ("train-files-all-bad", [*FILES, "data.path={d}/structs"], "structs"),
    ("train-files-protein-list", [*FILES, "data.path={d}/protein.list"], "protein.list"),
    ("train-files-empty-dir", [*FILES, "data.path={d}/nostructs"], "nostructs"),
]

PROTEIN_PDB = "".join(
    f"ATOM  {i * 4 + j + 1:5d}  {name:<3s} ALA A{i + 1:4d}    "
    f"{x + 3.8 * i:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           {name[0]}\n"
    for i in range(12)
    for j, (name, x, y, z) in enumerate(
        [("N", 0.0, 1.0, 0.0), ("CA", 1.0, 1.5, 0.0), ("C", 2.0, 1.0, 0.5), ("O", 2.5, 0.5, 1.0)]
    )
) + "END\n"


def _write_inputs(d: Path, ref: Path) -> None:
    (d / "malformed.yaml").write_text("trainer: [1, 2\n")
    (d / "tabs.yaml").write_text("trainer:\n\tepochs: 2\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "tag.yaml").write_text("seed: !!python/object/apply:os.getpid []\n")
    (d / "binary.bin").write_bytes(b"\xff\xfe\x00\x81\x00garbage\x9c")
    (d / "unknown.yaml").write_text("trainer:\n  epochz: 2\n")
    (d / "wrongtype.yaml").write_text("optim:\n  lr: fast\n")
    (d / "range.yaml").write_text("trainer:\n  epochs: 0\n")
    (d / "scalar_section.yaml").write_text("model: 5\n")
    structs = d / "structs"
    structs.mkdir()
    (structs / "empty.pdb").write_text("")
    (structs / "truncated.pdb").write_text(ref.read_text()[:100])  # cut inside the first lines
    (structs / "binary.pdb").write_bytes(bytes(range(256)) * 8)
    (structs / "protein.pdb").write_text(PROTEIN_PDB)
    (d / "nostructs").mkdir()
    (d / "nostructs" / "notes.txt").write_text("no structures here\n")
    (d / "protein.list").write_text(f"{structs / 'protein.pdb'}\n")
    (d / "afile").write_text("a regular file, not a directory\n")


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _running_runs(tmp_path: Path) -> list[str]:
    if not (tmp_path / "mlflow.db").exists():
        return []
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000) if experiments else []
    return [r.info.run_id for r in runs if r.info.status == "RUNNING"]


@pytest.mark.parametrize("args,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_no_running_run(
    args, needle, tmp_path, rna_puzzles, capsys
):
    ref = rna_puzzles / "predictions" / "rp01" / "1_solution_0_rpr.pdb"
    shutil.copy(ref, tmp_path / "ref.pdb")
    _write_inputs(tmp_path, ref)
    argv = [a.format(d=tmp_path, ref=tmp_path / "ref.pdb") for a in args]
    needle = needle.format(d=tmp_path)

    code = main(argv)

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert _running_runs(tmp_path) == []


def test_unwritable_output_dir_is_one_line_before_training(tmp_path, capsys):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "out"
    else:  # root writes through permission bits: a path under a regular file fails for everyone
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "out"
    try:
        code = main([*TRAIN[:-1], f"output_dir={out}"])
    finally:
        if out.parent.is_dir():
            out.parent.chmod(0o700)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: output_dir: cannot write to {out}")
    assert not (tmp_path / "mlflow.db").exists() or _running_runs(tmp_path) == []
    assert not out.exists()


TINY = ["data.n_train=4", "data.n_val=2", "data.max_length=24", "trainer.micro_batch_size=4",
        "trainer.epochs=1", "trainer.val_max_structures=2", "trainer.val_sampler_steps=2",
        "tracking.system_metrics=false", "tracking.log_checkpoints=false"]


def test_run_name_cannot_place_files_outside_the_runs_directory(tmp_path, capsys):
    name = "../../../escaped/../../x/run"
    sets = [*TINY, f"output_dir={tmp_path}/runs-root/out", f"tracking.run_name={name}"]
    assert main(["train", "--scenario", "debug", *[a for s in sets for a in ("--set", s)]]) == 0
    outside = [p for p in tmp_path.rglob("*") if p.name in ("escaped", "x", "run")]
    assert outside == []
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path.parent / "x").exists()
    runs = list((tmp_path / "runs-root" / "out" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "runs-root" / "out").iterdir()) == ["cache", "runs"]
    (run,) = mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()])
    assert run.info.run_name == name  # kept as a label; it names no path


def test_redaction_of_secret_keys_and_url_passwords():
    data = {
        "storage": {"url": "postgresql://optuna:s3cr3t@db.example:5432/studies",
                    "API_KEY": "k-123", "Password": "pw", "auth_token": "t", "token": None},
        "tracking": {"uri": "https://user@host/path", "plain": "http://host/a:b@c"},
        "lists": ["mysql://u:p@h/d", 3],
        "n_secrets": 2,
    }
    safe = redact(data)
    assert safe["storage"] == {"url": "postgresql://optuna:***@db.example:5432/studies",
                               "API_KEY": "***", "Password": "***", "auth_token": "***",
                               "token": None}
    assert safe["tracking"] == data["tracking"]  # no password in these URLs
    assert safe["lists"] == ["mysql://u:***@h/d", 3]
    assert safe["n_secrets"] == "***"  # the key names a secret, so its value is hidden too
    assert data["storage"]["API_KEY"] == "k-123"  # the input is not changed


class _Recorder:
    def __init__(self):
        self.params, self.texts = {}, {}

    def log_params(self, params):
        self.params.update(params)

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def log_metrics(self, metrics, step):
        pass


def test_logged_params_and_resolved_config_are_redacted(tmp_path, monkeypatch):
    cfg = load_config(scenario="debug", overrides=[
        "tracking.experiment=https://alice:hunter2@tracking.example/exp"])
    real_to_dict = runtime.to_dict
    monkeypatch.setattr(runtime, "to_dict", lambda c: {**real_to_dict(c),
                                                       "storage": {"api_key": "abc123"}})
    tracker = _Recorder()
    runtime.log_run_inputs(tracker, cfg, tmp_path, {})
    assert tracker.params["tracking.experiment"] == "https://alice:***@tracking.example/exp"
    assert tracker.params["storage.api_key"] == "***"
    logged = tracker.texts["config/resolved.yaml"]
    assert "hunter2" not in logged and "abc123" not in logged and "alice:***@" in logged
    assert "hunter2" not in "".join(map(str, tracker.params.values()))
