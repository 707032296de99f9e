"""Opening a checkpoint: its metadata (hyper-parameters, epoch, step) and its weights as a tensor source.

Formats are a table: each entry recognises a path and opens it. Lightning checkpoints (``state_dict`` beside
``hyper_parameters``, ``optimizer_states``, ...), plain torch state_dicts and safetensors files are read today;
optimizer states and other non-weight contents are sized, never read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError
from . import unpickle
from .base import TensorSource
from .pread import SpanReader
from .safetensors import SafetensorsSource
from .torchfile import read_torch_file, torch_tensor_source


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's weights (a tensor source; nothing read yet) and its metadata."""

    path: Path
    format: str  # "lightning", "state_dict" or "safetensors"
    source: TensorSource
    hparams: dict[str, Any]
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None
    extras: dict[str, int] = dataclasses.field(default_factory=dict)  # other top-level entry -> tensor bytes


def storage_bytes(obj: Any) -> int:
    """Bytes of the tensor storages inside ``obj`` (nested containers), each storage counted once; reads no data."""
    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _hparams(obj: Mapping[str, Any]) -> dict[str, Any]:
    hparams = obj.get("hyper_parameters") or {}
    if isinstance(hparams, unpickle.Placeholder):  # e.g. an AttributeDict or Namespace of an unknown class
        hparams = hparams.mapping() or {}
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def _open_torch(path: Path, reader: SpanReader) -> Checkpoint:
    obj, loaded = read_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return Checkpoint(
            path,
            "lightning",
            torch_tensor_source(path, obj["state_dict"], loaded, reader),
            _hparams(obj),
            epoch=obj.get("epoch"),
            global_step=obj.get("global_step"),
            lightning_version=obj.get("pytorch-lightning_version"),
            extras={str(k): storage_bytes(v) for k, v in obj.items() if k != "state_dict"},
        )
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(path, "state_dict", torch_tensor_source(path, obj, loaded, reader), {})
    raise ConvertError(f"{path}: holds neither a Lightning checkpoint nor a state_dict of tensors")


def _open_safetensors(path: Path, reader: SpanReader) -> Checkpoint:
    return Checkpoint(path, "safetensors", SafetensorsSource(path, reader), {})


# (recognises the path, opens it): the first match wins.
FORMATS: list[tuple[Callable[[Path], bool], Callable[[Path, SpanReader], Checkpoint]]] = [
    (lambda p: p.is_file() and p.suffix == ".safetensors", _open_safetensors),
    (lambda p: p.is_file(), _open_torch),
]


def open_checkpoint(path: Path, reader: SpanReader) -> Checkpoint:
    """Open a checkpoint lazily: metadata read, tensors located, no tensor data read."""
    path = Path(path)
    for recognises, opener in FORMATS:
        if recognises(path):
            return opener(path, reader)
    raise ConvertError(f"{path}: no such checkpoint file")


def read_metadata(path: Path) -> dict[str, Any]:
    """A torch checkpoint's top-level entries other than weights (e.g. ``global_step``), read without its code."""
    obj, _ = read_torch_file(Path(path))
    return {k: v for k, v in obj.items() if k != "state_dict"} if isinstance(obj, Mapping) else {}
