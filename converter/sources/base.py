"""The one interface every input format implements: tensors by key, their metadata, and reads of their data.

A ``TensorSource`` is one input (a checkpoint, an adapter folder's weights) seen as named tensors. Planning uses
only ``keys`` and ``info`` (dtype, shape and the checksum the file stores, if any: no tensor data is read); the
engines and checks read with ``read`` (a whole tensor) and ``chunks`` (its rows in bounded pieces), and every read
verifies what the file's format lets it verify. Engines and checks never branch on the format; a new input
format is a new source.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .pread import Span, SpanReader, numel, tensor_bytes


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a source knows about a tensor without reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    crc32: int | None = None  # the CRC-32 the file stores for exactly these bytes; checked whenever they are read

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor of a named source (``checkpoint``, ``adapter``)."""

    source: str
    key: str


class TensorSource(ABC):
    """Named tensors of one input. ``path`` (a file or folder) is what error messages name."""

    path: Path

    @abstractmethod
    def keys(self) -> list[str]:
        """Every tensor's key, in the file's order."""

    @abstractmethod
    def info(self, key: str) -> TensorInfo:
        """dtype, shape and stored checksum of ``key``; reads no tensor data."""

    @abstractmethod
    def read(self, key: str, *, writable: bool = False, pooled: bool = False) -> torch.Tensor:
        """The whole tensor as a CPU tensor. ``writable``: a buffer of its own, already checked, that the caller
        may modify in place. ``pooled``: the buffer may be lent from a pool; hand it back with ``release``."""

    @abstractmethod
    def chunks(
        self, key: str, *, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows)`` over the tensor's rows in bounded pieces (``step`` rows each if given)."""

    @abstractmethod
    def crc32(self, key: str) -> int:
        """CRC-32 of the tensor's bytes, computed (reads them)."""

    def origin(self, key: str) -> str:
        """Where ``key``'s data is, in words (for ``inspect``)."""
        return self.path.name

    def release(self, tensor: torch.Tensor) -> None:  # noqa: B027 - a source without a pool has nothing to do
        """Hand back a pooled buffer (a no-op for any other tensor)."""

    def close(self) -> None:  # noqa: B027 - a source holding nothing open has nothing to do
        """Release what the source holds open."""


class SpanSource(TensorSource):
    """Tensors whose bytes lie contiguously in files (``Span``), read with a shared ``SpanReader``.

    Keys without a span (a tensor stored as a strided view, or a legacy-format file read whole) are served from
    ``tensors`` in memory; ``records`` names the zip record behind such a tensor, checked when it is first used.
    """

    def __init__(
        self,
        path: Path,
        reader: SpanReader,
        spans: Mapping[str, Span],
        tensors: Mapping[str, torch.Tensor] | None = None,
        records: Mapping[str, Span] | None = None,
    ) -> None:
        self.path, self.reader = Path(path), reader
        self.spans = dict(spans)
        self.tensors = {k: v for k, v in (tensors or {}).items() if k not in self.spans}
        self.records = dict(records or {})
        self._keys = list(dict.fromkeys([*(tensors or {}), *self.spans]))  # the file's order

    def keys(self) -> list[str]:
        return list(self._keys)

    def _span(self, key: str) -> Span | None:
        span = self.spans.get(key)
        if span is None and key not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return span

    def info(self, key: str) -> TensorInfo:
        span = self._span(key)
        if span is not None:
            return TensorInfo(span.dtype, span.shape, span.stored_crc)
        tensor = self.tensors[key]
        return TensorInfo(tensor.dtype, tuple(tensor.shape))

    def _checked(self, key: str) -> torch.Tensor:
        record = self.records.get(key)
        if record is not None:
            self.reader.check_record(record)
        return self.tensors[key]

    def read(self, key: str, *, writable: bool = False, pooled: bool = False) -> torch.Tensor:
        span = self._span(key)
        if span is not None:
            return self.reader.read(span, check_now=writable, pooled=pooled)
        tensor = self._checked(key)
        return tensor.clone(memory_format=torch.contiguous_format) if writable else tensor

    def chunks(
        self, key: str, *, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        span = self._span(key)
        if span is not None:
            yield from self.reader.chunks(span, pooled, step)
            return
        tensor = self._checked(key)
        if tensor.dim() == 0:
            yield 0, 1, tensor.contiguous()
            return
        step = step or max(1, self.reader.chunk_bytes // max(1, tensor[:1].numel() * tensor.element_size()))
        for start in range(0, max(1, tensor.shape[0]), step):
            stop = min(tensor.shape[0], start + step)
            yield start, stop, tensor[start:stop].contiguous()

    def crc32(self, key: str) -> int:
        span = self._span(key)
        if span is not None:
            return self.reader.crc(span)
        return zlib.crc32(tensor_bytes(self._checked(key).contiguous()))

    def release(self, tensor: torch.Tensor) -> None:
        self.reader.release(tensor)


class Sources:
    """The named sources of one conversion and the reader they share; resolves ``TensorRef``s."""

    def __init__(self, reader: SpanReader, sources: Mapping[str, TensorSource] | None = None) -> None:
        self.reader = reader
        self._sources: dict[str, TensorSource] = dict(sources or {})

    def add(self, name: str, source: TensorSource) -> None:
        self._sources[name] = source

    def extended(self) -> Sources:
        """A new set of the same sources and reader, to which more can be added; this one stays as it is. Closing
        either closes the sources both hold."""
        return Sources(self.reader, self._sources)

    def __getitem__(self, name: str) -> TensorSource:
        return self._sources[name]

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def info(self, ref: TensorRef) -> TensorInfo:
        return self._sources[ref.source].info(ref.key)

    def path(self, ref: TensorRef) -> Path:
        return self._sources[ref.source].path

    def read(self, ref: TensorRef, *, writable: bool = False, pooled: bool = False) -> torch.Tensor:
        return self._sources[ref.source].read(ref.key, writable=writable, pooled=pooled)

    def chunks(
        self, ref: TensorRef, *, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        return self._sources[ref.source].chunks(ref.key, pooled=pooled, step=step)

    def release(self, tensor: torch.Tensor) -> None:
        self.reader.release(tensor)

    def wait(self) -> None:
        """Wait for the checks of everything read so far; raise ConvertError for the first that failed."""
        self.reader.wait_crc()

    def equal(self, a: TensorRef, b: TensorRef) -> tuple[bool, float]:
        """(equal, max abs difference) of two tensors, after rounding both to the narrower dtype.

        When exactly one of them has a stored CRC-32 and both have the same dtype and shape, one pass over the
        other's bytes settles the usual case (the same tensor saved twice); the stored value is checked against its
        own bytes whenever those are read. Otherwise, and whenever the CRC-32s differ, the values are compared chunk
        by chunk, which also measures the difference.
        """
        ia, ib = self.info(a), self.info(b)
        if ia.shape != ib.shape:
            return False, float("inf")
        if ia.dtype == ib.dtype and (ia.crc32 is None) != (ib.crc32 is None):
            stored, other = (ia.crc32, b) if ia.crc32 is not None else (ib.crc32, a)
            if self[other.source].crc32(other.key) == stored:
                return True, 0.0
        return self._chunked_equal(a, b, ia, ib)

    def _chunked_equal(self, a: TensorRef, b: TensorRef, ia: TensorInfo, ib: TensorInfo) -> tuple[bool, float]:
        narrow = ia.dtype if ia.dtype.itemsize <= ib.dtype.itemsize else ib.dtype
        equal, diff = True, 0.0
        pieces_a = self.chunks(a, pooled=True)
        first = next(pieces_a, None)
        if first is None:  # no elements
            return True, 0.0
        step = first[1] - first[0]
        pieces_b = self.chunks(b, pooled=True, step=step)
        for (_, _, x), (_, _, y) in zip(itertools.chain([first], pieces_a), pieces_b, strict=True):
            if not torch.equal(x.to(narrow), y.to(narrow)):
                equal = False
                floating = x.is_floating_point() or y.is_floating_point()
                diff = max(diff, float((x.float() - y.float()).abs().max())) if floating else float("inf")
            self.release(x)
            self.release(y)
        return equal, diff

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self.reader.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
