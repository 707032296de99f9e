"""Torch files (``torch.save``) read without executing their code, and their tensors as a source.

The zip format (every ``torch.save`` since 1.6) goes through ckpt2hf's restricted unpickler (``unpickle``), with
tensor data memory-mapped and never touched until read; the legacy format through ``torch.load(weights_only=True)``.
There is no fallback to ``weights_only=False``, ever.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, untrusted
from . import unpickle
from .base import SpanSource
from .pread import Record, Span, SpanReader

log = logging.getLogger(__name__)

# Lightning's hyper-parameters hold whatever the project saved (OmegaConf configs, Namespaces, dataclasses, partial
# optimizers): ``hparams.recover`` reads them as plain data and ``inspect`` shows them, so they are not warned about.
HYPER_PARAMETERS = "hyper_parameters"


def read_torch_file(path: Path, expected: tuple[str, ...] = ()) -> tuple[Any, unpickle.Loaded | None]:
    """The object a torch file holds, and for zip files what ``unpickle.load`` learned about it.

    Objects of unknown classes are read as inert placeholders and listed in a warning, except those of the
    modules named in ``expected`` (the classes a format is known to pickle, e.g. DeepSpeed's own) and those in the
    hyper-parameters.
    """
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        loaded = unpickle.load(path)
        unknown = [
            (w, g)
            for w, g in loaded.placeholders
            if not g.startswith(expected) and w.split(".", 1)[0].split("[", 1)[0] != HYPER_PARAMETERS
        ]
        if unknown:
            shown = ", ".join(f"{g} at {w}" for w, g in unknown[:3])
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            log.warning(
                "%s: objects of unknown classes were read as inert placeholders (never constructed): %s%s",
                path,
                shown,
                more,
            )
        return loaded.obj, loaded
    if path.stat().st_size == 0:
        raise ConvertError(f"{path}: the file is empty; re-copy it or choose another with --ckpt")
    with untrusted(path, "not a readable PyTorch checkpoint (legacy format)", "the file may be truncated or corrupt"):
        return _legacy(path), None


def _legacy(path: Path) -> Any:
    """A legacy-format (non-zip) torch file, through torch's own weights-only unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; that would execute the file's code, so it is not repeated.
        text = str(exc)
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
        if detail is None:
            reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise ConvertError(
                f"{path}: not a readable PyTorch checkpoint (legacy format, {' '.join(reason.split())[:80]}); "
                "the file may be truncated or corrupt"
            ) from exc
        raise ConvertError(
            f"{path}: refused to unpickle ({detail}); the file holds objects other than tensors and plain data, "
            "and ckpt2hf never executes a checkpoint's code"
        ) from exc


def record_span(tensor: torch.Tensor, path: Path, records: dict[int, Record]) -> Span | None:
    """The whole zip record behind a memory-mapped tensor's storage (for its CRC-32 check)."""
    record = records.get(tensor.untyped_storage().data_ptr())
    if record is None:
        return None
    return Span(path, record.offset, torch.uint8, (record.nbytes,), record)


def span_of(tensor: torch.Tensor, path: Path, records: dict[int, Record]) -> Span | None:
    """Where a memory-mapped tensor's bytes are, if it is contiguous and backed by a zip record."""
    record = records.get(tensor.untyped_storage().data_ptr())
    if record is None or not tensor.is_contiguous():
        return None
    offset = record.offset + tensor.storage_offset() * tensor.element_size()
    return Span(path, offset, tensor.dtype, tuple(tensor.shape), record)


def torch_tensor_source(
    path: Path, tensors: Mapping[str, Any], loaded: unpickle.Loaded | None, reader: SpanReader
) -> SpanSource:
    """The tensors of a torch file's state_dict as a source: read with ``pread`` where they are contiguous zip
    records (the CRC-32 checked as they are read), else from the memory-mapped or loaded tensor."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    records = loaded.records if loaded is not None else {}
    spans = {k: s for k, t in tensors.items() if (s := span_of(t, path, records)) is not None}
    whole = {k: s for k, t in tensors.items() if k not in spans and (s := record_span(t, path, records))}
    return SpanSource(path, reader, spans, {str(k): v for k, v in tensors.items()}, whole)
