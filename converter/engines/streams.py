"""The engines' writing, and the streaming engine's threads: a read-ahead producer and a safetensors writer with
its hasher, handing work on through queues bounded in bytes, so that memory follows the size of a layer, not of the
model. Both engines write every safetensors file through ``SafetensorsStream``: its copier gathers the bytes (from
host memory, or straight from the GPU into buffers it page-locks for the driver) into a few aligned staging
buffers, and each full buffer goes at once to a disk thread, which writes it straight to the disk (``O_DIRECT``,
where the file system takes it: the kernel then neither copies it into page-cache pages nor writes those back
later), and to a hasher, which hashes it meanwhile (never re-read). So the disk is never left idle while bytes are
copied or hashed, and a finished shard's hasher keeps running while the next shard is produced. Which files a part
has, and how many are written at once, is ``shards``'s."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import timings
from ..hashing import BufferHash
from ..names import BUFFERED_WRITES
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


STAGE_BYTES = 16 << 20  # one staging buffer: a multiple of any file system's direct-I/O alignment
STAGES = 3  # staging buffers per file: one being filled, the others with the disk and the hasher
DIRECT_ALIGN = 4096


class DiskFile:
    """A file written front to back from page-aligned staging buffers: with ``O_DIRECT`` where the file system
    allows it (full buffers straight to the disk; the last partial block through the page cache), else buffered,
    with writeback started every ``WRITEBACK_STEP`` bytes. ``direct`` says which."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct = -1
        flag = getattr(os, "O_DIRECT", 0)
        if flag and os.environ.get(BUFFERED_WRITES) != "1":
            with contextlib.suppress(OSError):  # tmpfs and some others refuse O_DIRECT: buffered then
                self._direct = os.open(path, os.O_WRONLY | flag)
        self.written = self._flushed = 0

    @property
    def direct(self) -> bool:
        return self._direct >= 0

    def write(self, block: memoryview) -> None:
        """Append ``block`` (from a staging buffer: page-aligned, a multiple of ``DIRECT_ALIGN`` bytes unless it is
        the file's last)."""
        aligned = len(block) - len(block) % DIRECT_ALIGN if self.direct else 0
        if aligned:
            try:
                self._pwrite(self._direct, block[:aligned])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._stop_direct()  # the file system takes O_DIRECT but not these writes: buffered from here
                aligned = 0
        self._pwrite(self._fd, block[aligned:])
        if not self.direct and self.written - self._flushed >= WRITEBACK_STEP:
            _start_writeback(self._fd, self._flushed, self.written - self._flushed)
            self._flushed = self.written

    def _pwrite(self, fd: int, data: memoryview) -> None:
        done = 0
        while done < len(data):  # a write to a file may be short
            done += os.pwrite(fd, data[done:], self.written + done)
        self.written += done

    def _stop_direct(self) -> None:
        os.close(self._direct)
        self._direct = -1

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self.direct:
            self._stop_direct()
        os.close(self._fd)


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


def _on_device(block: Any) -> bool:
    return isinstance(block, torch.Tensor) and block.device.type != "cpu"


DEVICE_IN_FLIGHT_BYTES = 512 << 20  # accelerator memory the producer may hand on before the copiers have copied it


class Budgets:
    """The byte budgets of one set of streams: for blocks in host memory (``IN_FLIGHT_BYTES``: they count towards
    the process's resident memory) and for blocks still on an accelerator (``DEVICE_IN_FLIGHT_BYTES``: the copier
    copies them to the host itself, so the producer goes on merging while they are copied)."""

    def __init__(self, host: int = IN_FLIGHT_BYTES, device: int = DEVICE_IN_FLIGHT_BYTES) -> None:
        self.host, self.device = ByteBudget(host), ByteBudget(device)

    def of(self, block: Any) -> ByteBudget:
        return self.device if _on_device(block) else self.host


def _cuda_register(target: torch.Tensor) -> bool:
    """Page-lock a staging buffer for the CUDA driver (``cudaHostRegister``), so that copies from the GPU into it run
    by DMA at the bus's speed, not through the driver's own bounce buffer; False where the driver refuses."""
    cudart = torch.cuda.cudart()
    return cudart.cudaHostRegister(target.data_ptr(), target.numel(), 0) == cudart.cudaError.success


def _page_lock(stages: list[mmap.mmap], target: Any) -> dict[int, int]:
    """Page-lock the staging buffers (at a stream's first block on a CUDA device): id of a buffer -> its address."""
    locked = {}
    for stage in stages:
        tensor = target(stage)
        if _cuda_register(tensor):
            locked[id(stage)] = tensor.data_ptr()
    return locked


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class SafetensorsStream:
    """Writes a safetensors file whose tensors are known up front, on three threads of its own: a copier gathers the
    producer's bytes, in header order, into staging buffers; each full buffer goes both to a disk thread, which writes
    it (``DiskFile``), and to a ``BufferHash``, which hashes it meanwhile; the buffer is free again once both are done
    with it. Neither the disk nor the hash holds up the producer, and the disk is not left idle while the next buffer
    is filled. The producer's blocks go back (``release``) as soon as they are copied into a staging buffer."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict,
        release: Any = None,
        budgets: Budgets | None = None,
    ) -> None:
        """``budgets``: bound the bytes queued for writing and not yet copied (shared by the streams of one
        ``FileSet``); budgets of its own by default."""
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
        self._file = DiskFile(path)
        self._hash = BufferHash()
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # staging buffers neither queued, written nor hashed
        self._copied = False  # the copier is done: buffers the disk and the hasher give back are dropped
        self._stage_lock = threading.Lock()
        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(STAGES)]  # anonymous mappings are page-aligned
        for stage in self._stages:
            self._free.put(stage)
        self._targets: dict[int, torch.Tensor] = {}  # id of a staging buffer -> a tensor over it
        self._pinned: dict[int, int] | None = None  # id of a staging buffer -> its address, once page-locked
        self._queue: queue.Queue = queue.Queue()  # the producer's blocks, for the copier
        self._to_disk: queue.SimpleQueue = queue.SimpleQueue()  # full staging buffers, for the disk thread
        self._budgets = budgets or Budgets()  # queued for writing
        self._error: BaseException | None = None
        self._disk = threading.Thread(target=self._write_out, name="ckpt2hf-disk", daemon=True)
        self._disk.start()
        self._thread = threading.Thread(target=self._drain, name="ckpt2hf-write", daemon=True)
        self._thread.start()
        self._put(len(raw).to_bytes(8, "little") + raw)
        self._expected = iter(self.order)
        self._current: tuple[str, int] | None = None
        self._left = 0

    @staticmethod
    def _bytes(block: Any) -> torch.Tensor:
        """The block's bytes, flat (a tensor's row after row), as a uint8 tensor: torch copies them without holding
        the GIL, which the producer and the other files' writers need meanwhile."""
        if isinstance(block, torch.Tensor):
            return block.reshape(-1).view(torch.uint8) if block.numel() else torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(block), dtype=torch.uint8)

    def _drain(self) -> None:
        """The copier: the producer's blocks into staging buffers, each full one handed on (``_hand_on``)."""
        stage, filled = self._free.get(), 0
        try:
            while (block := self._queue.get()) is not None:
                if self._error is None:
                    try:
                        if self._pinned is None and isinstance(block, torch.Tensor) and block.is_cuda:
                            self._pinned = _page_lock(self._stages, self._target)  # the copier alone writes them
                        view = self._bytes(block)
                        done, target = 0, self._target(stage)
                        while done < len(view):
                            n = min(len(view) - done, STAGE_BYTES - filled)
                            with timings.timed("copying"):
                                target[filled : filled + n].copy_(view[done : done + n])
                            filled, done = filled + n, done + n
                            if filled == STAGE_BYTES:
                                self._hand_on(stage, filled)
                                with timings.timed("waiting_for_disk"):
                                    stage, filled = self._free.get(), 0
                                target = self._target(stage)
                    except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                        self._error = exc
                self._budgets.of(block).release(_nbytes(block))
                if isinstance(block, torch.Tensor):
                    self._release(block)
            if self._error is None and filled:
                self._hand_on(stage, filled)
        finally:
            self._to_disk.put(None)  # the disk thread fsyncs the file (unless something failed) and closes it
            self._hash.finish()
            with self._stage_lock:  # the staging buffers go back to the OS as the disk and the hasher finish
                self._copied = True
                self._free, self._targets, self._stages = queue.SimpleQueue(), {}, []
            for ptr in (self._pinned or {}).values():  # nothing more is copied into them
                _cuda_unregister(ptr)

    def _hand_on(self, stage: mmap.mmap, filled: int) -> None:
        """The staging buffer's ``filled`` bytes to the disk thread and to the hasher at once; the buffer is free
        again once both are done with it."""
        block = memoryview(stage)[:filled]
        users = [2]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                users[0] -= 1
                free = users[0] == 0
            if free:
                with self._stage_lock:
                    if not self._copied:
                        self._free.put(stage)

        self._to_disk.put((block, done))
        self._hash.update(block, done)

    def _write_out(self) -> None:
        """The disk thread: each staging buffer handed on, in order; at the end, the fsync, while the next file is
        produced."""
        try:
            while (item := self._to_disk.get()) is not None:
                block, done = item
                try:
                    if self._error is None:
                        with timings.timed("writing"):
                            self._file.write(block)
                except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                    self._error = exc
                finally:
                    done()
            if self._error is None:
                with timings.timed("writing"):
                    self._file.sync()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        finally:
            self._file.close()

    def _target(self, stage: mmap.mmap) -> torch.Tensor:
        """The staging buffer as a uint8 tensor (made once per buffer)."""
        target = self._targets.get(id(stage))
        if target is None:
            target = self._targets[id(stage)] = torch.frombuffer(stage, dtype=torch.uint8)
        return target

    def _put(self, block: Any) -> None:
        if self._error is not None:
            raise self._error
        with timings.timed("waiting_for_writes"):
            self._budgets.of(block).acquire(_nbytes(block))
        self._queue.put(block)

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (a whole tensor or the next rows of it; on the CPU or a GPU,
        which it must not be changed on until the copier has copied it: the producer hands it over)."""
        if self._left == 0:
            self._current = next(self._expected)
            self._left = self._current[1]
        if name != self._current[0]:
            raise RuntimeError(f"expected {self._current[0]}, got {name}")
        # A block on an accelerator stays there: the copier copies it into its (page-locked) staging buffers.
        piece = piece.detach().contiguous()
        self._left -= piece.numel() * piece.element_size()
        self._put(piece)

    def finish(self) -> None:
        """No more tensors: the background threads write what is queued, then fsync the file."""
        self._queue.put(None)

    def close(self) -> str:
        """Wait for the file to be written, fsynced and hashed; return its sha256; raise the writer's error if
        any."""
        self._thread.join()
        self._disk.join()
        digest = self._hash.result()
        if self._error is not None:
            raise self._error
        return digest

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        self._disk.join()
        with contextlib.suppress(BaseException):
            self._hash.result()


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
