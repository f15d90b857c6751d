"""The data and loader config sections: defaults, field specs, cross-field validation."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from pipeline.data import DataConfig, LoaderConfig


@pytest.mark.parametrize("cls", [DataConfig, LoaderConfig])
def test_every_field_has_help_and_numbers_have_bounds(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f.metadata["help"], f"{cls.__name__}.{f.name} has no help text"
        if hints[f.name] in (int, float):
            bounds = [f.metadata[k] for k in ("ge", "gt", "le", "lt")]
            assert any(b is not None for b in bounds), f"{cls.__name__}.{f.name} has no bounds"


def test_defaults():
    data = DataConfig()
    assert (data.source, data.path, data.n_train, data.n_val) == ("synthetic", None, 512, 32)
    assert (data.min_length, data.max_length, data.crop_length) == (24, 64, 64)
    assert (data.crop_mode, data.min_chain_length, data.val_fraction) == ("contiguous", 8, 0.1)
    assert (data.split, data.cluster_identity, data.cache_dir) == ("cluster", 0.8, None)
    loader = LoaderConfig()
    assert (loader.num_workers, loader.prefetch_factor, loader.pin_memory) == (0, 2, True)
    assert (loader.cache, loader.device_prefetch, loader.length_bucketing) == ("memory", True, True)
    assert data.validate() == [] and loader.validate() == []


def test_cross_field_problems_are_listed_one_per_message():
    problems = DataConfig(source="files", min_length=80, max_length=40).validate()
    assert problems == [
        "data.path: required when data.source is 'files'",
        "data.min_length: must be at most data.max_length, but got 80 > 40",
    ]
    assert DataConfig(source="files", path="structures/").validate() == []


def test_literal_choices_are_declared_in_the_type_hints():
    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(hints["crop_mode"]) == ("contiguous", "spatial")
    assert typing.get_args(hints["split"]) == ("random", "cluster")
    cache = typing.get_type_hints(LoaderConfig)["cache"]
    assert typing.get_args(cache) == ("none", "memory", "disk")
