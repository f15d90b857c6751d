"""Config loading: every scenario and preset, precedence, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config.loader import (
    PRESETS,
    SCENARIOS,
    configs_dir,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from pipeline.config.schema import Config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _layer_keys(kind: str, name: str) -> dict:
    folder = "scenarios" if kind == "scenario" else "presets"
    return flatten(yaml.safe_load((configs_dir() / folder / f"{name}.yaml").read_text()) or {})


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_and_preset_loads(scenario, preset):
    config = load_config(scenario=scenario, preset=preset)
    assert config.scenario == scenario and config.preset == preset
    resolved = flatten(to_dict(config))
    # The scenario file wins over the preset for every key it sets.
    for key, value in _layer_keys("scenario", scenario).items():
        assert resolved[key] == pytest.approx(value), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_key_changes_something(scenario):
    """A scenario that sets a key to the value it already has documents a change it does not make."""
    base = flatten(to_dict(load_config()))
    for key, value in _layer_keys("scenario", scenario).items():
        assert base[key] != value, f"{scenario}: {key} is already {value} without the scenario"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_key_is_documented_in_readme(scenario):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Scenarios", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| `{scenario}`"))
    for key in _layer_keys("scenario", scenario):
        assert f"`{key}`" in row, f"README scenario table: {scenario} row does not name {key}"


def _leaf_fields(cls, prefix=""):
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type) or (
            isinstance(field.default_factory, type) and dataclasses.is_dataclass(field.default_factory)
        ):
            yield from _leaf_fields(field.default_factory, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field.name


def test_every_config_key_has_a_consumer():
    """Each leaf key is read somewhere in the package: an attribute access ``.name``, or a
    string key ``"name"`` for sections read as a mapping (loss weights by term name)."""
    sources = "\n".join(
        p.read_text() for p in (REPO / "pipeline").rglob("*.py") if p.name != "config.py"
    )
    unread = [
        key
        for key, name in _leaf_fields(Config)
        if not re.search(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']", sources)
    ]
    assert unread == []


def test_precedence_defaults_preset_scenario_file_set(tmp_path):
    default = load_config()
    assert default.trainer.epochs == Config().trainer.epochs
    scenario = load_config(scenario="debug")
    assert scenario.trainer.epochs == 3
    file = tmp_path / "c.yaml"
    file.write_text("trainer:\n  epochs: 5\noptim:\n  lr: 2e-4\n")
    from_file = load_config(scenario="debug", config_file=file)
    assert from_file.trainer.epochs == 5 and from_file.optim.lr == pytest.approx(2e-4)
    from_set = load_config(scenario="debug", config_file=file, overrides=["trainer.epochs=7"])
    assert from_set.trainer.epochs == 7
    assert from_set.data.n_train == 64  # untouched scenario key survives later layers


def test_memory_scenario_turns_on_activation_checkpointing():
    assert load_config(scenario="memory").model.activation_checkpointing is True
    assert load_config(scenario="balanced").model.activation_checkpointing is False


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads "1e-3" as a string; the config means a number.
    assert load_config(overrides=["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_round_trip_through_dict():
    config = load_config(scenario="safety", preset="base_model")
    assert from_dict(to_dict(config)) == config


BAD_INPUTS = [
    (["--set", "optim.lrr=1e-3"], "error: optim.lrr: unknown key (did you mean 'optim.lr'?)"),
    (["--set", "optim.lr=-1"], "error: optim.lr: expected a value > 0, got -1"),
    (["--set", "optim.lr=0"], "error: optim.lr: expected a value > 0, got 0"),
    (["--set", "optim.lr=fast"], "error: optim.lr: expected a number, got 'fast'"),
    (
        ["--set", "trainer.accumulation_steps=0"],
        "error: trainer.accumulation_steps: expected a value >= 1, got 0",
    ),
    (["--set", "trainer.epochs=2.5"], "error: trainer.epochs: expected an integer, got 2.5"),
    (["--set", "trainer.epochs=true"], "error: trainer.epochs: expected an integer, got true"),
    (
        ["--set", "trainer.precision=fp8"],
        "error: trainer.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'",
    ),
    (["--set", "optim.betas=[0.9]"], "error: optim.betas: expected two numbers, got [0.9]"),
    (["--set", "optim.betas=[0.9, 1.5]"], "error: optim.betas: expected a value >= 0 and < 1, got [0.9, 1.5]"),
    (["--set", "trainer=5"], "error: trainer: expected a mapping, got 5"),
    (["--set", "learning_rate=1"], "error: learning_rate: unknown key"),
    (["--set", "traner.epochs=1"], "error: traner: unknown key (did you mean 'trainer'?)"),
    (["--set", "nokey"], "error: --set nokey: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3"),
    (["--set", "a..b=1"], "error: --set a..b=1: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3"),
    (["--scenario", "balnced"], "error: --scenario: expected one of balanced, performance, safety, memory, debug, got 'balnced' (did you mean 'balanced'?)"),
    (["--preset", "huge"], "error: --preset: expected one of small_model, base_model, large_model, got 'huge'"),
    (["--set", "trainer.grad_clip=-1"], "error: trainer.grad_clip: expected a value > 0, got -1"),
    (["--set", "scheduler.name=linear"], "error: scheduler.name: expected one of 'cosine', 'cosine_restarts', 'constant', 'plateau', got 'linear'"),
    (["--set", "tracking.log_every_steps=0"], "error: tracking.log_every_steps: expected a value >= 1, got 0"),
    (["--set", "tracking.register_model=''"], "error: tracking.register_model: expected a model name or null, got ''"),
    (["--set", "scheduler.plateau_factor=1"], "error: scheduler.plateau_factor: expected a value > 0 and < 1, got 1"),
    (["--set", "scheduler.plateau_patience=-1"], "error: scheduler.plateau_patience: expected a value >= 0, got -1"),
    (["--set", "trainer.early_stopping.metric=loss"], "error: trainer.early_stopping.metric: expected a val/* metric, got 'loss'"),
    (["--set", "faults.oom_at_steps=3"], "error: faults.oom_at_steps: expected a list of integers, got 3"),
    (["--set", "seed=-1"], "error: seed: expected a value >= 0, got -1"),
    (
        ["--scenario", "debug", "--set", "trainer.checkpoint_every_epochs=0"],
        "error: trainer.checkpoint_every_epochs: 0 needs trainer.checkpoint_every_steps "
        "(otherwise nothing is saved before the run ends)",
    ),
    (["--epochs", "x"], "error: trainer.epochs: expected an integer, got 'x'"),
]


@pytest.mark.parametrize("args,line", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(args, line, capsys):
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [line]


def test_several_problems_are_reported_together(capsys):
    assert main(["train", "--set", "optim.lr=-1", "--set", "trainer.epochs=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr: expected a value > 0" in err and "trainer.epochs: expected a value >= 1" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "text,expected",
    [
        ("trainer: [1, 2\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping of keys, got list"),
        ("!!python/object/apply:os.system ['echo hacked']\n", "invalid YAML"),
    ],
)
def test_bad_config_files(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config file {path}: ") and expected in err
    assert len(err.splitlines()) == 1


def test_missing_and_binary_config_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file {tmp_path / 'nope.yaml'}: file not found"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert main(["train", "--config", str(binary)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config file {binary}:") and len(err.splitlines()) == 1


def test_unknown_command_line_option_is_one_line(capsys):
    assert main(["train", "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: pipeline train: unrecognized arguments: --bogus"


def test_files_source_needs_a_path(capsys):
    assert main(["train", "--set", "data.source=files"]) == 2
    assert "data.path: required when data.source is 'files'" in capsys.readouterr().err


def test_python_tags_are_refused_in_config_files(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(config_file=path)


@pytest.mark.parametrize("storage", ["bogus://x", "postgresql+nodriver://127.0.0.1/x"])
def test_unusable_tune_storage_is_one_line(storage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(["tune", "--scenario", "debug", "--storage", storage, "--n-trials", "1",
                 "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: --storage: cannot open the study")
