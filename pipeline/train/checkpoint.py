"""Atomic, checksummed checkpoints that load with ``torch.load(..., weights_only=True)``.

Layout: ``<run_dir>/checkpoints/step-00000120.pt`` plus ``step-00000120.pt.sha256``. A
checkpoint counts only once its checksum file exists and matches: both files are written to a
temporary name, fsynced and renamed, the checksum last, so a kill at any moment leaves either
the previous set of checkpoints or a complete new one. Saving enqueues device-to-host copies
into reused pinned buffers on the caller's thread (the only stall) and serialises/writes in a
background thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from pipeline.data.cache import content_hash
from pipeline.errors import CheckpointError, DiskFullError
from pipeline.train.checkpoint_process import Packed, PackedSnapshot, WriterDied, WriterProcess

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------ file I/O
@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """An open temporary file beside ``path``; when the block ends it is fsynced and renamed
    to ``path`` (then the directory is fsynced). A failure removes it (a full disk leaves the
    earlier files as they were)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_write(path: Path, data: bytes) -> None:
    with _atomic_file(path) as fh:
        fh.write(data)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checksum_path(path: Path) -> Path:
    """The checksum file of checkpoint ``path``: ``<name>.sha256``."""
    return path.with_name(path.name + ".sha256")


def read_checksum(path: Path) -> str:
    """The digest recorded for checkpoint ``path`` ("" when its checksum file is empty)."""
    fields = checksum_path(path).read_text().split()
    return fields[0] if fields else ""


def write_checksum(path: Path, digest: str) -> None:
    """Write (atomically) the checksum file of ``path``: ``<digest>  <name>``, as sha256sum."""
    _fsync_write(checksum_path(path), f"{digest}  {path.name}\n".encode())


def write_checkpoint(path: Path, state: dict, *, delay_s: float = 0.0) -> None:
    """Serialise ``state`` to ``path`` atomically, then its checksum file.

    ``torch.save`` writes straight to a temporary file and the checksum is computed by reading
    it back in chunks: no in-memory copies of the whole checkpoint, and less time holding the
    GIL in the writer thread (which slows the training thread beside it). A failed write (a
    full disk) removes its temporary file and leaves the earlier checkpoints as they were.
    ``delay_s`` is fault injection: the write waits that long before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path) as fh:
        try:
            torch.save(state, fh)
        except RuntimeError as exc:  # torch's writer hides the OSError (a full disk) here
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise
        fh.flush()
        digest = content_hash(Path(fh.name))
        if delay_s:
            time.sleep(delay_s)
    write_checksum(path, digest)


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when ``path`` and its checksum agree, else the reason it is not valid."""
    if not path.is_file():
        return "file not found"
    if not checksum_path(path).is_file():
        return "no checksum file (incomplete write)"
    if content_hash(path) != read_checksum(path):
        return "checksum mismatch (corrupt or truncated)"
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True`` (no arbitrary pickles)."""
    path = Path(path)
    if verify:
        problem = verify_checkpoint(path)
        if problem == "no checksum file (incomplete write)" and path.is_file():
            log.warning("checkpoint %s has no checksum file; loading it unverified", path)
        elif problem is not None:
            raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file not found") from None
    except Exception as exc:  # unpickling refused or corrupt archive: one clear line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a pipeline checkpoint (format version)")
    return state


def find_latest(
    root: Path, *, run_id: str | None = None, model_hash: str | None = None
) -> Path | None:
    """Newest valid ``step-*.pt`` under ``root`` (recursively), skipping invalid ones loudly;
    with ``run_id``, the newest of that MLflow run; with ``model_hash``, the newest written for
    that model configuration (others are skipped with a warning: they cannot be resumed)."""
    candidates = [p for p in root.glob("**/checkpoints/step-*.pt") if _STEP_FILE.match(p.name)]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None and model_hash is not None:
            try:
                found = read_entry(path, "model_hash")
            except Exception as exc:  # a valid checksum over a file torch cannot read
                found, problem = None, f"cannot be loaded ({type(exc).__name__})"
            if problem is None and found != model_hash:
                problem = f"written for another model configuration (model hash {found})"
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", path, problem)
        elif run_id is None or read_entry(path, "run_id") == run_id:
            return path
    return None


def read_entry(path: Path, key: str) -> Any:
    """One entry of a checkpoint without reading its tensors (a memory-mapped load)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)


class HostSnapshot:
    """Device-to-host snapshots into pinned host buffers that are reused from save to save.

    A CUDA tensor is copied with ``copy_(..., non_blocking=True)`` on the current stream, so
    the training thread only enqueues copies: later kernels (the next optimizer step) run after
    them on the same stream and cannot change what is copied. ``ready()`` waits for the copies;
    the writer thread calls it before serialising. A buffer is reused only after the previous
    write finished (the manager waits for it before the next save). CPU tensors are cloned.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._event: torch.cuda.Event | None = None

    def take(self, value: Any) -> Any:
        self._event = None
        state = self._copy(value, ())
        if self._event is not None:
            self._event.record()
        return state

    def ready(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def _copy(self, value: Any, path: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if tensor.device.type != "cuda":
                return tensor.to("cpu", copy=True)
            key = (path, tuple(tensor.shape), tensor.dtype)
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._buffers[key] = buffer
            buffer.copy_(tensor, non_blocking=True)
            if self._event is None:
                self._event = torch.cuda.Event()
            return buffer
        if isinstance(value, dict):
            return {k: self._copy(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, (*path, i)) for i, v in enumerate(value))
        return value


class CheckpointManager:
    """Writes ``step-N.pt`` files into ``directory``, keeps the newest ``keep_last``.

    ``save(..., blocking=False)`` returns once the device-to-host copies are enqueued
    (:class:`HostSnapshot`); the write happens in a background thread (one at a time).
    ``wait()`` joins it; the trainer calls it before exit.
    ``on_written(path)`` runs where the write ran, once the checkpoint and its checksum are
    complete (the trainer hands it to the tracker for upload).

    ``writer="process"`` serialises background saves in a writer process
    (:mod:`pipeline.train.checkpoint_process`) instead of the thread, so that ``torch.save``'s
    GIL time does not slow the training thread; the thread still waits for it and runs
    ``on_written``. Blocking saves (the last one of a run) are written in the caller's thread
    either way. :meth:`close` ends the writer process.
    """

    def __init__(
        self,
        directory: Path,
        *,
        keep_last: int = 2,
        on_written: Callable[[Path], None] | None = None,
        write_delay_s: float = 0.0,
        writer: Literal["thread", "process"] = "thread",
    ):
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', but got {writer!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.on_written = on_written
        self.write_delay_s = write_delay_s
        self._process: WriterProcess | None = None
        if writer == "process":
            self._snapshot: HostSnapshot | PackedSnapshot = PackedSnapshot()
            self._process = WriterProcess()  # imports torch while training starts up
            log.info("checkpoints are serialised by writer process %s", self._process.pid)
        else:
            self._snapshot = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed_path: Path | None = None
        self.last_path: Path | None = None  # the newest step checkpoint asked for
        self.last_good: Path | None = None  # the newest step checkpoint completely written

    def save(
        self, state: dict, step: int, *, blocking: bool = False, name: str | None = None
    ) -> Path:
        """Write ``step-N.pt`` (or ``name``, e.g. ``best.pt``, which is never pruned)."""
        self.wait()  # also frees the host buffers of the previous snapshot for reuse
        state = self._snapshot.take({**state, "format_version": FORMAT_VERSION})
        path = self.directory / (name or f"step-{step:08d}.pt")
        if name is None:
            self.last_path = path
        if blocking:
            self._write(path, state, background=False)
            self.wait()  # its error, now
        else:
            self._thread = threading.Thread(
                target=self._write, args=(path, state, True),
                name="checkpoint-writer", daemon=False,
            )
            self._thread.start()
        return path

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                good = self.last_good or find_latest(self.directory)
                raise DiskFullError(
                    f"checkpoint {self._failed_path}: no space left on device; the last good "
                    f"checkpoint is {good or 'none'} (free space, then `train --resume auto`)"
                ) from error
            raise error

    def close(self) -> None:
        """End the writer process (after the write in flight; its error is left to
        :meth:`wait`). Saves after this are written by the thread."""
        if self._thread is not None:
            self._thread.join()
        if self._process is not None:
            self._process.close()
            self._process = None

    def _write(self, path: Path, state: dict | Packed, background: bool) -> None:
        try:
            self._snapshot.ready()
            self._write_state(path, state, background)
            if _STEP_FILE.match(path.name):
                self.last_good = path
            self._prune()
            if self.on_written is not None:
                self.on_written(path)
        except BaseException as exc:  # surfaced to the training thread by wait()
            self._error, self._failed_path = exc, path

    def _write_state(self, path: Path, state: dict | Packed, background: bool) -> None:
        """A background save goes to the writer process if there is one; a blocking save, or
        one after the writer process died, is written here."""
        process = self._process
        if background and process is not None:
            try:
                process.write(path, state, delay_s=self.write_delay_s)
                return
            except WriterDied as exc:
                log.warning("%s; writing checkpoints in the training process from now on", exc)
                self._process = None
        if isinstance(state, Packed):
            state = state.unpack()
        write_checkpoint(path, state, delay_s=self.write_delay_s)

    def _prune(self) -> None:
        steps = sorted(p for p in self.directory.glob("step-*.pt") if _STEP_FILE.match(p.name))
        for old in steps[: -self.keep_last]:
            checksum_path(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
