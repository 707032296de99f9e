"""Reading tensor bytes straight from files with ``pread``, in bounded chunks, checking CRC-32s on the way.

Memory-mapped tensors are convenient, but every page touched counts towards the process's resident memory until
the mapping goes away; the engines instead read each tensor (or a slice of its rows) into a buffer of their own,
lent from a small pool, and hand it back after use. A ``Span`` says where a tensor's bytes are; it comes from a
torch zip record (see ``torchfile``) or from a safetensors header (see ``safetensors``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import timings
from ..errors import ConvertError
from .crc import CrcLanes, crc32_combine

CHUNK_BYTES = 8 << 20
POOL_BYTES = 128 << 20
# A read of a large tensor is split over this many threads (pieces of PARALLEL_PIECE bytes and more): one thread
# copies from the page cache at a few GB/s, which alone would bound a conversion on a fast disk and GPU.
READ_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_PIECE = 16 << 20


@dataclasses.dataclass(frozen=True)
class Record:
    """A zip record holding tensor data: where its bytes are and the CRC-32 the zip stores for them."""

    name: str
    offset: int
    nbytes: int
    crc: int


@dataclasses.dataclass(frozen=True)
class Span:
    """A contiguous tensor stored in a file: ``nbytes`` bytes at ``offset``, optionally inside a CRC'd record."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    record: Record | None = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return numel(self.shape[1:]) * self.dtype.itemsize if self.shape else self.dtype.itemsize

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def covers_record(self) -> bool:
        r = self.record
        return r is not None and self.offset == r.offset and self.nbytes == r.nbytes

    @property
    def stored_crc(self) -> int | None:
        """The CRC-32 the file stores for exactly these bytes (no data read), when the span is its whole record.

        Equal bytes have equal CRC-32s, so two spans whose stored CRC-32s differ cannot hold the same bytes. The
        stored value is checked against the data whenever the record is read.
        """
        return self.record.crc if self.covers_record else None


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


class BufferPool:
    """Buffers lent out and handed back, the freed ones kept for reuse up to ``pool_bytes``: reusing them saves the
    kernel zeroing fresh pages for every chunk and every merged layer. Thread-safe; a buffer lent to several holders
    (``hold``) goes back when the last one releases it."""

    def __init__(self, chunk_bytes: int, pool_bytes: int) -> None:
        self.chunk_bytes, self.pool_bytes = chunk_bytes, pool_bytes
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._refs: dict[int, int] = {}
        self._lock = threading.Lock()

    def lend(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (the smallest free one that fits, else a new one)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8, device="cpu")
        with self._lock:
            self._lent[buf.data_ptr()] = buf
            self._refs[buf.data_ptr()] = 1
        return buf

    def release(self, tensor: torch.Tensor) -> None:
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            if ptr not in self._lent:
                return
            self._refs[ptr] -= 1
            if self._refs[ptr] > 0:
                return
            del self._refs[ptr]
            self._free.append(self._lent.pop(ptr))
            while sum(b.numel() for b in self._free) > self.pool_bytes:
                self._free.pop(0)  # the oldest goes back to the allocator

    def hold(self, tensor: torch.Tensor) -> None:
        """One more holder of a lent buffer (the CRC-32 worker, say)."""
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            if ptr in self._lent:
                self._refs[ptr] += 1


def _pread_piece(path: Path, fd: int, offset: int, view: memoryview, crc: bool) -> int | None:
    _pread_all(path, fd, offset, view)
    return zlib.crc32(view) if crc else None


def _pread_all(path: Path, fd: int, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` (``pread`` may read less than asked for)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ConvertError(f"{path}: ends before the tensor data at byte {offset + done}; truncated")
        done += n


class SpanReader:
    """Reads spans with ``os.pread`` into pooled buffers; verifies each zip record's CRC-32 when it is read whole.

    ``chunk_bytes``: the size of the pieces ``chunks`` yields. 4, 8, 16 and 32 MB took the same time on the
    Qwen3-0.6B-shaped bench run (2 cores); the smaller the chunks, the less memory the threads' queues hold.
    ``pool_bytes``: how much of the buffers handed back with ``release`` is kept for reuse; reusing them saves the
    kernel zeroing fresh pages for every chunk and every merged layer.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, pool_bytes: int = POOL_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.pool_bytes = pool_bytes
        self._fds: dict[Path, int] = {}
        self.pool = BufferPool(chunk_bytes, pool_bytes)
        self._lock = threading.Lock()
        self._crcs = CrcLanes()  # wait_crc() collects their verdicts
        self._claimed: set[tuple[Path, int]] = set()  # (file, record offset): records checked or being checked
        self._readers: ThreadPoolExecutor | None = None  # the other threads of a large read

    def close(self) -> None:
        self._crcs.close()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SpanReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_crc(self) -> None:
        """Wait for the CRC-32 checks submitted so far; raise ConvertError for the first record that failed."""
        self._crcs.wait()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:  # several threads may read at once (the streaming engine's read-back)
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def pread(self, path: Path, offset: int, out: torch.Tensor, crc: bool = False) -> int | None:
        """Fill the contiguous CPU tensor ``out`` with the file's bytes from ``offset`` (a large one on several
        threads at once, ``READ_THREADS``); with ``crc``, return the CRC-32 of the bytes read, each thread's piece
        checked while it is fresh in the CPU's cache."""
        view = tensor_bytes(out)
        fd = self._fd(path)
        pieces = min(READ_THREADS, len(view) // PARALLEL_PIECE)
        with timings.timed("reading"):
            if pieces < 2:
                return _pread_piece(path, fd, offset, view, crc)
            step = -(-len(view) // pieces)
            step += -step % 4096  # page-aligned pieces
            with self._lock:
                if self._readers is None:
                    self._readers = ThreadPoolExecutor(READ_THREADS - 1, thread_name_prefix="ckpt2hf-pread")
            starts = range(step, len(view), step)
            futures = [
                self._readers.submit(_pread_piece, path, fd, offset + s, view[s : s + step], crc) for s in starts
            ]
            total = _pread_piece(path, fd, offset, view[:step], crc)
            for start, future in zip(starts, futures, strict=True):
                piece = future.result()
                if crc:
                    total = crc32_combine(total, piece, min(step, len(view) - start))
            return total

    # --- buffers -------------------------------------------------------------------------------------------
    def lend(self, nbytes: int) -> torch.Tensor:
        """A pooled uint8 buffer of at least ``nbytes``; hand it (or any view of it) back with ``release``."""
        return self.pool.lend(nbytes)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back a pooled buffer once every holder has (a no-op for any other tensor); thread-safe."""
        self.pool.release(tensor)

    # --- reads ---------------------------------------------------------------------------------------------
    def rows(self, span: Span, start: int, stop: int, pooled: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor (the whole tensor for a 0-d one), as a CPU tensor; nothing checked.

        ``pooled``: the tensor may live in a reused buffer; hand it back with ``release`` once consumed.
        """
        return self._rows(span, start, stop, pooled)[0]

    def _rows(
        self, span: Span, start: int, stop: int, pooled: bool, crc: bool = False
    ) -> tuple[torch.Tensor, int | None]:
        shape = (stop - start, *span.shape[1:]) if span.shape else ()
        nbytes = numel(shape) * span.dtype.itemsize
        if pooled and nbytes > 0:
            out = self.lend(nbytes)[:nbytes].view(span.dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=span.dtype, device="cpu")
        return out, self.pread(span.path, span.offset + start * span.row_bytes, out, crc)

    def read(self, span: Span, check_now: bool = False, pooled: bool = False) -> torch.Tensor:
        """The whole tensor, in a buffer of its own; its record's CRC-32 is checked.

        ``check_now``: check the CRC-32 before returning (as the bytes are read, on the reading threads), so that
        the caller may modify the tensor in place; otherwise the check runs on a CRC-32 thread and the caller must
        not modify it. ``pooled``: the buffer is lent from the pool; hand it back with ``release`` once consumed.
        """
        covers = self.claim(span, whole=True)
        tensor, crc = self._rows(span, 0, span.rows, pooled, crc=covers and check_now)
        if not covers:
            self.check_record(span)
        elif check_now:
            self.verify(span, crc)
        else:
            self.crc_async(span, tensor, first=True, last=True)
        return tensor

    def chunks(
        self, span: Span, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows)`` over the tensor in pieces of at most ``chunk_bytes`` (or ``step`` rows each);
        checks the CRC-32. ``pooled``: pieces are pooled buffers that the consumer hands back with ``release``."""
        total = span.rows
        step = step or self.rows_per_chunk(span)
        covers = self.claim(span, whole=True)
        for start in range(0, total, step):
            stop = min(total, start + step)
            piece = self.rows(span, start, stop, pooled) if span.shape else self.rows(span, 0, 1)
            if covers:
                self.crc_async(span, piece, first=start == 0, last=stop == total)
            yield start, stop, piece
        if not covers:
            self.check_record(span)

    def rows_per_chunk(self, span: Span) -> int:
        return max(1, self.chunk_bytes // max(1, span.row_bytes))

    def crc(self, span: Span, start: int = 0, stop: int | None = None) -> int:
        """CRC-32 of the span's bytes (of rows ``start:stop`` only, if given), read in pooled chunks (nothing is
        verified or claimed)."""
        stop = span.rows if stop is None else stop
        crc, step = 0, self.rows_per_chunk(span)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            piece = self.rows(span, first, last, pooled=True) if span.shape else self.rows(span, 0, 1)
            crc = zlib.crc32(tensor_bytes(piece), crc)
            self.release(piece)
        return crc

    # --- CRC-32 checks -------------------------------------------------------------------------------------
    def claim(self, span: Span, whole: bool) -> bool:
        """Claim the span's record for checking; True when this read covers it whole and nobody checks it yet."""
        r = span.record
        if r is None or (whole and not span.covers_record):
            return False
        with self._lock:
            if (span.path, r.offset) in self._claimed:
                return False
            self._claimed.add((span.path, r.offset))
        return True

    def crc_async(self, span: Span, piece: torch.Tensor, first: bool, last: bool) -> None:
        """Fold ``piece`` into its record's CRC-32 on a worker thread; check the record after its last piece. The
        pieces of one record must come from one thread, in order (``chunks`` and ``read`` do so)."""
        self.pool.hold(piece)
        self._crcs.submit(
            (span.path, span.record.offset),
            tensor_bytes(piece),
            first,
            last,
            lambda crc: self.verify(span, crc),
            lambda: self.release(piece),
        )

    def check_record(self, span: Span) -> None:
        """CRC-32 of the span's whole record, read in chunks (for tensors that share a record or cover part of it);
        a record is checked once per reader."""
        r = span.record
        if r is None or not self.claim(span, whole=False):
            return
        crc, done = 0, 0
        with timings.timed("reading"):
            while done < r.nbytes:
                n = min(self.chunk_bytes, r.nbytes - done)
                buf = os.pread(self._fd(span.path), n, r.offset + done)
                if len(buf) != n:
                    raise ConvertError(f"{span.path}: {r.name} is truncated")
                crc = zlib.crc32(buf, crc)
                done += n
        self.verify(span, crc)

    def verify(self, span: Span, crc: int) -> None:
        r = span.record
        if crc != r.crc:
            raise ConvertError(
                f"{span.path}: tensor data in {r.name} fails its CRC-32 check (stored {r.crc:08x}, computed "
                f"{crc:08x}); the file is corrupt; re-copy it"
            )
