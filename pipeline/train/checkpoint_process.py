"""Checkpoint writes in a separate process, so that serialising costs the trainer no GIL time.

``torch.save`` pickles a state tensor by tensor in Python code, holding the GIL: for
``small_model`` (634 tensors with the AdamW moments) a background write thread takes 12-17 ms
of the training thread's time, and when that lands on an epoch's first batch the trainer
waits for data (docs/benchmarks.md). Here the training process only copies the state into
one flat host buffer (:class:`PackedSnapshot`: one ``copy_`` per tensor, as the thread
writer's snapshot) and hands the bytes and a small picklable skeleton to a long-lived writer
process through a pipe; the pipe's ``write`` releases the GIL. The writer process rebuilds the
state and calls the same :func:`~pipeline.train.checkpoint.write_checkpoint`, so the file is
byte-for-byte what the thread writer produces (same format, checksum, atomic rename).

Failure handling: an error in the writer process (a full disk, a missing directory) comes
back as an ``OSError`` with its ``errno`` (or a :class:`~pipeline.errors.CheckpointError`) and
is raised where the thread writer's would be. If the writer process dies, :class:`WriterDied`
is raised and the caller writes that checkpoint itself (no checkpoint is lost). The writer
process ignores SIGINT and SIGTERM, which a terminal or a scheduler also sends to the
trainer's children, so that the trainer's own last checkpoint is never cut off; it ends when
the trainer closes the pipe or exits.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.errors import CheckpointError

__all__ = ["PackedSnapshot", "Packed", "WriterDied", "WriterProcess"]

_ALIGN = 64  # bytes; every tensor's slot starts aligned for any dtype's view


class _TensorRef(NamedTuple):
    """Stands for the ``index``-th tensor of a :class:`Packed` state in its skeleton."""

    index: int


class _Slot(NamedTuple):
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Packed(NamedTuple):
    """A state as a skeleton (tensors replaced by :class:`_TensorRef`) and one flat buffer."""

    skeleton: Any
    slots: tuple[_Slot, ...]
    arena: torch.Tensor  # uint8, (nbytes,)

    def unpack(self) -> Any:
        """The state with every tensor an independent copy (for ``torch.save``)."""
        tensors = [_view(self.arena, slot).clone() for slot in self.slots]
        return _fill(self.skeleton, tensors)


def _view(arena: torch.Tensor, slot: _Slot) -> torch.Tensor:
    raw = arena[slot.offset : slot.offset + slot.nbytes]
    return raw.view(slot.dtype).view(slot.shape)


def _map_leaves(value: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    """``value`` (nested dicts, lists, tuples) with every instance of ``leaf`` replaced by
    ``fn(it)``, in depth-first order."""
    if isinstance(value, leaf):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, leaf, fn) for v in value)
    return value


def _fill(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    return _map_leaves(skeleton, _TensorRef, lambda ref: tensors[ref.index])


class PackedSnapshot:
    """Copies a state's tensors into one reused host buffer (pinned when any is on CUDA).

    The buffer and the slot of each tensor are kept while the state's tensors keep their
    shapes and dtypes, so a save costs one ``copy_`` per tensor on the caller's thread
    (non-blocking from CUDA, completed by :meth:`ready`). As with
    :class:`~pipeline.train.checkpoint.HostSnapshot`, the buffer is reused only after the
    previous write finished.
    """

    def __init__(self) -> None:
        self._layout: tuple | None = None
        self._slots: tuple[_Slot, ...] = ()
        self._arena = torch.empty(0, dtype=torch.uint8)
        self._views: list[torch.Tensor] = []
        self._event: torch.cuda.Event | None = None

    def take(self, value: Any) -> Packed:
        tensors: list[torch.Tensor] = []
        skeleton = _strip(value, tensors)
        layout = tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)
        if layout != self._layout:
            self._allocate(tensors)
            self._layout = layout
        self._event = None
        for view, tensor in zip(self._views, tensors):
            view.copy_(tensor, non_blocking=tensor.is_cuda)
            if tensor.is_cuda and self._event is None:
                self._event = torch.cuda.Event()
        if self._event is not None:
            self._event.record()
        return Packed(skeleton, self._slots, self._arena)

    def ready(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def _allocate(self, tensors: list[torch.Tensor]) -> None:
        slots, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            slots.append(_Slot(offset, nbytes, t.dtype, tuple(t.shape)))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        pin = any(t.is_cuda for t in tensors)
        self._arena = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        self._slots = tuple(slots)
        self._views = [_view(self._arena, slot) for slot in slots]


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each tensor replaced by a :class:`_TensorRef`; tensors appended."""

    def ref(tensor: torch.Tensor) -> _TensorRef:
        tensors.append(tensor.detach())
        return _TensorRef(len(tensors) - 1)

    return _map_leaves(value, torch.Tensor, ref)


class WriterDied(RuntimeError):
    """The writer process is gone; the caller writes the checkpoint itself."""


class WriterProcess:
    """A long-lived child process that writes :class:`Packed` states, one at a time.

    Started with the ``spawn`` method: the child imports torch afresh and never touches the
    trainer's CUDA context. ``write`` blocks its (background) caller until the file and its
    checksum are complete.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(child_conn,), name="checkpoint-writer", daemon=True
        )
        self._process.start()
        child_conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def write(self, path: Path, packed: Packed, *, delay_s: float = 0.0) -> None:
        nbytes = packed.arena.numel()
        try:
            self._conn.send((str(path), delay_s, packed.skeleton, packed.slots, nbytes))
            if nbytes:
                self._conn.send_bytes(packed.arena.numpy())  # os.write: the GIL is released
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise WriterDied(f"checkpoint writer process is gone ({exc!r})") from exc
        if reply[0] == "error":
            _, kind, err, message, filename = reply
            if err is not None:
                raise OSError(err, message, filename)
            raise CheckpointError(f"checkpoint {path}: {kind}: {message}")

    def close(self, timeout: float = 10.0) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._conn.close()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve(conn) -> None:
    """The writer process: receive, rebuild, write, reply; until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    from pipeline.train.checkpoint import write_checkpoint

    buffer = bytearray()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        path, delay_s, skeleton, slots, nbytes = message
        arena = torch.empty(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
        if nbytes:
            if len(buffer) != nbytes:
                buffer = bytearray(nbytes)
            try:
                conn.recv_bytes_into(buffer)
            except (EOFError, OSError):
                return  # the pipe broke mid-message: the trainer is gone
            arena = torch.frombuffer(buffer, dtype=torch.uint8)
        try:
            write_checkpoint(Path(path), Packed(skeleton, slots, arena).unpack(), delay_s=delay_s)
            reply = ("ok",)
        except OSError as exc:
            reply = ("error", type(exc).__name__, exc.errno, exc.strerror or str(exc), exc.filename)
        except Exception as exc:  # noqa: BLE001 - sent back and raised in the trainer
            reply = ("error", type(exc).__name__, None, str(exc), None)
        try:
            conn.send(reply)
        except OSError:
            return
