"""PEFT adapter folders (``save_pretrained``): adapter_config.json and the adapter's tensors as a source."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConvertError, untrusted
from ..names import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .base import TensorSource
from .pread import SpanReader
from .safetensors import SafetensorsSource
from .torchfile import read_torch_file, torch_tensor_source


@dataclasses.dataclass(frozen=True)
class AdapterFolder:
    """A PEFT ``save_pretrained`` folder. Its tensor keys drop the adapter name (no ``.default``)."""

    path: Path
    config: dict[str, Any]
    weights_path: Path
    source: TensorSource


def find_adapter_folder(folder: Path, adapter_name: str | None = None) -> Path | None:
    """The folder holding adapter_config.json: ``folder`` itself or, for a named adapter, ``folder/<name>``."""
    if not folder.is_dir():
        return None
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    named = sorted(p.parent for p in folder.glob(f"*/{ADAPTER_CONFIG}"))
    if adapter_name is not None and (folder / adapter_name / ADAPTER_CONFIG).is_file():
        return folder / adapter_name
    if len(named) == 1:
        return named[0]
    if named:
        names = ", ".join(p.name for p in named)
        raise ConvertError(f"{folder}: holds several adapters ({names}); pass --adapter-dir to choose one")
    return None


def open_adapter_folder(folder: Path, reader: SpanReader) -> AdapterFolder:
    """Read adapter_config.json and locate the adapter's tensors (safetensors, else a .bin read without its code)."""
    with untrusted(folder, "the adapter folder cannot be read; it is damaged", "re-save the adapter"):
        return _open(folder, reader)


def _open(folder: Path, reader: SpanReader) -> AdapterFolder:
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{config_path}: unreadable adapter config ({exc}); re-save the adapter") from exc
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise ConvertError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside adapter_config.json")
    if weights.suffix == ".safetensors":
        return AdapterFolder(folder, config, weights, SafetensorsSource(weights, reader))
    obj, loaded = read_torch_file(weights)
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{weights}: expected a state_dict of tensors")
    return AdapterFolder(folder, config, weights, torch_tensor_source(weights, obj, loaded, reader))
