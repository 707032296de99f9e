"""Opening a checkpoint: its metadata (hyper-parameters, epoch, step) and its weights as a tensor source.

Formats are a table, keyed by what ``kinds.checkpoint_kind`` sees: single files (Lightning checkpoints with
``state_dict``, Fabric checkpoints with the weights under ``model`` or another state name, plain state_dicts,
safetensors), DeepSpeed ZeRO folders and torch.distributed.checkpoint folders. Optimizer states and other
non-weight contents are sized, never read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, untrusted
from ..identity import SourceIdentity, source_identity
from ..kinds import checkpoint_kind
from .base import TensorSource
from .pread import SpanReader
from .safetensors import SafetensorsSource
from .torchfile import read_torch_file, torch_tensor_source

# Where a single-file checkpoint keeps its weights: Lightning, Fabric's convention, others; else the one entry
# that is a mapping of tensors.
WEIGHT_ENTRIES = ("state_dict", "model", "module")
READ_FAILED = "cannot be read as a checkpoint; it is damaged"
CHECKPOINT_ADVICE = "re-copy it, or choose another checkpoint with --ckpt"


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's weights (a tensor source; nothing read yet) and its metadata."""

    path: Path
    format: str  # "lightning", "fabric", "state_dict", "safetensors", "deepspeed", "torch.distributed.checkpoint"
    source: TensorSource
    hparams: dict[str, Any]
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None
    extras: dict[str, int] = dataclasses.field(default_factory=dict)  # other top-level entry -> tensor bytes
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)  # format facts for inspect (files, ranks, ...)
    frozen_excluded: bool = False  # the run did not save its frozen parameters: they come from the base model
    # Files holding torch.save streams at offsets (torch.distributed.checkpoint): name -> (offset, length) of each.
    embedded_zips: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)

    def identity(self) -> SourceIdentity:
        """What identifies this checkpoint in the manifest (see ``identity``): read from its zip records."""
        return source_identity(self.path, self.embedded_zips)


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
    """The hyper-parameters as plain data (OmegaConf, Namespace, dataclasses read from their placeholders),
    OmegaConf interpolations resolved (see ``hparams``)."""
    from ..hparams import recover

    tree = recover(obj.get("hyper_parameters") or {})
    return tree if isinstance(tree, dict) else {}


def _with_metadata(path: Path, fmt: str, source: TensorSource, meta: Mapping[str, Any], **extra: Any) -> Checkpoint:
    """A Checkpoint whose metadata comes from Lightning's (or Fabric's) checkpoint dict ``meta``."""
    step = meta.get("global_step")
    return Checkpoint(
        path,
        fmt,
        source,
        _hparams(meta),
        epoch=meta.get("epoch") if isinstance(meta.get("epoch"), int) else None,
        global_step=step if isinstance(step, int) else None,
        lightning_version=meta.get("pytorch-lightning_version"),
        **extra,
    )


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _open_file(path: Path, reader: SpanReader) -> Checkpoint:
    if path.suffix == ".safetensors":
        return Checkpoint(path, "safetensors", SafetensorsSource(path, reader), {})
    obj, loaded = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{path}: holds neither a Lightning checkpoint nor a state_dict of tensors")
    if _is_tensor_mapping(obj):
        return Checkpoint(path, "state_dict", torch_tensor_source(path, obj, loaded, reader), {})
    entry = next((k for k in WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping)), None)
    if entry is None:
        mappings = [k for k, v in obj.items() if _is_tensor_mapping(v)]
        entry = mappings[0] if len(mappings) == 1 else None
    if entry is None:
        raise ConvertError(f"{path}: holds neither a Lightning checkpoint nor a state_dict of tensors")
    extras = {str(k): storage_bytes(v) for k, v in obj.items() if k != entry}
    fmt = "lightning" if entry == "state_dict" else "fabric"
    source = torch_tensor_source(path, obj[entry], loaded, reader)
    return _with_metadata(path, fmt, source, obj, extras=extras, layout={"format": fmt, "weights_entry": entry})


def _open_deepspeed(path: Path, reader: SpanReader) -> Checkpoint:
    from .deepspeed import open_deepspeed

    source, client, layout = open_deepspeed(path, reader)
    extras = {str(k): storage_bytes(v) for k, v in client.items()}
    extras["optimizer states (all ranks)"] = sum(
        p.stat().st_size for p in path.rglob("*optim_states.pt") if p.is_file()
    )
    return _with_metadata(
        path, "deepspeed", source, client, extras=extras, layout=layout, frozen_excluded=layout["frozen_excluded"]
    )


def _open_dcp(path: Path, reader: SpanReader) -> Checkpoint:
    from .dcp import open_dcp

    source, meta, layout, streams = open_dcp(path, reader)
    extras = {str(k): storage_bytes(v) for k, v in meta.items()}
    return _with_metadata(
        path, "torch.distributed.checkpoint", source, meta, extras=extras, layout=layout, embedded_zips=streams
    )


FORMATS: dict[str, Callable[[Path, SpanReader], Checkpoint]] = {
    "file": _open_file,
    "deepspeed": _open_deepspeed,
    "dcp": _open_dcp,
}


def open_checkpoint(path: Path, reader: SpanReader) -> Checkpoint:
    """Open a checkpoint lazily: metadata read, tensors located, no tensor data read."""
    path = Path(path)
    kind = checkpoint_kind(path) or ("file" if path.is_file() else None)
    if kind is None:
        what = (
            "a folder that is no checkpoint (no DeepSpeed 'latest', no .metadata)" if path.is_dir() else "no such file"
        )
        raise ConvertError(f"{path}: {what}")
    with untrusted(path, READ_FAILED, CHECKPOINT_ADVICE):
        return FORMATS[kind](path, reader)


def read_metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's top-level entries other than weights (e.g. ``global_step``), read without its code."""
    path = Path(path)
    kind = checkpoint_kind(path)
    with untrusted(path, READ_FAILED, CHECKPOINT_ADVICE):
        if kind == "deepspeed":
            from .deepspeed import client_state

            return client_state(path)
        if kind == "dcp":
            meta = path / "meta.pt"
            obj = read_torch_file(meta)[0] if meta.is_file() else {}
        else:
            obj, _ = read_torch_file(path)
        return {k: v for k, v in obj.items() if k not in WEIGHT_ENTRIES} if isinstance(obj, Mapping) else {}
