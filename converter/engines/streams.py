"""Background threads of the streaming engine: a read-ahead producer and a safetensors writer with its hasher,
handing work on through queues bounded in bytes, so that memory follows the size of a layer, not of the model."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..sources.pread import tensor_bytes
from ..sources.safetensors import DTYPE_NAMES

WRITEBACK_STEP = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing these bytes to disk now (Linux ``sync_file_range``; no waiting), so that the
    final fsync finds little left to do. Elsewhere a no-op."""
    fn = getattr(_LIBC, "sync_file_range", None)
    if fn is not None:
        fn(ctypes.c_int(fd), ctypes.c_int64(offset), ctypes.c_int64(nbytes), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


IN_FLIGHT_BYTES = 64 << 20  # bytes a stage may hand on before the next one has consumed them (per stage)


class ByteBudget:
    """Bounds the bytes one thread has handed to the next and that are not consumed yet, so that memory does not
    grow with the size of the items: ``acquire(n)`` waits while others hold the budget (an item larger than the
    whole budget still passes, alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Take ``nbytes``; False (nothing taken) if ``stop`` is set while waiting."""
        with self._cond:
            while self.held > 0 and self.held + nbytes > self.limit:
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()


def _nbytes(block: Any) -> int:
    return block.numel() * block.element_size() if isinstance(block, torch.Tensor) else len(block)


class SafetensorsStream:
    """Writes a safetensors file whose tensors are known up front; bytes are appended in header order by a
    background writer thread, and hashed (sha256) by a second one, so neither pass holds up the producer."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict,
        release: Any = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.order = []
        for name, dtype, shape in entries:
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.sha = path, hashlib.sha256()
        self._release = release or (lambda tensor: None)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._queue: queue.Queue = queue.Queue()
        self._hash_queue: queue.Queue = queue.Queue()
        self._budget = ByteBudget(IN_FLIGHT_BYTES)  # queued for writing or hashing
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._hasher = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()
        self._hasher.start()
        self._put(len(raw).to_bytes(8, "little") + raw)
        self._expected = iter(self.order)
        self._current: tuple[str, int] | None = None
        self._left = 0

    @staticmethod
    def _bytes(block: Any) -> Any:
        return tensor_bytes(block) if isinstance(block, torch.Tensor) else block

    def _drain(self) -> None:
        written = flushed = 0
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    written += self._fh.write(self._bytes(block))
                    if written - flushed >= WRITEBACK_STEP:
                        _start_writeback(self._fh.fileno(), flushed, written - flushed)
                        flushed = written
                except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                    self._error = exc
            self._hash_queue.put(block)
        self._hash_queue.put(None)
        if self._error is None:
            try:  # flush this file to disk now, while the next one is produced
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _hash(self) -> None:
        while (block := self._hash_queue.get()) is not None:
            self.sha.update(self._bytes(block))
            self._budget.release(_nbytes(block))
            if isinstance(block, torch.Tensor):
                self._release(block)

    def _put(self, block: Any) -> None:
        if self._error is not None:
            raise self._error
        self._budget.acquire(_nbytes(block))
        self._queue.put(block)

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (a whole tensor or the next rows of it)."""
        if self._left == 0:
            self._current = next(self._expected)
            self._left = self._current[1]
        if name != self._current[0]:
            raise RuntimeError(f"expected {self._current[0]}, got {name}")
        piece = piece.detach().to("cpu").contiguous()
        self._left -= piece.numel() * piece.element_size()
        self._put(piece)

    def finish(self) -> None:
        """No more tensors: the background thread writes what is queued, then fsyncs the file."""
        self._queue.put(None)

    def close(self) -> str:
        """Wait for the file to be written and fsynced; return its sha256; raise the writer's error if any."""
        self._thread.join()
        self._hasher.join()
        self._fh.close()
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        self._hasher.join()
        self._fh.close()


class ReadAhead:
    """Runs a generator on a background thread, ahead of the consumer by at most ``limit`` bytes of items (as
    ``size`` counts them; one item at least).

    Reading and checking the sources (``pread``, CRC-32) then overlaps with merging and casting on the calling
    thread. An exception in the generator is raised by ``next()`` in the consumer; ``close()`` stops it early.
    """

    def __init__(self, items: Iterator[Any], size: Any = lambda item: 1, limit: int = IN_FLIGHT_BYTES) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._size = size
        self._budget = ByteBudget(limit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="ckpt2hf-read", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._budget.acquire(self._size(item), self._stop):
                    return
                self._queue.put(("item", item))
            self._queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(("error", exc))

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        self._budget.release(self._size(value))
        return value

    def close(self) -> None:
        """Stop reading ahead and wait for the thread to end."""
        self._stop.set()  # a producer waiting for budget sees it within 0.1 s
        self._thread.join()
