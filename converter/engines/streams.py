"""The engines' writing, and the streaming engine's threads: a read-ahead producer and a safetensors writer with
its hasher, handing work on through queues bounded in bytes, so that memory follows the size of a layer, not of the
model. Both engines write every safetensors file through ``SafetensorsStream``: each file is hashed from the bytes
as they are written (never re-read), and a finished shard's hasher keeps running while the next shard is produced,
so the shards of a large export are hashed in parallel."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import timings
from ..hashing import TrailingHash
from ..names import SAFETENSORS_METADATA, SHARD_PATTERN, WEIGHTS, WEIGHTS_INDEX
from ..sources.pread import tensor_bytes
from ..sources.safetensors import DTYPE_NAMES

if TYPE_CHECKING:
    from ..plan import PartPlan

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
    """Writes a safetensors file whose tensors are known up front: bytes are appended in header order by a
    background writer thread, and hashed (sha256) behind it by a ``TrailingHash``, so that neither pass holds up
    the producer."""

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
        self.path = path
        self._release = release or (lambda tensor: None)
        # Unbuffered: every byte the writer has written is in the kernel, where the hasher maps it.
        self._fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._hash = TrailingHash(path)
        self._queue: queue.Queue = queue.Queue()
        self._budget = ByteBudget(IN_FLIGHT_BYTES)  # queued for writing
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="ckpt2hf-write", daemon=True)
        self._thread.start()
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
                    view = self._bytes(block)
                    done = 0
                    with timings.timed("writing"):
                        while done < len(view):  # a write to a file may be short
                            done += self._fh.write(view[done:])
                        written += done
                        self._hash.advance(written)
                        if written - flushed >= WRITEBACK_STEP:
                            _start_writeback(self._fh.fileno(), flushed, written - flushed)
                            flushed = written
                except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                    self._error = exc
            self._budget.release(_nbytes(block))
            if isinstance(block, torch.Tensor):
                self._release(block)
        self._hash.finish(failed=self._error is not None)
        if self._error is None:
            try:  # flush this file to disk now, while the next one is produced
                with timings.timed("writing"):
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _put(self, block: Any) -> None:
        if self._error is not None:
            raise self._error
        with timings.timed("waiting_for_writes"):
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
        """Wait for the file to be written, fsynced and hashed; return its sha256; raise the writer's error if
        any."""
        self._thread.join()
        self._fh.close()
        if self._error is not None:
            with contextlib.suppress(BaseException):
                self._hash.result()
            raise self._error
        return self._hash.result()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        self._fh.close()
        with contextlib.suppress(BaseException):
            self._hash.result()


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """Which tensors go into which safetensors file (huggingface_hub's split: names, order, index)."""

    files: dict[str, list[str]]  # file name -> tensor names, in writing order
    split: Any = None  # huggingface_hub's StateDictSplit when sharding was asked for

    @classmethod
    def of(cls, part: PartPlan) -> FileLayout:
        if part.max_shard_size is None:
            return cls({WEIGHTS: [t.name for t in part.written()]})
        from huggingface_hub import split_state_dict_into_shards_factory

        split = split_state_dict_into_shards_factory(
            {t.name: t for t in part.written()},
            get_storage_size=lambda t: max(1, t.nbytes),
            filename_pattern=SHARD_PATTERN,
            max_shard_size=part.max_shard_size,
        )
        return cls(dict(split.filename_to_tensors), split)

    def write_index(self, folder: Path) -> None:
        """model.safetensors.index.json, when the part is sharded."""
        if self.split is not None and self.split.is_sharded:
            index = {
                "metadata": {**self.split.metadata, **SAFETENSORS_METADATA},
                "weight_map": self.split.tensor_to_filename,
            }
            (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tensors(folder: Path, part: PartPlan, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write tensors already in memory as the part's safetensors file(s) (and index); return file -> sha256."""
    layout = FileLayout.of(part)
    folder.mkdir(parents=True, exist_ok=True)
    streams: dict[str, SafetensorsStream] = {}
    try:
        for filename, names in layout.files.items():
            entries = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
            stream = streams[filename] = SafetensorsStream(folder / filename, entries, dict(SAFETENSORS_METADATA))
            for name in names:
                stream.write(name, tensors[name])
            stream.finish()
        hashes = {filename: stream.close() for filename, stream in streams.items()}
    except BaseException:
        for stream in streams.values():
            stream.abort()
        raise
    layout.write_index(folder)
    return hashes


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
        with timings.timed("waiting_for_reads"):
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
