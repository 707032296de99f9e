"""Tensors stored in pieces: runs of elements in several places (the partitions of several ranks), read and
checked as one tensor. DeepSpeed ZeRO and torch.distributed.checkpoint folders are sources of this kind."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import ConvertError
from .base import SpanSource, TensorInfo
from .pread import Span, SpanReader, numel, tensor_bytes


@dataclasses.dataclass(frozen=True)
class Pieces:
    """A tensor whose elements are the first ``numel(shape)`` elements of its runs, concatenated in order.

    Each run is a 1-D span of ``dtype`` elements inside a record of a file (padding after the last element is
    allowed: partitions are padded to equal sizes).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: tuple[Span, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)


def slice_runs(runs: Sequence[Span], start: int, count: int) -> tuple[Span, ...]:
    """Elements ``start .. start+count`` of the concatenation of ``runs``, as runs (cut at their boundaries)."""
    out, position = [], 0
    for run in runs:
        size = run.shape[0]
        lo, hi = max(start, position), min(start + count, position + size)
        if lo < hi:
            skip = lo - position
            out.append(Span(run.path, run.offset + skip * run.dtype.itemsize, run.dtype, (hi - lo,), run.record))
        position += size
        if position >= start + count:
            break
    return tuple(out)


class PiecedSource(SpanSource):
    """A ``SpanSource`` whose tensors may also be ``Pieces``. ``order`` gives the keys' order; ``origins`` says where
    each key's data is (for ``inspect``)."""

    def __init__(
        self,
        path: Path,
        reader: SpanReader,
        spans: Mapping[str, Span],
        pieces: Mapping[str, Pieces],
        order: Sequence[str],
        origins: Mapping[str, str] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        records: Mapping[str, Span] | None = None,
    ) -> None:
        super().__init__(path, reader, spans, tensors, records)
        self.pieces = dict(pieces)
        self._keys = list(order)
        self.origins = dict(origins or {})
        for key, p in self.pieces.items():
            available = sum(run.shape[0] for run in p.runs)
            if available < p.numel:
                raise ConvertError(
                    f"{self.path}: {key} needs {p.numel} elements, its partitions hold {available}; the files are "
                    "truncated or come from different runs"
                )

    def origin(self, key: str) -> str:
        return self.origins.get(key) or super().origin(key)

    def info(self, key: str) -> TensorInfo:
        p = self.pieces.get(key)
        if p is None:
            return super().info(key)
        return TensorInfo(p.dtype, p.shape)

    def _gather(self, p: Pieces, start: int, stop: int, pooled: bool) -> tuple[torch.Tensor, list[tuple[Span, int]]]:
        """Elements ``start:stop`` (flat) in a buffer of their own, and each run's slice that went into it with its
        position in the buffer."""
        count, itemsize = stop - start, p.dtype.itemsize
        raw = (
            self.reader.lend(count * itemsize)
            if pooled and count
            else torch.empty(count * itemsize, dtype=torch.uint8, device="cpu")
        )
        out = raw[: count * itemsize].view(p.dtype)
        parts, position = [], 0
        for part in slice_runs(p.runs, start, count):
            n = part.shape[0]
            self.reader.pread(part.path, part.offset, out[position : position + n])
            parts.append((part, position))
            position += n
        return out, parts

    def _checked_runs(self, p: Pieces) -> dict[tuple[Path, int], Span]:
        """The runs whose record this tensor reads whole and nobody checks yet (claimed here): their CRC-32s are
        computed from the bytes as they are read. Every other run's record is checked by reading it."""
        claimed = {}
        for run in slice_runs(p.runs, 0, p.numel):
            if run.covers_record and self.reader.claim(run, whole=True):
                claimed[(run.path, run.offset)] = run
            else:
                self.reader.check_record(run)
        return claimed

    def _crc_parts(self, claimed: dict, out: torch.Tensor, parts: list[tuple[Span, int]], now: bool) -> None:
        for part, position in parts:
            run = claimed.get((part.path, part.record.offset)) if part.record is not None else None
            if run is None:
                continue
            piece = out[position : position + part.shape[0]]
            first = part.offset == run.offset
            last = part.offset + part.nbytes == run.offset + run.nbytes
            if now:
                self.reader.verify(run, zlib.crc32(tensor_bytes(piece)))
            else:
                self.reader.crc_async(run, piece, first=first, last=last)

    def read(self, key: str, *, writable: bool = False, pooled: bool = False) -> torch.Tensor:
        p = self.pieces.get(key)
        if p is None:
            return super().read(key, writable=writable, pooled=pooled)
        claimed = self._checked_runs(p)
        out, parts = self._gather(p, 0, p.numel, pooled)
        self._crc_parts(claimed, out, parts, now=writable)
        return out.view(p.shape)

    def chunks(
        self, key: str, *, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        p = self.pieces.get(key)
        if p is None:
            yield from super().chunks(key, pooled=pooled, step=step)
            return
        rows = p.shape[0] if p.shape else 1
        row = numel(p.shape[1:]) if p.shape else 1
        step = step or max(1, self.reader.chunk_bytes // max(1, row * p.dtype.itemsize))
        claimed = self._checked_runs(p)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out, parts = self._gather(p, start * row, stop * row, pooled)
            self._crc_parts(claimed, out, parts, now=False)
            yield start, stop, out.view((stop - start, *p.shape[1:]) if p.shape else ())

    def crc32(self, key: str) -> int:
        if key not in self.pieces:
            return super().crc32(key)
        crc = 0
        for _, _, piece in self.chunks(key, pooled=True):
            crc = zlib.crc32(tensor_bytes(piece), crc)
            self.release(piece)
        return crc
