"""safetensors files as a tensor source: spans from the header, data read with ``pread`` (nothing memory-mapped)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConvertError, untrusted
from .base import SpanSource
from .pread import Span, SpanReader

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 << 20


def _bad(path: Path, exc: object) -> ConvertError:
    return ConvertError(f"{path}: not a valid safetensors file ({exc}); re-export or re-copy it")


def safetensors_spans(path: Path) -> dict[str, Span]:
    """Spans of every tensor in a safetensors file, from its header (no tensor data is read).

    safetensors itself validates the header first (offsets, dtypes, sizes against the file's length).
    """
    with untrusted(path, "not a valid safetensors file", "re-export or re-copy it"):
        return _spans(path)


def _spans(path: Path) -> dict[str, Span]:
    try:
        with safe_open(path, framework="pt"):
            pass
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER or length > path.stat().st_size:
                raise ValueError(f"header length {length} is impossible")
            header = json.loads(fh.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        raise _bad(path, exc) from exc
    spans = {}
    base = 8 + length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConvertError(f"{path}: tensor {name} has dtype {entry['dtype']}, which ckpt2hf does not convert")
        start, _ = entry["data_offsets"]
        spans[name] = Span(path, base + start, dtype, tuple(entry["shape"]))
    return spans


class SafetensorsSource(SpanSource):
    """The tensors of one safetensors file (the format stores no checksums: reads verify nothing)."""

    def __init__(self, path: Path, reader: SpanReader) -> None:
        super().__init__(path, reader, safetensors_spans(Path(path)))
