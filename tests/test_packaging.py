"""Packaging: a non-editable install carries the configs; MLproject and conda.yaml agree."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "pipeline").rglob("__init__.py")
    }
    assert found | {"pipeline.configs"} == listed


@pytest.mark.slow
def test_plain_install_ships_scenarios_and_presets(tmp_path):
    """`pip install .` (not editable) puts configs/ into the package as pipeline.configs."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    assert (target / "pipeline" / "configs" / "scenarios" / "debug.yaml").is_file()
    code = (
        "import pipeline, pipeline.config.loader as l; "
        "c = l.load_config(scenario='debug', preset='base_model'); "
        "print(pipeline.__file__, l.configs_dir(), c.trainer.epochs, c.model.d_single)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
         f"[p for p in {sys.path!r} if 'site-packages' in p]; {code}"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert out[2:] == ["3", "256"]


def test_conda_env_installs_this_project():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_items = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_items == ["-e ."]  # the project itself, so pyproject's dependencies apply
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python"))
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=3.11" and python == "python=3.11"


def test_mlproject_entry_points_call_the_cli():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    points = project["entry_points"]
    assert set(points) == {"train", "evaluate", "tune"}
    for name, point in points.items():
        assert point["command"].startswith(f"python -m pipeline {name} ")
        for param in point["parameters"]:
            assert "{" + param + "}" in point["command"], (name, param)
    assert {"scenario", "preset", "config", "epochs", "overrides"} <= set(points["train"]["parameters"])
    assert {"run_id", "checkpoint"} <= set(points["evaluate"]["parameters"])
    assert {"n_trials", "timeout", "storage", "study_name", "scenario"} <= set(
        points["tune"]["parameters"]
    )


def test_python_env_matches_conda_env_and_installs_this_project():
    """python_env.yaml (MLflow's virtualenv/uv format) states conda.yaml's environment."""
    from mlflow.utils.environment import _PythonEnv

    env = _PythonEnv.from_yaml(REPO / "python_env.yaml")  # what MLflow reads
    assert env.dependencies == ["-e ."]  # the project itself, so pyproject's dependencies apply
    assert "pip" in env.build_dependencies
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == f">={env.python}"  # the oldest supported Python, as in conda.yaml
    # The virtualenv MLflow derives from conda.yaml (what `mlflow run --env-manager virtualenv`
    # builds while MLproject names conda.yaml) has the same python and dependencies.
    from_conda = _PythonEnv.from_conda_yaml(REPO / "conda.yaml")
    assert (from_conda.python, from_conda.dependencies) == (env.python, env.dependencies)
