"""Config sections of the data layer: ``data`` (what to train on) and ``loader`` (how to feed it).

Both are plain dataclasses of :func:`pipeline.config.fields.spec` fields; the config loader
checks types, bounds and choices from them and then calls :meth:`validate` for the rules that
involve more than one field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config.fields import spec


@dataclass
class DataConfig:
    """The ``data`` section: the source of structures, their lengths, crops and the split."""

    source: Literal["synthetic", "files"] = spec(
        "synthetic", help="'synthetic' (generated RNA-like structures) or 'files' (PDB/mmCIF)"
    )
    path: str | None = spec(
        None,
        help="directory (searched recursively) or text file listing PDB/mmCIF paths; "
        "required for source 'files'",
    )
    n_train: int = spec(512, ge=1, help="synthetic training structures")
    n_val: int = spec(32, ge=1, help="synthetic validation structures")
    min_length: int = spec(24, ge=11, help="shortest synthetic structure (nucleotides)")
    max_length: int = spec(64, ge=11, help="longest synthetic structure (nucleotides)")
    crop_length: int = spec(
        64, ge=8, help="training crop (nucleotides); longer structures are cropped, not dropped"
    )
    crop_mode: Literal["contiguous", "spatial"] = spec(
        "contiguous", help="'contiguous' window or 'spatial' (nearest residues to a random centre)"
    )
    min_chain_length: int = spec(
        8, ge=1, help="chains with fewer resolved nucleotides are skipped (and counted)"
    )
    val_fraction: float = spec(
        0.1, ge=0.0, lt=1.0, help="fraction of structures held out for validation (source 'files')"
    )
    split: Literal["random", "cluster"] = spec(
        "cluster",
        help="'cluster': whole sequence-identity clusters go to one side (no validation leak)",
    )
    cluster_identity: float = spec(
        0.8, gt=0.0, le=1.0, help="sequence identity at which two structures share a cluster"
    )
    cache_dir: str | None = spec(
        None, help="on-disk feature cache directory; None: the caller's (<output_dir>/cache)"
    )

    def validate(self) -> list[str]:
        """Problems that involve several fields, one message per problem (empty when fine)."""
        problems = []
        if self.source == "files" and not self.path:
            problems.append("data.path: required when data.source is 'files'")
        if self.min_length > self.max_length:
            problems.append(
                "data.min_length: must be at most data.max_length, but got "
                f"{self.min_length} > {self.max_length}"
            )
        return problems


@dataclass
class LoaderConfig:
    """The ``loader`` section: worker processes, caching and prefetching to the device."""

    num_workers: int = spec(
        0, ge=0, help="DataLoader worker processes (0: load in the training process)"
    )
    prefetch_factor: int = spec(
        2,
        ge=1,
        help="batches prefetched per worker (when workers > 0) and depth of the device "
        "prefetch queue",
    )
    start_method: Literal["forkserver", "spawn", "fork"] = spec(
        "forkserver",
        help="how worker processes start. 'fork' copies the training process with its "
        "threads' locks (the tracker's, the metrics sampler's) and can hang a worker for ever; "
        "'forkserver' (Linux) and 'spawn' start workers from a clean process and pickle the "
        "dataset to each, once per run",
    )
    pin_memory: bool = spec(
        True, help="page-locked host batches for asynchronous copies (CUDA only)"
    )
    cache: Literal["none", "memory", "disk"] = spec(
        "memory", help="keep parsed structures: 'none', 'memory' (LRU per process), 'disk'"
    )
    device_prefetch: bool = spec(
        True, help="copy the next batches to the device on a side stream during compute"
    )
    length_bucketing: bool = spec(
        True, help="batch structures of similar length together (less padding)"
    )

    def validate(self) -> list[str]:
        """Problems that involve several fields (none so far; the loader calls every section)."""
        return []
