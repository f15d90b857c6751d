"""Batching: collate, the bucketed DDP sampler, resumable loaders and the device prefetch queue."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline.data import (
    DataConfig,
    LoaderConfig,
    build_datasets,
    build_train_loader,
    build_val_batches,
    collate,
)
from pipeline.data.features import ATOM_NAMES, UNKNOWN_NUCLEOTIDE, RNASample
from pipeline.data.loader import DevicePrefetcher, LengthBucketBatchSampler, resume_position

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits():
    cfg = DataConfig(n_train=30, n_val=5, min_length=16, max_length=40, crop_length=32)
    return build_datasets(cfg, seed=0)


def _sample(name: str, sequence: str, chain_break: int | None = None) -> RNASample:
    n = len(sequence)
    rng = np.random.default_rng(len(name))
    chains = np.zeros(n, dtype=np.int64)
    if chain_break is not None:
        chains[chain_break:] = 1
    mask = np.ones((n, len(ATOM_NAMES)), dtype=bool)
    mask[0, 0] = False
    return RNASample(
        name=name,
        sequence=sequence,
        coords=rng.normal(size=(n, len(ATOM_NAMES), 3)).astype(np.float32),
        atom_mask=mask,
        residue_index=np.arange(5, 5 + n, dtype=np.int64),
        chain_index=chains,
    )


def _keys(batch: dict) -> tuple:
    """What identifies a batch: names plus the exact cropped residues."""
    return tuple(batch["names"]), tuple(batch["residue_index"].flatten().tolist())


def test_collate_pads_and_masks():
    a = _sample("a", "ACGUN")
    b = _sample("b", "GGCCAAUU", chain_break=4)
    batch = collate([a, b])
    assert batch["names"] == ["a", "b"]
    assert batch["lengths"].tolist() == [5, 8]
    assert batch["aatype"].shape == (2, 8) and batch["aatype"].dtype == torch.int64
    assert batch["aatype"][0].tolist() == [0, 1, 2, 3] + [UNKNOWN_NUCLEOTIDE] * 4
    assert batch["residue_mask"].tolist() == [[True] * 5 + [False] * 3, [True] * 8]
    assert batch["coords"].shape == (2, 8, len(ATOM_NAMES), 3)
    assert batch["coords"].dtype == torch.float32
    assert torch.equal(batch["coords"][1], torch.from_numpy(b.coords))
    assert not batch["atom_mask"][0, 5:].any() and not batch["atom_mask"][0, 0, 0]
    assert torch.all(batch["coords"][0, 5:] == 0)
    assert batch["chain_index"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["residue_index"][0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert all(t.device.type == "cpu" for t in batch.values() if isinstance(t, torch.Tensor))
    with pytest.raises(ValueError):
        collate([])


@pytest.mark.parametrize("n_items, batch_size", [(40, 5), (37, 4)])
def test_two_ranks_cover_the_epoch(n_items: int, batch_size: int):
    lengths = np.random.default_rng(0).integers(10, 60, size=n_items).tolist()
    ranks = [
        LengthBucketBatchSampler(lengths, batch_size, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    for sampler in ranks:
        sampler.set_epoch(2)
    seen = [[i for batch in sampler for i, epoch in batch] for sampler in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[0]))  # same number of steps
    assert set(seen[0]) | set(seen[1]) == set(range(n_items))
    if n_items % (2 * batch_size) == 0:  # even split: a partition, no overlap at all
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n_items))
    else:  # only the padding batch repeats
        assert len(seen[0]) + len(seen[1]) - n_items <= batch_size
    # the epoch travels with every index
    assert all(epoch == 2 for batch in ranks[0] for _, epoch in batch)


def test_bucketing_groups_similar_lengths_and_shuffles_per_epoch():
    lengths = np.random.default_rng(1).integers(10, 200, size=400).tolist()

    def padding(sampler):
        total = 0
        for batch in sampler:
            sizes = [lengths[i] for i, _ in batch]
            total += max(sizes) * len(sizes) - sum(sizes)
        return total

    bucketed = LengthBucketBatchSampler(lengths, 8, seed=0)
    plain = LengthBucketBatchSampler(lengths, 8, seed=0, bucketing=False)
    assert padding(bucketed) < 0.3 * padding(plain)
    order0 = [i for b in bucketed for i, _ in b]
    bucketed.set_epoch(1)
    order1 = [i for b in bucketed for i, _ in b]
    assert sorted(order0) == sorted(order1) == list(range(400)) and order0 != order1


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketBatchSampler([3, 4], 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketBatchSampler([3, 4], 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        LengthBucketBatchSampler([], 1, seed=0)


def test_resumed_loader_continues_with_exactly_the_next_batch(splits):
    cfg = LoaderConfig(num_workers=0)
    full = build_train_loader(splits.train, cfg, batch_size=4, seed=9, device=CPU)
    full.set_epoch(1)
    expected = [_keys(b) for b in full]
    assert len(expected) == len(full) == 8  # ceil(30 / 4)

    partial = build_train_loader(splits.train, cfg, batch_size=4, seed=9, device=CPU)
    partial.set_epoch(1)
    consumed = []
    for batch in partial:
        consumed.append(_keys(batch))
        if len(consumed) == 3:
            break
    state = partial.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 3, "world_size": 1}

    resumed = build_train_loader(splits.train, cfg, batch_size=4, seed=9, device=CPU)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer calls this for the epoch under way: it keeps the position
    rest = [_keys(b) for b in resumed]
    assert consumed + rest == expected
    assert resumed.state_dict()["batches_consumed"] == len(resumed)
    # the next epoch starts from its first batch, in a new order with new crops
    resumed.set_epoch(2)
    next_epoch = [_keys(b) for b in resumed]
    assert len(next_epoch) == 8 and next_epoch != expected


def test_worker_processes_give_the_same_batches(splits):
    """Persistent workers hold copies of the dataset: the epoch must reach them with the indices."""
    serial = build_train_loader(
        splits.train, LoaderConfig(num_workers=0), batch_size=5, seed=4, device=CPU
    )
    two_workers = LoaderConfig(num_workers=2, prefetch_factor=2)
    workers = build_train_loader(splits.train, two_workers, batch_size=5, seed=4, device=CPU)
    for epoch in (0, 1):
        serial.set_epoch(epoch)
        workers.set_epoch(epoch)
        a = [(_keys(b), b["coords"].sum().item()) for b in serial]
        b = [(_keys(b), b["coords"].sum().item()) for b in workers]
        assert a == b
    assert workers.last_wait_s >= 0.0


class NamedOps:
    """Stand-in stream ops for real batches: records the names of each batch issued."""

    def __init__(self):
        self.issued: list[tuple] = []

    def issue(self, batch):
        self.issued.append(tuple(batch["names"]))
        return batch

    def handoff(self, handle):
        return handle


def _epochs_fresh(splits, epochs, **kwargs):
    """Each epoch's batches from a loader of its own (no stream carried over)."""
    out = []
    for epoch in epochs:
        loader = build_train_loader(splits.train, LoaderConfig(num_workers=0), device=CPU,
                                    **kwargs)
        loader.set_epoch(epoch)
        out.append([_keys(b) for b in loader])
    return out


def test_the_stream_reads_ahead_across_epoch_boundaries(splits):
    """The next epoch's first batches are issued to the device before the epoch starts, and
    every epoch still gets exactly its own batches and crops."""
    ops = NamedOps()
    loader = build_train_loader(
        splits.train, LoaderConfig(num_workers=0, prefetch_factor=2), batch_size=4, seed=3,
        device=CPU,
    )
    loader.ops = ops
    expected = _epochs_fresh(splits, (0, 1, 2), batch_size=4, seed=3)
    got = []
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        got.append([_keys(b) for b in loader])
        # the queue is full at the epoch's end: two batches of the next epoch are in flight
        assert len(ops.issued) == (epoch + 1) * len(loader) + 2
        assert loader.state_dict() == {"epoch": epoch, "batches_consumed": len(loader),
                                       "world_size": 1}
    assert got == expected
    next_names = [names for names, _ in _epochs_fresh(splits, (3,), batch_size=4, seed=3)[0]]
    assert ops.issued[-2:] == next_names[:2]


def test_a_position_jump_reopens_the_stream(splits):
    """Abandoning an epoch half-way, skipping one, or loading a state starts the stream at the
    new position: no batch of the old read-ahead leaks into it."""
    kwargs = dict(batch_size=4, seed=5)
    expected = _epochs_fresh(splits, (0, 1, 3), **kwargs)
    loader = build_train_loader(splits.train, LoaderConfig(num_workers=2, prefetch_factor=2),
                                device=CPU, **kwargs)
    loader.set_epoch(0)
    first = []
    for batch in loader:
        first.append(_keys(batch))
        if len(first) == 3:
            break
    assert first == expected[0][:3]
    loader.set_epoch(1)  # epoch 0 abandoned after 3 batches
    assert [_keys(b) for b in loader] == expected[1]
    loader.set_epoch(3)  # epoch 2 skipped
    assert [_keys(b) for b in loader] == expected[2]
    loader.load_state_dict({"epoch": 1, "batches_consumed": 6, "world_size": 1})
    assert [_keys(b) for b in loader] == expected[1][6:]
    loader.close()


def test_workers_start_clean_while_another_thread_holds_a_lock(splits, monkeypatch):
    """A lock held by another thread of the training process (here tempfile's, which a worker
    needs to pass tensors back) must not reach the workers: forked, they inherit it held and
    hang for ever; started from the fork server (the default), they deliver."""
    import tempfile
    import threading
    import time

    monkeypatch.setattr(tempfile, "tempdir", None)  # workers look the directory up afresh
    loader = build_train_loader(splits.train, LoaderConfig(num_workers=2, prefetch_factor=2),
                                batch_size=4, seed=5, device=CPU)
    assert loader._loader.multiprocessing_context.get_start_method() == "forkserver"
    loader.set_epoch(0)
    delivered = []
    reader = threading.Thread(target=lambda: delivered.extend(_keys(b) for b in loader),
                              daemon=True)
    with tempfile._once_lock:  # held for a moment, as by a tracker thread inside mkdtemp,
        reader.start()         # while the workers start
        time.sleep(2.0)
    reader.join(timeout=120)
    assert not reader.is_alive(), "the loader's workers hung"
    assert delivered == _epochs_fresh(splits, (0,), batch_size=4, seed=5)[0]
    loader.close()


def test_forkserver_workers_start_with_the_dataset_modules_imported(tmp_path):
    """The fork server imports the dataset's module before it forks workers, so the workers of
    every run inherit it: over two runs (loaders) of two workers each, in a fresh process, the
    module is imported twice (the training process and the server), not once per worker too
    (five times). Each worker import was 1.5 s of every trial's start on the development
    machine (docs/benchmarks.md)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    log = tmp_path / "imports.log"
    script = textwrap.dedent(f"""
        import os
        import torch
        from forkserver_probe import ProbeDataset
        from pipeline.data import DataConfig, LoaderConfig, build_datasets, build_train_loader

        cfg = DataConfig(n_train=12, n_val=2, min_length=16, max_length=24, crop_length=16)
        train = build_datasets(cfg, seed=0).train
        train.__class__ = ProbeDataset
        for _ in range(2):
            loader = build_train_loader(train, LoaderConfig(num_workers=2, prefetch_factor=1),
                                        batch_size=4, seed=0, device=torch.device("cpu"))
            assert next(iter(loader))["aatype"].shape[0] == 4
            loader.close()
        print(os.getpid())
    """)
    # On PYTHONPATH, not sys.path: the fork server takes the environment's import path.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "FORKSERVER_PROBE_LOG": str(log), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imports = log.read_text().split()
    assert done.stdout.split()[-1] in imports and len(imports) == 2, imports


def test_loader_delivers_on_the_requested_device_and_measures_the_wait(splits):
    loader = build_train_loader(
        splits.train, LoaderConfig(device_prefetch=False), batch_size=6, seed=0, device=CPU
    )
    batch = next(iter(loader))
    assert batch["coords"].device == CPU and batch["aatype"].shape[0] == 6
    assert isinstance(batch["names"], list)
    assert loader.last_wait_s > 0.0


class RecordingOps:
    """Stand-in for the CUDA stream operations: records the order of issues and handoffs."""

    def __init__(self, log: list):
        self.log = log

    def issue(self, batch):
        self.log.append(("issue", batch["id"]))
        return {"id": batch["id"], "copied": True}

    def handoff(self, handle):
        self.log.append(("handoff", handle["id"]))
        return handle


def test_prefetch_queue_keeps_depth_batches_in_flight_in_order():
    log: list = []
    pulled: list[int] = []

    def source():
        for k in range(7):
            pulled.append(k)
            yield {"id": k}

    prefetcher = DevicePrefetcher(source(), CPU, depth=3, ops=RecordingOps(log))
    received = []
    for batch in prefetcher:
        received.append(batch["id"])
        assert batch["copied"]
        # while the consumer holds batch k, batches k+1..k+min(3, k) have been issued, no
        # more: the queue ramps up one batch per request, then stays 3 deep
        k = batch["id"]
        issued = [i for what, i in log if what == "issue"]
        assert issued == list(range(min(k + 1 + min(3, k), 7)))
        assert len(pulled) == min(k + 1 + min(3, k), 7)  # the source is read lazily
    assert received == list(range(7))
    handoffs = [i for what, i in log if what == "handoff"]
    assert handoffs == list(range(7))
    # every batch is issued before it is handed off
    for k in range(7):
        assert log.index(("issue", k)) < log.index(("handoff", k))


def test_prefetch_depth_one_and_empty_source():
    log: list = []
    source = ({"id": k} for k in range(3))
    out = [b["id"] for b in DevicePrefetcher(source, CPU, depth=1, ops=RecordingOps(log))]
    assert out == [0, 1, 2]
    assert log[:3] == [("issue", 0), ("handoff", 0), ("issue", 1)]
    assert list(DevicePrefetcher(iter([]), CPU, depth=2, ops=RecordingOps([]))) == []
    # switched off, the ops are not used at all: batches pass through
    unused: list = []
    source = ({"id": k} for k in range(2))
    off = DevicePrefetcher(source, CPU, ops=RecordingOps(unused), enabled=False)
    assert [b["id"] for b in off] == [0, 1] and unused == []
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher([], CPU, depth=0)


def test_wait_time_reflects_a_slow_source():
    def slow():
        for k in range(3):
            time.sleep(0.05)
            yield {"x": torch.zeros(2), "id": k}

    # pass-through: the consumer waits for every batch
    prefetcher = DevicePrefetcher(slow(), CPU, depth=2)
    waits = [prefetcher.last_wait_s for _ in prefetcher]
    assert len(waits) == 3 and all(w >= 0.04 for w in waits)
    # queued: the first request waits for its own batch only (the queue ramps up), the second
    # for the next two, the third finds its batch ready; the total wait is the source's time
    prefetcher = DevicePrefetcher(slow(), CPU, depth=2, ops=RecordingOps([]))
    waits = [prefetcher.last_wait_s for _ in prefetcher]
    assert 0.04 <= waits[0] < 0.09 and waits[1] >= 0.09 and waits[2] < 0.04


def test_validation_batches_are_fixed(splits):
    first = build_val_batches(splits.val, 2)
    second = build_val_batches(splits.val, 2)
    assert [b["names"] for b in first] == [b["names"] for b in second]
    assert sum(len(b["names"]) for b in first) == len(splits.val)
    for a, b in zip(first, second):
        assert torch.equal(a["coords"], b["coords"])
    lengths = [int(n) for b in first for n in b["lengths"]]
    assert lengths == sorted(lengths)


def test_resume_position_with_another_world_size():
    assert resume_position({"epoch": 3, "batches_consumed": 5, "world_size": 2}, 2) == (3, 5)
    assert resume_position({"epoch": 3, "batches_consumed": 5, "world_size": 2}, 4) == (3, 2)
    assert resume_position({"epoch": 1, "batches_consumed": 4}, 1) == (1, 4)
