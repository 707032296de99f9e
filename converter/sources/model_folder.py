"""A Hugging Face model folder's weights as a tensor source: the base model's, for the parameters a run did not
save (DeepSpeed's ``exclude_frozen_parameters``). safetensors files (single or sharded) are read from their
headers; ``pytorch_model*.bin`` files through the restricted unpickler."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConvertError, untrusted
from ..names import LEGACY_WEIGHTS, LEGACY_WEIGHTS_INDEX, WEIGHTS, WEIGHTS_INDEX
from .base import SpanSource
from .pread import SpanReader
from .safetensors import safetensors_spans
from .torchfile import read_torch_file, torch_tensor_source

INDEXES = (WEIGHTS_INDEX, LEGACY_WEIGHTS_INDEX)
SINGLE = (WEIGHTS, LEGACY_WEIGHTS)


def _files(folder: Path) -> list[Path]:
    for name in INDEXES:
        index = folder / name
        if index.is_file():
            with untrusted(index, "unreadable index", "re-save the model folder"):
                weight_map = json.loads(index.read_text())["weight_map"]
                return [folder / f for f in sorted(set(map(str, weight_map.values())))]
    return [folder / name for name in SINGLE if (folder / name).is_file()]


def open_model_folder(folder: Path, reader: SpanReader) -> SpanSource | None:
    """The weights of a model folder, or None when it has none (a folder with only a config and tokenizer)."""
    files = _files(folder)
    if not files:
        return None
    spans, tensors, records = {}, {}, {}
    for path in files:
        if not path.is_file():
            raise ConvertError(f"{path}: named by the folder's index but missing")
        if path.suffix == ".safetensors":
            spans.update(safetensors_spans(path))
            continue
        obj, loaded = read_torch_file(path)
        part = torch_tensor_source(path, obj if isinstance(obj, dict) else {}, loaded, reader)
        spans.update(part.spans)
        tensors.update(part.tensors)
        records.update(part.records)
    return SpanSource(folder, reader, spans, tensors or None, records)
