"""Training and validation datasets from synthetic structures or PDB/mmCIF files.

:func:`build_datasets` is the factory: it reads the ``data`` config section and returns the
train and validation datasets (``torch.utils.data.Dataset`` of :class:`RNASample`) and a
``stats`` dict that says what was found, used and skipped and why.

Crops are a pure function of ``(seed, epoch, index)`` for training and of ``(seed, index)``
for validation (the same window every time), whichever process or worker computes them: the
batch sampler hands the epoch to the dataset together with each index, so persistent loader
workers, which hold copies of the dataset, crop for the right epoch too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from pipeline.data.cache import DiskCache, LRUCache, content_hash, feature_key
from pipeline.data.config import DataConfig
from pipeline.data.crop import crop_sample, select_residues
from pipeline.data.features import RNASample
from pipeline.data.synthetic import GENERATOR_VERSION, generate_synthetic
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Suffixes of structure files found in a data directory (each optionally followed by .gz).
STRUCTURE_SUFFIXES = (".pdb", ".cif", ".mmcif", ".ent")
#: Parsed structures kept per process by the "memory" cache.
MEMORY_CACHE_ITEMS = 4096
# Independent random streams for crops and the split (numpy seeds from integer sequences).
_TRAIN_CROP_STREAM = 1
_VAL_CROP_STREAM = 2
_SPLIT_STREAM = 3
CacheMode = Literal["none", "memory", "disk"]


# --------------------------------------------------------------------------- file discovery


def _strip_suffixes(name: str) -> tuple[str, str]:
    """(stem, structure suffix) of a file name, ignoring a trailing .gz; suffix "" if none."""
    base = name[:-3] if name.lower().endswith(".gz") else name
    for suffix in STRUCTURE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)], suffix
    return base, ""


def is_structure_file(path: Path) -> bool:
    """Whether ``path`` has a structure suffix (``.pdb .cif .mmcif .ent``, optionally ``.gz``)."""
    return path.is_file() and _strip_suffixes(path.name)[1] != ""


def discover_files(path: str | Path) -> tuple[list[Path], list[str]]:
    """Structure files under ``path`` and their sample names.

    ``path`` is a directory (searched recursively, sorted, hidden entries skipped) or a text
    file with one structure path per line (blank lines and ``#`` comments ignored; relative
    paths are relative to the list file). Names are the paths relative to the directory (or
    the file names for a list) without suffixes, made unique.

    Raises
    ------
    DataError
        ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path: {root} does not exist")
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if is_structure_file(p)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        names = [str(_strip_suffixes(str(p.relative_to(root)))[0]) for p in files]
    else:
        files = []
        for line in root.read_text().splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            candidate = Path(entry)
            files.append(candidate if candidate.is_absolute() else root.parent / candidate)
        names = [_strip_suffixes(p.name)[0] for p in files]
    seen: Counter = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return files, unique


# --------------------------------------------------------------------------- parsing


def keep_long_chains(sample: RNASample, min_chain_length: int) -> tuple[RNASample | None, int]:
    """Drop chains with fewer than ``min_chain_length`` residues; renumber the others 0, 1, ...

    Returns the sample (None if no chain is left) and the number of chains dropped.
    """
    chains, counts = np.unique(sample.chain_index, return_counts=True)
    long_chains = chains[counts >= min_chain_length]
    n_dropped = int(len(chains) - len(long_chains))
    if len(long_chains) == 0:
        return None, n_dropped
    if n_dropped == 0:
        return sample, 0
    kept = select_residues(sample, np.nonzero(np.isin(sample.chain_index, long_chains))[0])
    kept.chain_index = np.searchsorted(long_chains, kept.chain_index).astype(np.int64)
    return kept, n_dropped


def load_structure_file(path: Path, *, name: str, min_chain_length: int) -> tuple[RNASample, dict]:
    """Parse one structure file into a sample (RNA chains of >= ``min_chain_length`` residues).

    Returns the sample and an ``info`` dict (chains skipped by kind, modified residues mapped
    and skipped, altlocs resolved).

    Raises
    ------
    StructureFileError
        The file cannot be used; ``reason`` says why.
    """
    from pipeline.io.structures import StructureFileError, read_structure, table_to_sample

    table, report = read_structure(path)
    sample, n_short = keep_long_chains(table_to_sample(table, name), min_chain_length)
    skipped = Counter(report.skipped_chains)
    if n_short:
        skipped["too_short"] += n_short
    if sample is None:
        error = StructureFileError(
            path, "chains_too_short", f"no RNA chain with at least {min_chain_length} nucleotides"
        )
        error.chains_skipped = dict(skipped)  # still counted in the dataset's stats
        raise error
    info = {
        "skipped_chains": dict(skipped),
        "modified_mapped": sum(report.modified_mapped.values()),
        "modified_skipped": sum(report.modified_skipped.values()),
        "altlocs_resolved": report.altlocs_resolved,
    }
    return sample, info


# --------------------------------------------------------------------------- sample sources


class SampleList:
    """Full samples held in memory (the synthetic source)."""

    def __init__(self, samples: Sequence[RNASample]) -> None:
        self.samples = list(samples)
        self.lengths = [len(s) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> RNASample:
        return self.samples[index]


@dataclass
class StructureEntry:
    """A usable structure file: where it is, what it holds, its content hash."""

    path: str
    name: str
    content: str
    length: int
    sequence: str


class StructureStore:
    """Full samples of structure files, loaded through the memory and disk caches.

    ``cache``: ``"none"`` parses the file at every access, ``"memory"`` keeps up to
    ``MEMORY_CACHE_ITEMS`` parsed samples per process (LRU), ``"disk"`` adds the on-disk
    feature cache below the memory one.
    """

    def __init__(
        self,
        entries: Sequence[StructureEntry],
        *,
        min_chain_length: int,
        cache: CacheMode,
        disk: DiskCache | None,
    ) -> None:
        self.entries = list(entries)
        self.min_chain_length = min_chain_length
        self.cache = cache
        self.disk = disk
        self.memory = LRUCache(MEMORY_CACHE_ITEMS if cache != "none" else 0)
        self.lengths = [e.length for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def settings(self) -> dict[str, Any]:
        """Settings that change the parsed features (part of the disk-cache key)."""
        return {"min_chain_length": self.min_chain_length, "rna_only": True}

    def get(self, index: int) -> RNASample:
        entry = self.entries[index]
        sample = self.memory.get(entry.content)
        if sample is None:
            sample = self._load(entry)
            self.memory.put(entry.content, sample)
        # files with identical bytes share a cache entry but keep their own names
        return dataclasses.replace(sample, name=entry.name)

    def _load(self, entry: StructureEntry) -> RNASample:
        key = feature_key(entry.content, self.settings())
        if self.disk is not None:
            hit = self.disk.get(key)
            if hit is not None:
                return hit[0][0]
        sample, info = load_structure_file(
            Path(entry.path), name=entry.name, min_chain_length=self.min_chain_length
        )
        if self.disk is not None:
            self.disk.put(key, [sample], info)
        return sample


# --------------------------------------------------------------------------- datasets


class CroppedDataset(Dataset):
    """Samples of a source cropped to ``crop_length`` residues.

    Training crops are drawn from ``(seed, epoch, index)``: the epoch comes with the index
    from the batch sampler (``dataset[(index, epoch)]``) or, for a plain ``dataset[index]``,
    from :meth:`set_epoch`. Validation crops (``train=False``) depend on ``(seed, index)``
    only: the same window every time.
    """

    def __init__(
        self,
        source: SampleList | StructureStore,
        *,
        crop_length: int,
        crop_mode: Literal["contiguous", "spatial"],
        seed: int,
        train: bool,
    ) -> None:
        self.source = source
        self.crop_length = crop_length
        self.crop_mode = crop_mode
        self.seed = seed
        self.train = train
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    @property
    def lengths(self) -> list[int]:
        """Residues per item after cropping (for length bucketing)."""
        return [min(n, self.crop_length) for n in self.source.lengths]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``dataset[index]`` (training crops)."""
        self.epoch = int(epoch)

    def crop_rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator that decides the crop of ``index`` (in ``epoch`` when training)."""
        if self.train:
            return np.random.default_rng([self.seed, _TRAIN_CROP_STREAM, epoch, index])
        return np.random.default_rng([self.seed, _VAL_CROP_STREAM, index])

    def __getitem__(self, item: int | tuple[int, int]) -> RNASample:
        if isinstance(item, tuple):
            index, epoch = int(item[0]), int(item[1])
        else:
            index, epoch = int(item), self.epoch
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        sample = self.source.get(index)
        return crop_sample(sample, self.crop_length, self.crop_mode, self.crop_rng(index, epoch))


@dataclass
class DatasetSplits:
    """What :func:`build_datasets` returns."""

    train: CroppedDataset
    val: CroppedDataset
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- clustering / split


def kmer_identity(a: str, b: str, k: int = 5) -> float:
    """Sequence identity estimated from shared k-mers (0..1).

    ``(|K(a) & K(b)| / min(|K(a)|, |K(b)|)) ** (1/k)``: a containment estimate in the manner of
    Mash (Ondov et al. 2016, Genome Biology 17:132): if a fraction ``p`` of positions match,
    a k-mer survives with probability ``p**k``. Containment (not Jaccard) puts a fragment
    with its parent. Sequences shorter than ``k`` are identical or not.
    """
    if len(a) < k or len(b) < k:
        return 1.0 if a == b else 0.0
    ka = {a[i : i + k] for i in range(len(a) - k + 1)}
    kb = {b[i : i + k] for i in range(len(b) - k + 1)}
    return (len(ka & kb) / min(len(ka), len(kb))) ** (1.0 / k)


def cluster_sequences(sequences: Sequence[str], identity: float) -> list[int]:
    """Single-linkage clusters at ``kmer_identity >= identity``; cluster id per sequence.

    Pairs are compared all against all (quadratic; ~10 us a pair, fine for thousands).
    Ids are numbered in order of first appearance.
    """
    n = len(sequences)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if find(i) != find(j) and kmer_identity(sequences[i], sequences[j]) >= identity:
                parent[find(j)] = find(i)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def split_indices(
    clusters: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Train and validation indices, whole clusters to one side.

    Clusters are shuffled by ``seed`` and moved to validation until it holds at least
    ``val_fraction`` of the structures; with two or more clusters and ``val_fraction > 0``
    each side gets at least one cluster.
    """
    cluster_ids = sorted(set(clusters))
    members: dict[int, list[int]] = {c: [] for c in cluster_ids}
    for i, c in enumerate(clusters):
        members[c].append(i)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(cluster_ids))
    target = val_fraction * len(clusters)
    val: list[int] = []
    if val_fraction > 0 and len(cluster_ids) >= 2:
        for k in order[:-1]:  # the last cluster in the order always trains
            if len(val) >= max(target, 1):
                break
            val.extend(members[cluster_ids[k]])
    val_set = set(val)
    train = [i for i in range(len(clusters)) if i not in val_set]
    return train, sorted(val)


# --------------------------------------------------------------------------- factory


def build_datasets(
    cfg: DataConfig,
    *,
    seed: int,
    cache_dir: Path | None = None,
    cache: CacheMode = "memory",
) -> DatasetSplits:
    """Train and validation datasets for the ``data`` config section.

    Parameters
    ----------
    cfg : the ``data`` section.
    seed : run seed; decides synthetic structures, the split and the crops.
    cache_dir : on-disk feature cache directory (used when ``cache == "disk"``); defaults to
        ``cfg.cache_dir``.
    cache : ``"none"``, ``"memory"`` or ``"disk"`` (the ``loader.cache`` setting).

    Returns
    -------
    DatasetSplits
        ``train`` and ``val`` datasets of :class:`RNASample` and ``stats``: for files
        ``files_found``, ``structures_used``, ``files_skipped`` (reason -> files),
        ``chains_skipped`` (reason -> chains), residue counts and the split; for synthetic
        data the counts and lengths.

    Raises
    ------
    ConfigError
        Conflicting settings (``cfg.validate()``), or a disk cache without a directory.
    DataError
        ``data.path`` missing, without structure files, or without a usable RNA chain.
    """
    problems = cfg.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    if cache not in ("none", "memory", "disk"):
        raise ConfigError(f"loader.cache: expected 'none', 'memory' or 'disk', got {cache!r}")
    directory = cache_dir if cache_dir is not None else cfg.cache_dir
    if cache == "disk" and directory is None:
        raise ConfigError("loader.cache: 'disk' needs a cache directory (data.cache_dir)")
    # A generated synthetic set is cheap to keep and costly to remake (tens of seconds for a
    # few hundred structures): kept whenever there is a directory, unless cache 'none'.
    synthetic_kept = cfg.source == "synthetic" and cache != "none" and directory is not None
    disk = DiskCache(Path(directory) / "features") if cache == "disk" or synthetic_kept else None
    if cfg.source == "synthetic":
        return _build_synthetic(cfg, seed=seed, disk=disk)
    return _build_files(cfg, seed=seed, cache=cache, disk=disk)


def _synthetic_split(
    cfg: DataConfig, *, seed: int, split: str, n: int, disk: DiskCache | None
) -> list[RNASample]:
    settings = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "n": n,
        "min_length": cfg.min_length,
        "max_length": cfg.max_length,
    }
    key = feature_key("synthetic", settings)
    if disk is not None:
        hit = disk.get(key)
        if hit is not None:
            return hit[0]
    start = time.perf_counter()
    samples = generate_synthetic(
        n, seed=seed, split=split, min_length=cfg.min_length, max_length=cfg.max_length
    )
    elapsed = time.perf_counter() - start
    log.info("generated %d synthetic %s structures in %.1f s", n, split, elapsed)
    if disk is not None:
        disk.put(key, samples, settings)
    return samples


def _build_synthetic(cfg: DataConfig, *, seed: int, disk: DiskCache | None) -> DatasetSplits:
    train = _synthetic_split(cfg, seed=seed, split="train", n=cfg.n_train, disk=disk)
    val = _synthetic_split(cfg, seed=seed, split="val", n=cfg.n_val, disk=disk)
    lengths = [len(s) for s in train + val]
    stats = {
        "source": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "n_train": len(train),
        "n_val": len(val),
        "length_min": int(min(lengths)),
        "length_max": int(max(lengths)),
        "length_mean": float(np.mean(lengths)),
    }
    return DatasetSplits(
        train=_cropped(SampleList(train), cfg, seed, train=True),
        val=_cropped(SampleList(val), cfg, seed, train=False),
        stats=stats,
    )


def _cropped(
    source: SampleList | StructureStore, cfg: DataConfig, seed: int, *, train: bool
) -> CroppedDataset:
    return CroppedDataset(
        source, crop_length=cfg.crop_length, crop_mode=cfg.crop_mode, seed=seed, train=train
    )


def _build_files(
    cfg: DataConfig, *, seed: int, cache: CacheMode, disk: DiskCache | None
) -> DatasetSplits:
    from pipeline.io.structures import StructureFileError

    files, names = discover_files(cfg.path)
    if not files:
        suffixes = ", ".join(STRUCTURE_SUFFIXES)
        raise DataError(
            f"data.path: no structure files in {cfg.path} (looked for {suffixes}, optionally .gz)"
        )
    probe = StructureStore([], min_chain_length=cfg.min_chain_length, cache=cache, disk=disk)
    entries: list[StructureEntry] = []
    files_skipped: Counter = Counter()
    chains_skipped: Counter = Counter()
    n_modified = 0
    disk_hits = 0
    for path, name in zip(files, names):
        try:
            if not path.is_file():
                raise StructureFileError(path, "missing", "file not found")
            content = content_hash(path)
            key = feature_key(content, probe.settings())
            hit = disk.get(key) if disk is not None else None
            if hit is not None:
                (sample,), info = hit
                disk_hits += 1
            else:
                sample, info = load_structure_file(
                    path, name=name, min_chain_length=cfg.min_chain_length
                )
                if disk is not None:
                    disk.put(key, [sample], info)
        except StructureFileError as exc:
            log.warning("skipping %s", exc)
            files_skipped[exc.reason] += 1
            chains_skipped.update(exc.chains_skipped)
            continue
        chains_skipped.update(info.get("skipped_chains", {}))
        n_modified += int(info.get("modified_mapped", 0))
        sample.name = name
        entries.append(StructureEntry(str(path), name, content, len(sample), sample.sequence))
        probe.memory.put(content, sample)
    if not entries:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(files_skipped.items()))
        raise DataError(
            f"data.path: no usable RNA chains in {cfg.path} ({len(files)} files: {reasons})"
        )
    sequences = [e.sequence for e in entries]
    if cfg.split == "cluster":
        clusters = cluster_sequences(sequences, cfg.cluster_identity)
    else:
        clusters = list(range(len(entries)))
    train_idx, val_idx = split_indices(clusters, cfg.val_fraction, seed)
    if cfg.val_fraction > 0 and not val_idx:
        log.warning("data.path: a single sequence cluster; the validation set is empty")
    store_settings = {"min_chain_length": cfg.min_chain_length, "cache": cache, "disk": disk}
    train_store = StructureStore([entries[i] for i in train_idx], **store_settings)
    val_store = StructureStore([entries[i] for i in val_idx], **store_settings)
    if cache != "none":  # the scan parsed everything once already: keep it
        for store in (train_store, val_store):
            for entry in store.entries:
                parsed = probe.memory.get(entry.content)
                if parsed is not None:
                    store.memory.put(entry.content, parsed)
    stats = {
        "source": "files",
        "path": str(cfg.path),
        "files_found": len(files),
        "structures_used": len(entries),
        "files_skipped": dict(files_skipped),
        "chains_skipped": dict(chains_skipped),
        "modified_residues_mapped": n_modified,
        "residues": int(sum(e.length for e in entries)),
        "n_clusters": len(set(clusters)),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "disk_cache_hits": disk_hits,
    }
    log.info(
        "data: %d of %d files usable (%d train, %d val, %d clusters); skipped %s",
        len(entries),
        len(files),
        len(train_idx),
        len(val_idx),
        len(set(clusters)),
        dict(files_skipped) or "none",
    )
    return DatasetSplits(
        train=_cropped(train_store, cfg, seed, train=True),
        val=_cropped(val_store, cfg, seed, train=False),
        stats=stats,
    )
