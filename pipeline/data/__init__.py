"""Data layer: synthetic and real RNA structures, datasets, batching and device prefetch.

The data contract (samples and batch keys) is in :mod:`pipeline.data.features`.
"""

from __future__ import annotations

from pipeline.data.config import DataConfig, LoaderConfig
from pipeline.data.datasets import DatasetSplits, build_datasets
from pipeline.data.features import ATOM_NAMES, RNASample
from pipeline.data.loader import (
    DevicePrefetcher,
    EpochStream,
    LengthBucketBatchSampler,
    TrainLoader,
    build_train_loader,
    build_val_batches,
    collate,
)
from pipeline.data.synthetic import generate_synthetic, synthetic_structure

__all__ = [
    "ATOM_NAMES",
    "DataConfig",
    "DatasetSplits",
    "DevicePrefetcher",
    "EpochStream",
    "LengthBucketBatchSampler",
    "LoaderConfig",
    "RNASample",
    "TrainLoader",
    "build_datasets",
    "build_train_loader",
    "build_val_batches",
    "collate",
    "generate_synthetic",
    "synthetic_structure",
]
