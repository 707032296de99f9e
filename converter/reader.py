"""Reading inputs safely and lazily: Lightning checkpoints, plain state_dicts and PEFT adapter folders.

Checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``: no pickled code runs, and tensor
data (optimizer states included) stays on disk until a tensor is touched. There is no fallback to
``weights_only=False``, ever.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import unpickle
from .errors import ConvertError
from .lazy import Span, SpanReader, safetensors_spans, span_of

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's weights (memory-mapped) and its metadata; non-weight contents are not kept."""

    path: Path
    format: str  # "lightning", "state_dict" or "safetensors"
    tensors: Mapping[str, torch.Tensor]
    hparams: dict[str, Any]
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None
    extras: dict[str, int] = dataclasses.field(default_factory=dict)  # other top-level entry -> tensor bytes
    spans: dict[str, Span] = dataclasses.field(default_factory=dict)  # state_dict key -> where its bytes are


def tensor_bytes(obj: Any) -> int:
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


@dataclasses.dataclass
class AdapterFolder:
    """A PEFT ``save_pretrained`` folder: adapter_config.json and the adapter's tensors (keys without the name).

    ``spans`` locate every tensor in the weights file (nothing read); ``tensors`` loads them on first use.
    """

    path: Path
    config: dict[str, Any]
    weights_path: Path
    spans: dict[str, Span]
    _tensors: dict[str, torch.Tensor] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = _load_safetensors(self.weights_path)
        return self._tensors


def _torch_load(path: Path) -> Any:
    """The object a torch file holds, read without executing its code (see ``_read_torch``)."""
    return _read_torch(path)[0]


def _read_torch(path: Path) -> tuple[Any, unpickle.Loaded | None]:
    """Read a torch file without executing its code (see ``unpickle``); tensors stay memory-mapped.

    The zip format (every torch.save since 1.6) goes through ckpt2hf's restricted unpickler; the legacy format
    through ``torch.load(weights_only=True)``.
    """
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        loaded = unpickle.load(path)
        if loaded.placeholders:
            shown = ", ".join(f"{g} at {w}" for w, g in loaded.placeholders[:3])
            more = f" and {len(loaded.placeholders) - 3} more" if len(loaded.placeholders) > 3 else ""
            log.warning(
                "%s: objects of unknown classes were read as inert placeholders (never constructed): %s%s",
                path,
                shown,
                more,
            )
        return loaded.obj, loaded
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; that would execute the file's code, so it is not repeated.
        first = str(exc).split("Weights only load failed")[-1].strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line), None)
        if detail is None:
            raise ConvertError(
                f"{path}: not a readable PyTorch checkpoint (legacy format, {first[0][:80]}); "
                "the file may be truncated or corrupt"
            ) from exc
        raise ConvertError(
            f"{path}: refused to unpickle ({detail}); the file holds objects other than tensors and plain data, "
            "and ckpt2hf never executes a checkpoint's code"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        if path.stat().st_size == 0:
            raise ConvertError(f"{path}: the file is empty; re-copy it or choose another with --ckpt") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(
            f"{path}: not a readable PyTorch checkpoint ({reason}); the file may be truncated or corrupt"
        ) from exc


def read_checkpoint(path: Path, verify_crc: bool = True) -> Checkpoint:
    """Open a Lightning checkpoint, a plain torch state_dict or a safetensors file, lazily.

    ``verify_crc`` checks the zip's CRC-32 of every record behind the state_dict's tensors (one read of the
    weights, not of the optimizer states); the conversion engines instead check what they read as they read it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        _validate_safetensors(path)
        return Checkpoint(path, "safetensors", _load_safetensors(path), {}, spans=safetensors_spans(path))
    obj, loaded = _read_torch(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        tensors = obj["state_dict"]
        hparams = obj.get("hyper_parameters") or {}
        if isinstance(hparams, unpickle.Placeholder):  # e.g. an AttributeDict or Namespace of an unknown class
            hparams = hparams.mapping() or {}
        ckpt = Checkpoint(
            path,
            "lightning",
            tensors,
            dict(hparams) if isinstance(hparams, Mapping) else {},
            epoch=obj.get("epoch"),
            global_step=obj.get("global_step"),
            lightning_version=obj.get("pytorch-lightning_version"),
            extras={str(k): tensor_bytes(v) for k, v in obj.items() if k != "state_dict"},
        )
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(path, "state_dict", obj, {})
    else:
        raise ConvertError(f"{path}: holds neither a Lightning checkpoint nor a state_dict of tensors")
    bad = [k for k, v in ckpt.tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    if loaded is not None:
        ckpt.spans = {k: s for k, t in ckpt.tensors.items() if (s := span_of(t, path, loaded.records)) is not None}
    if verify_crc:
        with SpanReader() as reader:
            for span in ckpt.spans.values():
                reader.check_record(span)
    return ckpt


def _validate_safetensors(path: Path) -> None:
    """Let safetensors itself check the header (reads no tensor data)."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConvertError(f"{path}: not a valid safetensors file ({exc}); re-export or re-copy it") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConvertError(f"{path}: not a valid safetensors file ({exc}); re-export or re-copy it") from exc


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


def read_adapter_folder(folder: Path) -> AdapterFolder:
    """Read adapter_config.json and the adapter weights (safetensors, else .bin with weights_only)."""
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{config_path}: unreadable adapter config ({exc}); re-save the adapter") from exc
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    for name in ADAPTER_WEIGHTS:
        weights = folder / name
        if weights.is_file():
            break
    else:
        raise ConvertError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside adapter_config.json")
    if weights.suffix == ".safetensors":
        _validate_safetensors(weights)
        return AdapterFolder(folder, config, weights, safetensors_spans(weights))
    obj, loaded = _read_torch(weights)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvertError(f"{weights}: expected a state_dict of tensors")
    records = loaded.records if loaded else {}
    spans = {k: s for k, t in obj.items() if (s := span_of(t, weights, records)) is not None}
    return AdapterFolder(folder, config, weights, spans, dict(obj))
