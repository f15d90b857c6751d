"""Load, merge and validate configs.

Precedence (later wins): dataclass defaults < model preset < scenario < ``--config`` file <
``--set key=value`` overrides. Every layer is a nested mapping; layers are merged key by key,
then converted into the typed :class:`~pipeline.config.schema.Config` in one pass that reports
*every* problem at once, each as ``<dotted.key>: <what is expected>, got <value>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.schema import Config
from pipeline.errors import ConfigError

SCENARIOS = ("balanced", "performance", "safety", "memory", "debug")
PRESETS = ("small_model", "base_model", "large_model")
DEFAULT_PRESET = "small_model"


def configs_dir() -> Path:
    """The shipped ``configs/`` directory.

    Installed, it is the package ``pipeline.configs``; run from a source checkout without
    installing (``PYTHONPATH=.``), it is ``configs/`` beside the package.
    """
    try:
        return Path(str(resources.files("pipeline.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


# --------------------------------------------------------------------------------------------
# Reading layers


def read_yaml(path: str | Path, *, what: str = "config file") -> dict:
    """A YAML mapping from ``path`` (``yaml.safe_load``: no Python object tags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def named_layer(kind: str, name: str) -> dict:
    """The override file of a scenario or a preset, by name."""
    names = SCENARIOS if kind == "scenario" else PRESETS
    if name not in names:
        hint = _did_you_mean(name, names)
        raise ConfigError(f"--{kind}: expected one of {', '.join(names)}, got '{name}'{hint}")
    folder = "scenarios" if kind == "scenario" else "presets"
    return read_yaml(configs_dir() / folder / f"{name}.yaml", what=kind)


def parse_set(item: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
    return nested(key, value)


def nested(key: str, value: Any) -> dict:
    """``("a.b.c", v)`` -> ``{"a": {"b": {"c": v}}}``."""
    layer: dict = {}
    node = layer
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return layer


def merge(base: dict, override: dict) -> dict:
    """Deep merge of two mappings; ``override`` wins, mappings are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Building the typed config


def load_config(
    *,
    scenario: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    extra: dict | None = None,
) -> Config:
    """Resolve a config from its layers. Raises :class:`ConfigError` listing every problem.

    ``extra`` is a mapping merged after ``overrides`` (used by the tuner for suggested values).
    """
    preset = preset or DEFAULT_PRESET
    layers = [named_layer("preset", preset)]
    if scenario:
        layers.append(named_layer("scenario", scenario))
    if config_file:
        layers.append(read_yaml(config_file))
    layers.extend(parse_set(item) for item in overrides)
    if extra:
        layers.append(extra)
    merged: dict = {}
    for layer in layers:
        merged = merge(merged, layer)
    merged["scenario"] = scenario
    merged["preset"] = preset
    return from_dict(merged)


def from_dict(data: dict) -> Config:
    """A validated :class:`Config` from a nested mapping (missing keys take their defaults)."""
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    if not errors:
        errors.extend(_cross_checks(config))
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def parse_section(cls: type, data: Any, prefix: str = "") -> Any:
    """Any config dataclass (not only :class:`Config`) from a mapping, validated the same way."""
    errors: list[str] = []
    section = _build(cls, data, prefix, errors)
    if not errors and callable(getattr(section, "validate", None)):
        errors.extend(section.validate())
    if errors:
        raise ConfigError("; ".join(errors))
    return section


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key{_did_you_mean(key, fields, prefix)}")
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            continue
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], key + ".", errors)
            continue
        if typing.get_origin(hint) is dict:  # a mapping of name -> config dataclass
            value_type = typing.get_args(hint)[1]
            if not isinstance(data[name], dict):
                errors.append(f"{key}: expected a mapping, got {_show(data[name])}")
                continue
            kwargs[name] = {
                k: _build(value_type, v, f"{key}.{k}.", errors) for k, v in data[name].items()
            }
            continue
        value, problem = _coerce(data[name], hint)
        if problem is None:
            problem = _check_bounds(value, field.metadata)
        if problem is not None:
            errors.append(f"{key}: expected {problem}, got {_show(data[name])}")
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """``(converted value, None)`` or ``(None, description of what was expected)``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            converted, problem = _coerce(value, a)
            if problem is None:
                return converted, None
        expected = " or ".join(_describe(a) for a in inner)
        return None, expected + (" or null" if type(None) in args else "")
    if origin is Literal:
        if value in args:
            return value, None
        return None, "one of " + ", ".join(repr(a) for a in args)
    if hint is Any:
        return value, None
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            return None, "a mapping"
        mapping = {}
        for k, v in value.items():
            converted_key, problem = _coerce(k, key_type)
            converted, problem2 = _coerce(v, value_type)
            if problem or problem2:
                return None, f"a mapping of {_describe(key_type)} to {_describe(value_type)}"
            mapping[converted_key] = converted
        return mapping, None
    if origin is list:
        (item_type,) = args
        if not isinstance(value, list):
            return None, f"a list of {_plural(item_type)}"
        items = []
        for item in value:
            converted, problem = _coerce(item, item_type)
            if problem is not None:
                return None, f"a list of {_plural(item_type)}"
            items.append(converted)
        return items, None
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, "an integer"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; accept it as the number it means.
            try:
                number = float(value)
            except ValueError:
                return None, "a number"
        else:
            return None, "a number"
        if not math.isfinite(number):
            return None, "a finite number"
        return number, None
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, "a string")
    raise TypeError(f"unsupported config type {hint!r}")


def _check_bounds(value: Any, metadata: typing.Mapping) -> str | None:
    values = value if isinstance(value, list) else [value]
    bounds = [
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    ]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for key, symbol, ok in bounds:
            bound = metadata.get(key)
            if bound is not None and not ok(v, bound):
                parts = [f"{s} {metadata[k]}" for k, s, _ in bounds if metadata.get(k) is not None]
                return "a value " + " and ".join(parts)
    return None


def _cross_checks(config: Config) -> list[str]:
    """Contradictions between keys: each section's own ``validate()``, then global ones."""
    errors: list[str] = []
    for field in dataclasses.fields(config):
        section = getattr(config, field.name)
        check = getattr(section, "validate", None)
        if dataclasses.is_dataclass(section) and callable(check):
            errors.extend(check())
    return errors


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_plural(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Any: "any value"}
    return names.get(hint, str(hint))


def _plural(hint: Any) -> str:
    names = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    return names.get(hint, "values of " + _describe(hint))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(key: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


# --------------------------------------------------------------------------------------------
# Views of a resolved config


def to_dict(config: Config) -> dict:
    """The config as a nested plain mapping (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_hash(config: Config) -> str:
    """Hash of what a checkpoint's weights depend on: the model section.

    A checkpoint resumes only into a config with the same hash; optimizer, schedule, data and
    tracking keys may change between runs (a changed LR keeps the optimizer state).
    """
    text = json.dumps(to_dict(config)["model"], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SECRET_KEY = re.compile(r"password|passwd|token|secret|api_?key", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]*(?=@)")
REDACTED = "***"


def redact(data: Any) -> Any:
    """A copy of ``data`` fit to log: the value of any key that names a secret (password,
    token, secret, api_key; any case) becomes ``***``, and so does the password of any URL
    (``scheme://user:PASSWORD@host``) in a string value, at any depth."""
    if isinstance(data, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v is not None
            else redact(v)
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return type(data)(redact(v) for v in data)
    if isinstance(data, str):
        return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, data)
    return data
