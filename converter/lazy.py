"""Reading tensor bytes straight from files with ``pread``, in bounded chunks, checking CRC-32s on the way.

Memory-mapped tensors are convenient but every page touched counts towards the process's resident memory until
the mapping goes away; the streaming engine instead reads each tensor (or a slice of rows of it) into a fresh
buffer and drops it after use. A ``Span`` says where a tensor's bytes are; it comes from a torch zip record
(see ``unpickle``) or from a safetensors header.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import ConvertError
from .unpickle import Record

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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
        return _numel(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return _numel(self.shape[1:]) * self.dtype.itemsize if self.shape else self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def span_of(tensor: torch.Tensor, path: Path, records: dict[int, Record]) -> Span | None:
    """Where a memory-mapped checkpoint tensor's bytes are, if it is contiguous and backed by a zip record."""
    if not tensor.is_contiguous():
        return None
    record = records.get(tensor.untyped_storage().data_ptr())
    if record is None:
        return None
    offset = record.offset + tensor.storage_offset() * tensor.element_size()
    return Span(path, offset, tensor.dtype, tuple(tensor.shape), record)


def safetensors_spans(path: Path) -> dict[str, Span]:
    """Spans of every tensor in a safetensors file, from its header (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 << 20 or length > path.stat().st_size:
                raise ValueError(f"header length {length} is impossible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ConvertError(f"{path}: not a valid safetensors file ({exc}); re-export or re-copy it") from exc
    spans = {}
    base = 8 + length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, _ = entry["data_offsets"]
        spans[name] = Span(path, base + start, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return spans


class SpanReader:
    """Reads spans with ``os.pread``; verifies each zip record's CRC-32 the first time it is read whole.

    Chunks of 8 MB: on the Qwen3-0.6B-shaped bench run (2 cores) 4, 8, 16 and 32 MB took the same time within the
    machine's noise, and the smaller the chunks the less memory the threads' queues hold.
    """

    def __init__(self, chunk_bytes: int = 8 << 20, pin: bool = False, keep_bytes: int = 128 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self.pin = pin and torch.cuda.is_available()
        self._fds: dict[Path, int] = {}
        # Buffers handed back by release(), up to keep_bytes of them: reusing them saves the kernel zeroing fresh
        # pages for every chunk and every merged layer, for at most keep_bytes of memory kept.
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._refs: dict[int, int] = {}
        self._lock = threading.Lock()
        # CRC-32s run on a worker thread, in submission order; wait_crc() collects the verdicts.
        self._crc_worker: ThreadPoolExecutor | None = None
        self._crc_state: dict[tuple[Path, str], int] = {}
        self._crc_pending: list[Future] = []
        self._claimed: set[tuple[Path, str]] = set()

    def close(self) -> None:
        if self._crc_worker is not None:
            self._crc_worker.shutdown(wait=True, cancel_futures=True)
            self._crc_worker = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def wait_crc(self) -> None:
        """Wait for the CRC-32 checks submitted so far; raise ConvertError for the first record that failed."""
        pending, self._crc_pending = self._crc_pending, []
        for future in pending:
            future.result()

    def __enter__(self) -> SpanReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _pread_into(self, span: Span, buffer: torch.Tensor, offset: int) -> None:
        view = tensor_bytes(buffer)
        fd, done = self._fd(span.path), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConvertError(f"{span.path}: ends before the tensor data at byte {offset + done}; truncated")
            done += n

    def rows(self, span: Span, start: int, stop: int, pooled: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor (the whole tensor for a 0-d one), as a CPU tensor.

        ``pooled``: the tensor may live in a reused chunk buffer; hand it back with ``release`` once consumed.
        """
        shape = (stop - start, *span.shape[1:]) if span.shape else ()
        nbytes = _numel(shape) * span.dtype.itemsize
        if pooled and nbytes > 0:
            out = self._lend(nbytes)[:nbytes].view(span.dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=span.dtype, pin_memory=self.pin)
        self._pread_into(span, out, span.offset + start * span.row_bytes)
        return out

    def _lend(self, nbytes: int) -> torch.Tensor:
        """A pooled buffer of at least ``nbytes`` (the smallest free one that fits, else a new one)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8, pin_memory=self.pin)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
            self._refs[buf.data_ptr()] = 1
        return buf

    def release(self, tensor: torch.Tensor) -> None:
        """Give back a pooled chunk once every holder has (no-op for any other tensor); thread-safe."""
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            if ptr not in self._lent:
                return
            self._refs[ptr] -= 1
            if self._refs[ptr] > 0:
                return
            del self._refs[ptr]
            self._free.append(self._lent.pop(ptr))
            while sum(b.numel() for b in self._free) > self.keep_bytes:
                self._free.pop(0)  # the oldest goes back to the allocator

    def _hold(self, tensor: torch.Tensor) -> None:
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            if ptr in self._lent:
                self._refs[ptr] += 1

    def _crc_async(self, span: Span, piece: torch.Tensor, first: bool, last: bool) -> None:
        """Fold ``piece`` into its record's CRC-32 on the worker thread; check the record after its last piece."""
        key = (span.path, span.record.name)
        self._hold(piece)

        def step() -> None:
            try:
                crc = zlib.crc32(tensor_bytes(piece), 0 if first else self._crc_state[key])
                if last:
                    self._crc_state.pop(key, None)
                    self._verify(span, crc)
                else:
                    self._crc_state[key] = crc
            finally:
                self.release(piece)

        if self._crc_worker is None:
            self._crc_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt2hf-crc")
        self._crc_pending.append(self._crc_worker.submit(step))

    def read(self, span: Span, check_now: bool = False, pooled: bool = False) -> torch.Tensor:
        """The whole tensor, in a buffer of its own; its record's CRC-32 is checked when the span covers the record.

        ``check_now``: check the CRC-32 before returning (on this thread), so that the caller may modify the
        tensor in place; otherwise the check runs on the worker thread and the caller must not modify it.
        ``pooled``: the buffer is lent from the pool; hand it back with ``release`` once consumed.
        """
        rows = span.shape[0] if span.shape else 1
        tensor = self.rows(span, 0, rows, pooled)
        if not self._covers(span):
            self.check_record(span)
        elif check_now:
            self._verify(span, zlib.crc32(tensor_bytes(tensor)))
        else:
            self._crc_async(span, tensor, first=True, last=True)
        return tensor

    def chunks(self, span: Span, pooled: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows)`` over the tensor in pieces of at most ``chunk_bytes``; checks the CRC-32.

        ``pooled``: pieces are pooled chunk buffers that the consumer hands back with ``release``.
        """
        total = span.shape[0] if span.shape else 1
        step = max(1, self.chunk_bytes // max(1, span.row_bytes))
        covers = self._covers(span)
        for start in range(0, total, step):
            stop = min(total, start + step)
            piece = self.rows(span, start, stop, pooled) if span.shape else self.rows(span, 0, 1)
            if covers:
                self._crc_async(span, piece, first=start == 0, last=stop == total)
            yield start, stop, piece
        if not covers:
            self.check_record(span)

    def _covers(self, span: Span) -> bool:
        """True (and the record claimed) when this read covers a record whose CRC-32 nobody checks yet."""
        r = span.record
        if r is None or span.offset != r.offset or span.nbytes != r.nbytes:
            return False
        with self._lock:
            if (span.path, r.name) in self._claimed:
                return False
            self._claimed.add((span.path, r.name))
        return True

    def check_record(self, span: Span) -> None:
        """CRC-32 of the span's whole record, read in chunks (for tensors that share or cover part of it)."""
        r = span.record
        if r is None:
            return
        with self._lock:
            if (span.path, r.name) in self._claimed:
                return
            self._claimed.add((span.path, r.name))
        crc, done = 0, 0
        while done < r.nbytes:
            n = min(self.chunk_bytes, r.nbytes - done)
            buf = os.pread(self._fd(span.path), n, r.offset + done)
            if len(buf) != n:
                raise ConvertError(f"{span.path}: {r.name} is truncated")
            crc = zlib.crc32(buf, crc)
            done += n
        self._verify(span, crc)

    def crc(self, span: Span) -> int:
        """CRC-32 of the span's bytes, read in pooled chunks (nothing is verified or claimed)."""
        crc = 0
        step = max(1, self.chunk_bytes // max(1, span.row_bytes))
        total = span.shape[0] if span.shape else 1
        for start in range(0, total, step):
            stop = min(total, start + step)
            piece = self.rows(span, start, stop, pooled=True) if span.shape else self.rows(span, 0, 1)
            crc = zlib.crc32(tensor_bytes(piece), crc)
            self.release(piece)
        return crc

    def _verify(self, span: Span, crc: int) -> None:
        r = span.record
        if crc != r.crc:
            raise ConvertError(
                f"{span.path}: tensor data in {r.name} fails its CRC-32 check (stored {r.crc:08x}, computed "
                f"{crc:08x}); the file is corrupt; re-copy it"
            )


def stored_crc(span: Span) -> int | None:
    """The CRC-32 the zip stores for the span's bytes, when the span is exactly its record (no data is read).

    Equal bytes have equal CRC-32s, so two spans whose stored CRC-32s differ cannot hold the same bytes. The
    stored value is checked against the data whenever the record is read for the conversion.
    """
    r = span.record
    if r is None or span.offset != r.offset or span.nbytes != r.nbytes:
        return None
    return r.crc


def chunked_equal(reader: SpanReader, a: Span, b: Span) -> tuple[bool, float]:
    """Compare two stored tensors chunk by chunk after rounding both to the narrower dtype.

    Returns (equal, max abs difference in float32).
    """
    if a.shape != b.shape:
        return False, float("inf")
    narrow = a.dtype if a.dtype.itemsize <= b.dtype.itemsize else b.dtype
    equal, diff = True, 0.0
    for start, stop, x in reader.chunks(a, pooled=True):
        y = reader.rows(b, start, stop, pooled=True) if b.shape else reader.rows(b, 0, 1)
        if not torch.equal(x.to(narrow), y.to(narrow)):
            equal = False
            if x.is_floating_point() or y.is_floating_point():
                diff = max(diff, float((x.float() - y.float()).abs().max()))
            else:
                diff = float("inf")
        reader.release(x)
        reader.release(y)
    reader.check_record(b)
    return equal, diff
