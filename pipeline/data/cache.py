"""Caches of parsed structures: an in-process LRU and an on-disk feature cache.

On disk, an entry is one ``.npz`` file (no pickles) named by a key that hashes the *content* of
the source (the file's bytes, or the generator's settings) together with every setting that
changes the features (``min_chain_length``, ``ATOM_NAMES``, the feature format version). A
changed file or setting gives a new key, so a stale entry is never read; it is simply no longer
used. Entries are written to a temporary name and renamed, so concurrent writers (DDP ranks,
loader workers) cannot leave half a file; a corrupt entry is reported, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.features import ATOM_NAMES, RNASample

log = logging.getLogger(__name__)

#: Bumped whenever parsing or the stored layout changes (part of every key).
FEATURE_FORMAT_VERSION = 1


def content_hash(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_key(content: str, settings: dict[str, Any]) -> str:
    """Cache key (hex) of a source's content hash and the settings that shape its features."""
    payload = {
        "content": content,
        "settings": settings,
        "atom_names": list(ATOM_NAMES),
        "format": FEATURE_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pack(samples: Sequence[RNASample], info: dict) -> dict[str, np.ndarray]:
    """Samples as flat arrays (residue arrays concatenated, split again by ``lengths``)."""
    n_atoms = len(ATOM_NAMES)
    empty = {
        "coords": np.zeros((0, n_atoms, 3), np.float32),
        "atom_mask": np.zeros((0, n_atoms), bool),
        "residue_index": np.zeros(0, np.int64),
        "chain_index": np.zeros(0, np.int64),
    }
    arrays = {
        key: np.concatenate([getattr(s, key) for s in samples]) if samples else value
        for key, value in empty.items()
    }
    return {
        "lengths": np.array([len(s) for s in samples], dtype=np.int64),
        "names": np.array([s.name for s in samples], dtype=str),
        "sequences": np.array([s.sequence for s in samples], dtype=str),
        **arrays,
        "info": np.array(json.dumps(info, sort_keys=True)),
    }


def _unpack(arrays: Any) -> tuple[list[RNASample], dict]:
    offsets = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    samples = []
    names, sequences = arrays["names"].tolist(), arrays["sequences"].tolist()
    for k, (name, sequence) in enumerate(zip(names, sequences)):
        part = slice(int(offsets[k]), int(offsets[k + 1]))
        samples.append(
            RNASample(
                name=str(name),
                sequence=str(sequence),
                coords=arrays["coords"][part].astype(np.float32),
                atom_mask=arrays["atom_mask"][part].astype(bool),
                residue_index=arrays["residue_index"][part].astype(np.int64),
                chain_index=arrays["chain_index"][part].astype(np.int64),
            )
        )
    return samples, json.loads(str(arrays["info"]))


class DiskCache:
    """Samples stored under ``root/<key[:2]>/<key>.npz``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        """File that holds ``key``."""
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> tuple[list[RNASample], dict] | None:
        """The stored samples and info for ``key``, or None (missing or unreadable)."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return _unpack(arrays)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log.warning("feature cache entry %s is unreadable (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, samples: Sequence[RNASample], info: dict | None = None) -> Path:
        """Store samples (and a JSON-able ``info`` dict) under ``key``, atomically."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **_pack(samples, info or {}))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


class LRUCache:
    """A bounded least-recently-used mapping (per process; loader workers hold their own)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, but got capacity={capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any | None:
        """The value for ``key`` (now most recently used) or None."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: Any, value: Any) -> None:
        """Insert, evicting the least recently used item beyond ``capacity``."""
        if self.capacity == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
