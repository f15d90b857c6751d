"""docs/configuration.md: what the generator writes, every key with its default, and every key
a scenario or preset sets shown with the value it sets."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config.loader import PRESETS, SCENARIOS, configs_dir, flatten
from pipeline.config.reference import main
from pipeline.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"
REGENERATE = "python -m pipeline.config.reference > docs/configuration.md"


def _defaults(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default, read from a default-constructed config (not from the generator)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_defaults(value, f"{prefix}{field.name}."))
        else:
            out[prefix + field.name] = value
    return out


def _rows() -> dict[str, dict[str, str]]:
    """Every table row of the document: key -> {column header: cell text}."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] == "key":
            header = cells
        elif match := re.fullmatch(r"`([\w.]+)`", cells[0]):
            assert match[1] not in rows, f"{match[1]} appears in two rows"
            rows[match[1]] = dict(zip(header, cells))
    return rows


def _set_by(cell: str) -> dict[str, Any]:
    """``"`safety: 0.5`, `debug: 2`"`` -> ``{"safety": 0.5, "debug": 2}``."""
    return {name: yaml.safe_load(value) for name, value in re.findall(r"`(\w+): ([^`]*)`", cell)}


def test_document_is_what_the_generator_writes(capsys):
    assert main() == 0
    expected = capsys.readouterr().out
    actual = DOC.read_text()
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "docs/configuration.md", "generated",
            lineterm="",
        )
        pytest.fail(
            f"docs/configuration.md is out of date; regenerate it with `{REGENERATE}`.\n"
            + "\n".join(list(diff)[:40])
        )


def test_every_key_is_documented_with_its_default():
    defaults = _defaults(Config())
    rows = _rows()
    assert sorted(set(defaults) - set(rows)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(rows) - set(defaults)) == [], "docs/configuration.md lists unknown keys"
    for key, default in defaults.items():
        cell = rows[key]["default"]
        assert re.fullmatch(r"`[^`]*`", cell), (key, cell)
        assert yaml.safe_load(cell.strip("`")) == default, (key, cell, default)


@pytest.mark.parametrize(
    ("kind", "name"), [("scenarios", s) for s in SCENARIOS] + [("presets", p) for p in PRESETS]
)
def test_every_key_a_layer_sets_is_real_and_shown_with_its_value(kind, name):
    layer = flatten(yaml.safe_load((configs_dir() / kind / f"{name}.yaml").read_text()) or {})
    assert layer, f"configs/{kind}/{name}.yaml sets nothing"
    defaults = _defaults(Config())
    rows = _rows()
    for key, value in layer.items():
        assert key in defaults, f"configs/{kind}/{name}.yaml: {key} is not a config key"
        shown = _set_by(rows[key]["set by scenario / preset"])
        assert name in shown and shown[name] == value, (key, name, value, shown)
    # ... and no row claims that this layer sets a key it does not.
    claimed = {key for key, row in rows.items() if name in _set_by(row["set by scenario / preset"])}
    assert claimed == set(layer), (name, sorted(claimed ^ set(layer)))
