"""Batching and feeding: collate, a length-bucketed DDP-aware sampler, device prefetch.

The training loader is three layers, each testable on its own:

1. :class:`LengthBucketBatchSampler` decides which indices form each batch of an epoch
   (seeded, identical on every rank, then dealt out rank by rank) and where to resume.
2. A ``torch.utils.data.DataLoader`` runs the dataset and :func:`collate` in worker
   processes and pins the host batches (CUDA only).
3. :class:`DevicePrefetcher` keeps the next ``prefetch_factor`` batches in flight to the
   device: on CUDA it copies them with ``non_blocking`` copies on a side stream while the
   current batch computes, makes the consumer stream wait for the copy and calls
   ``record_stream`` so the allocator does not recycle the memory too early. The stream
   operations sit behind :class:`StreamOps`, so the queue logic runs (and is tested) on CPU.

:class:`TrainLoader` ties them together and counts the batches it has *handed to the
consumer*: that count, not the sampler's (the DataLoader reads ahead), is the data position
saved in checkpoints. One DataLoader iterator serves the whole run (the epochs follow one
another in :class:`EpochStream`), so the workers and the device queue read ahead across epoch
boundaries and through validation instead of starting cold at every epoch. Workers started
by the ``forkserver`` (the default) fork from a server that has torch and the dataset's
modules imported already (:func:`preload_in_forkserver`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.data.config import LoaderConfig
from pipeline.data.features import ATOM_NAMES, UNKNOWN_NUCLEOTIDE, RNASample, encode_sequence

log = logging.getLogger(__name__)

#: Batches per bucket: indices are shuffled, cut into chunks of this many batches, sorted by
#: length within a chunk and batched; then the batch order is shuffled. Large enough to group
#: similar lengths, small enough to keep the epoch random.
BUCKET_BATCHES = 50


# --------------------------------------------------------------------------- collate


def collate(samples: Sequence[RNASample]) -> dict:
    """Pad samples into a batch (the contract of :mod:`pipeline.data.features`).

    Padding: ``aatype`` = ``UNKNOWN_NUCLEOTIDE``, indices 0, coordinates 0, masks False.
    All tensors are on the CPU; ``names`` is a list of str.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    n_batch = len(samples)
    n_res = max(len(s) for s in samples)
    n_atoms = len(ATOM_NAMES)
    aatype = np.full((n_batch, n_res), UNKNOWN_NUCLEOTIDE, dtype=np.int64)
    residue_index = np.zeros((n_batch, n_res), dtype=np.int64)
    chain_index = np.zeros((n_batch, n_res), dtype=np.int64)
    residue_mask = np.zeros((n_batch, n_res), dtype=bool)
    coords = np.zeros((n_batch, n_res, n_atoms, 3), dtype=np.float32)
    atom_mask = np.zeros((n_batch, n_res, n_atoms), dtype=bool)
    for b, sample in enumerate(samples):
        n = len(sample)
        aatype[b, :n] = encode_sequence(sample.sequence)
        residue_index[b, :n] = sample.residue_index
        chain_index[b, :n] = sample.chain_index
        residue_mask[b, :n] = True
        coords[b, :n] = sample.coords
        atom_mask[b, :n] = sample.atom_mask
    return {
        "aatype": torch.from_numpy(aatype),
        "residue_index": torch.from_numpy(residue_index),
        "chain_index": torch.from_numpy(chain_index),
        "residue_mask": torch.from_numpy(residue_mask),
        "coords": torch.from_numpy(coords),
        "atom_mask": torch.from_numpy(atom_mask),
        "lengths": torch.tensor([len(s) for s in samples], dtype=torch.int64),
        "names": [s.name for s in samples],
    }


# --------------------------------------------------------------------------- sampler


class LengthBucketBatchSampler(Sampler):
    """Seeded batches of similar-length items, dealt out across DDP ranks, resumable.

    Every rank builds the same global batch list for an epoch (from ``seed`` and the epoch)
    and takes every ``world_size``-th batch starting at ``rank``. When the number of batches
    does not divide by ``world_size``, the list is padded by repeating its first batches, so
    every rank runs the same number of steps (DDP would hang otherwise); only those repeats
    overlap between ranks.

    Items are yielded as ``(index, epoch)`` so the dataset crops for the right epoch even in
    persistent worker processes.

    Parameters
    ----------
    lengths : residues per item (after cropping).
    batch_size : items per batch (the last batch of a bucket may be smaller).
    seed : shuffling seed.
    rank, world_size : this process's rank and the number of ranks.
    bucketing : group similar lengths; with False, batches are random.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucketing: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, but got batch_size={batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, but got world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), but got rank={rank}")
        if len(lengths) == 0:
            raise ValueError("the dataset is empty: no batches to sample")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.bucketing = bucketing
        self.epoch = 0
        self.start = 0  # first batch of the epoch the next iteration yields
        self.batches_consumed = 0  # batches yielded so far in this epoch (incl. skipped)
        # chunk sizes do not depend on the shuffle, so neither does the number of batches
        self._n_global_batches = len(self.global_batches(0))

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (before dealing out to ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size
        if not self.bucketing:
            return [order[i : i + size].tolist() for i in range(0, len(order), size)]
        chunk = size * BUCKET_BATCHES
        batches = []
        for c in range(0, len(order), chunk):
            part = order[c : c + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches.extend(part[i : i + size].tolist() for i in range(0, len(part), size))
        return [batches[k] for k in rng.permutation(len(batches))]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        batches = self.global_batches(epoch)
        per_rank = math.ceil(len(batches) / self.world_size)
        padded = [batches[k % len(batches)] for k in range(per_rank * self.world_size)]
        return padded[self.rank :: self.world_size]

    def __len__(self) -> int:
        return math.ceil(self._n_global_batches / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self.start = 0
        self.batches_consumed = 0

    def set_position(self, epoch: int, batches_consumed: int) -> None:
        """Make the next iteration continue ``epoch`` after ``batches_consumed`` batches."""
        self.epoch = int(epoch)
        self.start = int(batches_consumed)
        self.batches_consumed = int(batches_consumed)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.rank_batches(epoch)[self.start :]:
            self.batches_consumed += 1
            yield [(index, epoch) for index in batch]

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches yielded (a DataLoader reading ahead makes this run early: use
        :meth:`TrainLoader.state_dict` for checkpoints)."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off (see :func:`resume_position`)."""
        self.set_position(*resume_position(state, self.world_size))


class EpochStream(Sampler):
    """The epochs of ``sampler`` one after another, without end, from its position.

    A DataLoader iterator over this never runs dry at an epoch boundary: its worker processes
    go on to the next epoch's batches while the consumer finishes this one (and validates),
    where a new iterator per epoch would start them cold and make the epoch's first steps
    wait (docs/benchmarks.md, "Data loading"). Items are ``(index, epoch)`` as in the sampler,
    so crops follow the epoch they belong to. ``len`` is the sampler's batches per epoch.
    """

    def __init__(self, sampler: LengthBucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.sampler.epoch, self.sampler.start
        while True:
            for batch in self.sampler.rank_batches(epoch)[start:]:
                yield [(index, epoch) for index in batch]
            epoch, start = epoch + 1, 0


def resume_position(state: dict[str, int], world_size: int) -> tuple[int, int]:
    """(epoch, batches to skip on each rank) for resuming ``state`` on ``world_size`` ranks.

    With the same number of ranks every rank continues exactly after its last batch. With a
    different number, the global position (batches consumed times the old world size) is
    divided among the new ranks, so no batch of the epoch is repeated; the split of the rest
    differs from an uninterrupted run.
    """
    epoch = int(state["epoch"])
    consumed = int(state["batches_consumed"])
    old_world = int(state.get("world_size", world_size))
    if old_world != world_size:
        log.warning(
            "resuming a data position saved with world_size=%d on world_size=%d: continuing from "
            "the same global batch, the rest of the epoch is split differently",
            old_world, world_size,
        )
        consumed = consumed * old_world // world_size
    return epoch, consumed


# --------------------------------------------------------------------------- device prefetch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def move_to_device(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """Tensors of a (nested) batch moved to ``device``; other values (names) unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(v, device, non_blocking=non_blocking) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


class StreamOps(Protocol):
    """The device-specific part of prefetching (the seam that makes the queue CPU-testable)."""

    def issue(self, batch: Any) -> Any:
        """Start moving ``batch`` to the device; return a handle for :meth:`handoff`."""

    def handoff(self, handle: Any) -> Any:
        """Make the batch behind ``handle`` safe to use on the consumer stream; return it."""


class CudaStreamOps:
    """Copies on a side CUDA stream; the consumer stream waits on an event per batch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def issue(self, batch: Any) -> tuple[Any, torch.cuda.Event]:
        # The copy only overlaps with compute when the host batch is pinned (DataLoader
        # pin_memory) and runs on a stream other than the one the model computes on.
        with torch.cuda.stream(self.stream):
            moved = move_to_device(batch, self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return moved, ready

    def handoff(self, handle: tuple[Any, torch.cuda.Event]) -> Any:
        moved, ready = handle
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)  # a GPU-side wait: the host does not block here
        for tensor in _tensors(moved):
            # allocated on the side stream, used on the consumer stream: tell the caching
            # allocator not to hand the memory out again before the consumer is done with it
            tensor.record_stream(consumer)
        return moved


class DevicePrefetcher:
    """Iterate over batches already on ``device``, ``depth`` batches ahead.

    With stream ops (CUDA, or injected for tests) the next ``depth`` batches are issued before
    the current one is handed out, in order. The queue ramps up: the first batch of an
    iteration is handed out as soon as it alone is issued, and each later request adds one
    more in flight until ``depth``, so the first step waits for one batch from the DataLoader,
    not ``depth + 1`` (on the H100 with prefetch factor 8: 1.3-1.4 s before the ramp,
    0.43-0.48 s after: docs/benchmarks.md). :class:`TrainLoader` iterates once per run, not
    once per epoch, so later epochs start with a full queue. Without stream ops (CPU, or
    ``enabled=False``), batches pass through, moved with a plain ``.to(device)`` (a no-op for
    CPU tensors on the CPU).

    ``last_wait_s`` is the host time (s) the consumer waited for the latest batch: from
    asking for it until receiving it (fetching from the DataLoader and issuing copies).
    """

    def __init__(
        self,
        source: Iterable[Any],
        device: torch.device,
        *,
        depth: int = 2,
        ops: StreamOps | None = None,
        enabled: bool = True,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, but got depth={depth}")
        self.source = source
        self.device = torch.device(device)
        self.depth = depth
        if enabled and ops is None and self.device.type == "cuda":
            ops = CudaStreamOps(self.device)
        self.ops = ops if enabled else None
        self.last_wait_s = 0.0

    def __iter__(self) -> Iterator[Any]:
        if self.ops is None:
            yield from self._pass_through()
        else:
            yield from self._queued(self.ops)

    def _pass_through(self) -> Iterator[Any]:
        iterator = iter(self.source)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            batch = move_to_device(batch, self.device)
            self.last_wait_s = time.perf_counter() - start
            yield batch

    def _queued(self, ops: StreamOps) -> Iterator[Any]:
        iterator = iter(self.source)
        in_flight: deque = deque()
        exhausted = False

        handed = 0

        def fill(target: int) -> None:
            nonlocal exhausted
            while not exhausted and len(in_flight) < target:
                try:
                    in_flight.append(ops.issue(next(iterator)))
                except StopIteration:
                    exhausted = True

        while True:
            start = time.perf_counter()
            fill(1)  # the batch to hand out (already in flight after the ramp)
            if not in_flight:
                return
            batch = ops.handoff(in_flight.popleft())
            # Behind the one handed out now: as many as were handed before, up to `depth`.
            fill(min(self.depth, handed))
            handed += 1
            self.last_wait_s = time.perf_counter() - start
            yield batch


# --------------------------------------------------------------------------- loaders


def preload_in_forkserver(dataset: Any) -> list[str]:
    """Have the forkserver import torch and the modules that workers need for ``dataset``
    (its class's and this one's, for :func:`collate`) when it starts, and return them.

    A forkserver worker is a fork of the server, and it unpickles the dataset; what the server
    has not imported, every worker of every run imports afresh. On the 2-core development
    machine that was 1.5-1.6 s before the first batch of each run (each trial of a study);
    with the modules preloaded, 0.03-0.05 s from the second run of a process on, 0.8 s for
    the first (docs/benchmarks.md, "A trial's fixed costs"). The list only counts before the
    server starts (the first forkserver loader of a process). The server only imports (it
    never runs torch code), so its forks inherit no threads or locks.
    """
    modules = ["__main__", "torch", __name__, type(dataset).__module__]
    modules = list(dict.fromkeys(modules))
    multiprocessing.set_forkserver_preload(modules)
    return modules


class TrainLoader:
    """Training batches on the device, one epoch per iteration, resumable mid-epoch.

    ``len(loader)`` is the number of batches per epoch on this rank. ``set_epoch(e)`` starts
    epoch ``e`` (unless ``e`` is the epoch already under way, as after a resume).
    ``state_dict()`` holds the epoch and the batches handed out; after ``load_state_dict``
    the next iteration yields exactly the batch that would have come next.
    ``last_wait_s`` is the host wait (s) for the latest batch (``perf/data_wait_ms``).

    Each iteration takes its epoch's batches from one stream that runs on across epochs
    (:class:`EpochStream` behind the DataLoader, then the device queue): when epoch ``e + 1``
    follows ``e``, its first batches are already loaded, and on CUDA already on the device.
    The stream is opened again only where the position jumps (a resume, a rollback, an
    epoch skipped or abandoned half-way).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: LengthBucketBatchSampler,
        cfg: LoaderConfig,
        device: torch.device,
        *,
        ops: StreamOps | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.cfg = cfg
        self.device = torch.device(device)
        self.ops = ops
        workers = cfg.num_workers
        if workers > 0 and cfg.start_method == "forkserver":
            preload_in_forkserver(dataset)
        self._loader = DataLoader(
            dataset,
            batch_sampler=EpochStream(sampler),
            num_workers=workers,
            collate_fn=collate,
            # pinned host memory only helps (and only works) for copies to a CUDA device
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            persistent_workers=workers > 0,
            multiprocessing_context=cfg.start_method if workers > 0 else None,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            # Every new iterator draws a base seed; from a private generator, not torch's
            # global one, so that a resumed run (one extra iterator) keeps the same RNG stream.
            generator=torch.Generator().manual_seed(sampler.seed),
        )
        self.epoch = 0
        self.batches_consumed = 0
        self.last_wait_s = 0.0
        self._prefetcher: DevicePrefetcher | None = None
        self._stream: Iterator[dict] | None = None
        self._stream_position = 0  # global batch (epoch * len + batch) the stream yields next

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a no-op for the epoch under way (keeps a resumed position)."""
        if int(epoch) == self.epoch:
            return
        self.epoch = int(epoch)
        self.batches_consumed = 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        if self._stream is None or self._stream_position != self._position():
            self._open_stream()
        assert self._prefetcher is not None and self._stream is not None
        for _ in range(len(self) - self.batches_consumed):
            batch = next(self._stream)  # never exhausted: the epochs run on
            self.last_wait_s = self._prefetcher.last_wait_s
            self.batches_consumed += 1
            self._stream_position += 1
            yield batch

    def _position(self) -> int:
        return self.epoch * len(self) + self.batches_consumed

    def _open_stream(self) -> None:
        """(Re)start the stream at the current position (the DataLoader's persistent
        workers drop what they had read ahead for the old one)."""
        self.sampler.set_position(self.epoch, self.batches_consumed)
        self._prefetcher = DevicePrefetcher(
            self._loader,
            self.device,
            depth=self.cfg.prefetch_factor,
            ops=self.ops,
            enabled=self.cfg.device_prefetch,
        )
        self._stream = iter(self._prefetcher)
        self._stream_position = self._position()

    def close(self) -> None:
        """Stop the persistent worker processes now.

        Left to the garbage collector, a finished run's workers are shut down whenever its
        loader is collected, often several runs at once inside a later one (a tuning study), and
        each shutdown then waits out the workers' status timeout: tens of seconds. torch has no
        public call for this; the iterator's own shutdown is what its ``__del__`` would run.
        """
        self._stream = self._prefetcher = None
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def state_dict(self) -> dict[str, int]:
        """Data position: epoch and batches handed to the consumer in it (plus world size)."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "world_size": self.sampler.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (see :func:`resume_position`)."""
        self.epoch, self.batches_consumed = resume_position(state, self.sampler.world_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self.sampler.set_position(self.epoch, self.batches_consumed)


def build_train_loader(
    dataset: Any,
    cfg: LoaderConfig,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> TrainLoader:
    """The training loader for ``dataset`` (which must expose ``lengths``, e.g. a
    :class:`~pipeline.data.datasets.CroppedDataset`).

    Parameters
    ----------
    dataset : training dataset.
    cfg : the ``loader`` section.
    batch_size : structures per batch on this rank.
    seed : shuffling seed (the same on every rank).
    device : where batches are delivered.
    rank, world_size : DDP rank and number of ranks.
    """
    sampler = LengthBucketBatchSampler(
        dataset.lengths,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        bucketing=cfg.length_bucketing,
    )
    return TrainLoader(dataset, sampler, cfg, torch.device(device))


def build_val_batches(dataset: Any, batch_size: int) -> list[dict]:
    """Validation batches on the CPU in a fixed order (by length, then index: less padding).

    The trainer moves each batch to its device. Every call gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, but got batch_size={batch_size}")
    if len(dataset) == 0:
        return []
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        lengths = [len(dataset[i]) for i in range(len(dataset))]
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [
        collate([dataset[int(i)] for i in order[k : k + batch_size]])
        for k in range(0, len(order), batch_size)
    ]
