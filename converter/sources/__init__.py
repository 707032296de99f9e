"""Inputs as tensor sources: one interface (``TensorSource``), one implementation per input format."""

from .adapter import AdapterFolder, find_adapter_folder, open_adapter_folder
from .base import Sources, SpanSource, TensorInfo, TensorRef, TensorSource
from .checkpoint import Checkpoint, open_checkpoint, read_metadata
from .pread import Span, SpanReader

__all__ = [
    "AdapterFolder",
    "Checkpoint",
    "Sources",
    "Span",
    "SpanReader",
    "SpanSource",
    "TensorInfo",
    "TensorRef",
    "TensorSource",
    "find_adapter_folder",
    "open_adapter_folder",
    "open_checkpoint",
    "read_metadata",
]
