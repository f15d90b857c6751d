"""Every model preset loads into a consistent ModelConfig and states its measured size."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.model import LossConfig, ModelConfig, build_model, count_parameters

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
PRESETS = ("small_model", "base_model", "large_model")
#: Keys outside ``model`` that a model preset may set (they size the batch for the model).
ALLOWED_OTHER_KEYS = {"data": {"crop_length"}, "trainer": {"micro_batch_size"}}


def load_preset(name: str) -> tuple[str, dict]:
    text = (PRESETS_DIR / f"{name}.yaml").read_text()
    return text, yaml.safe_load(text)


def model_config(section: dict) -> ModelConfig:
    """The preset's model section as a ModelConfig; an unknown key raises TypeError."""
    section = dict(section)
    loss = LossConfig(**section.pop("loss", {}))
    return ModelConfig(**section, loss=loss)


def n_parameters(cfg: ModelConfig) -> int:
    # On the meta device nothing is allocated; compile only wraps calls (same parameters) and
    # would import the compiler stack for nothing.
    with torch.device("meta"):
        return count_parameters(build_model(dataclasses.replace(cfg, compile=False)))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_a_consistent_model_config(name):
    _, data = load_preset(name)
    cfg = model_config(data["model"])
    assert cfg.validate() == []
    hints = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    for key, value in data["model"].items():
        expected = {"int": int, "float": (int, float), "bool": bool}.get(hints[key])
        if expected is not None:
            assert isinstance(value, expected), f"model.{key}: {value!r} is not {hints[key]}"
    for section, keys in data.items():
        if section == "model":
            continue
        assert section in ALLOWED_OTHER_KEYS, f"{name}: unexpected section {section!r}"
        assert set(keys) <= ALLOWED_OTHER_KEYS[section], f"{name}: {section}.{set(keys)}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_header_states_the_measured_parameter_count(name):
    text, data = load_preset(name)
    match = re.match(rf"# {name}: ([\d,]+) parameters", text)
    assert match, f"{name}.yaml must start with '# {name}: N parameters'"
    assert int(match.group(1).replace(",", "")) == n_parameters(model_config(data["model"]))


def test_presets_grow_in_size():
    sizes = []
    for name in PRESETS:
        _, data = load_preset(name)
        sizes.append(n_parameters(model_config(data["model"])))
    small, base, large = sizes
    assert small < 2_000_000 and 10_000_000 <= base <= 30_000_000 and large >= 100_000_000
