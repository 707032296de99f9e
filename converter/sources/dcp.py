"""torch.distributed.checkpoint folders, as Lightning's FSDP and ModelParallel strategies (and Fabric) save them
with ``state_dict_type="sharded"``:

    last.ckpt/.metadata        a pickle: every entry's shape, dtype and chunks, and where each chunk is stored
    last.ckpt/__<R>_0.distcp   each chunk a torch.save stream at an offset of the rank's file
    last.ckpt/meta.pt          the rest of Lightning's (or Fabric's) checkpoint dict

Only the weights' entries are read (``model``, or the one state that is not an optimizer's). ``.metadata`` and
every chunk go through the restricted unpickler (torch's own reader would unpickle them unrestricted); chunks
are row blocks of a tensor, stitched in the order of their offsets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, preview
from . import unpickle
from .pieces import PiecedSource, Pieces
from .pread import Span, SpanReader, numel
from .torchfile import read_torch_file, span_of

METADATA = ".metadata"
META = "meta.pt"
WEIGHT_STATES = ("model", "state_dict", "module")
OPTIMIZER_FIELDS = ("state", "param_groups")


def _fields(obj: Any, where: Path, what: str) -> Any:
    """The recorded fields of a placeholder for a torch.distributed.checkpoint object (never constructed)."""
    if not isinstance(obj, unpickle.Placeholder) or not obj._global.endswith(what):
        raise ConvertError(f"{where}: expected a {what} in {METADATA}, found {type(obj).__name__}; the file is damaged")
    return obj.recorded_state


class _Reader:
    def __init__(self, folder: Path, reader: SpanReader) -> None:
        self.folder, self.reader = folder, reader
        self.metadata_path = folder / METADATA
        loaded = unpickle.load_pickle(self.metadata_path)
        metadata = _fields(loaded.obj, self.metadata_path, "Metadata")
        if not isinstance(metadata, Mapping) or not isinstance(metadata.get("state_dict_metadata"), Mapping):
            raise ConvertError(f"{self.metadata_path}: no state_dict_metadata; not a torch.distributed.checkpoint")
        self.entries = metadata["state_dict_metadata"]
        self.planner = metadata.get("planner_data") or {}
        self.storage: dict[tuple[str, tuple[int, ...]], Mapping[str, Any]] = {}
        for index, info in (metadata.get("storage_data") or {}).items():
            where = _fields(index, self.metadata_path, "MetadataIndex")
            offset = tuple(where.get("offset") or ())
            self.storage[(str(where.get("fqn")), offset)] = _fields(info, self.metadata_path, "_StorageInfo")
        self.mappings: dict[Path, torch.UntypedStorage] = {}

    def _path(self, fqn: str) -> tuple[str, ...]:
        path = self.planner.get(fqn)
        return tuple(map(str, path)) if isinstance(path, (tuple, list)) and path else tuple(fqn.split(".", 1))

    def weights_state(self) -> tuple[str, list[str]]:
        """The state holding the weights, and the other states' names."""
        by_state: dict[str, list[tuple[str, ...]]] = {}
        for fqn in self.entries:
            path = self._path(str(fqn))
            by_state.setdefault(path[0], []).append(path)
        optimizers = {s for s, paths in by_state.items() if all(len(p) > 1 and p[1] in OPTIMIZER_FIELDS for p in paths)}
        names = [s for s in WEIGHT_STATES if s in by_state]
        if not names:
            names = [s for s in by_state if s not in optimizers]
        if len(names) != 1:
            raise ConvertError(
                f"{self.metadata_path}: cannot tell which state holds the model's weights "
                f"({', '.join(sorted(by_state))}); save it under 'model'"
            )
        return names[0], sorted(set(by_state) - {names[0]})

    def _chunk(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> Span:
        info = self.storage.get((fqn, offsets))
        if info is None:
            raise ConvertError(f"{self.metadata_path}: no storage for {fqn} at {offsets}; the checkpoint is incomplete")
        if info.get("transform_descriptors"):
            raise ConvertError(
                f"{self.metadata_path}: {fqn} is stored transformed ({info['transform_descriptors']}); ckpt2hf reads "
                "plain torch.save chunks only"
            )
        path = self.folder / str(info["relative_path"])
        if path.parent != self.folder or not path.is_file():
            raise ConvertError(f"{path}: missing; a rank's file of the checkpoint was not copied")
        if path not in self.mappings:
            size = path.stat().st_size
            self.mappings[path] = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        loaded = unpickle.load(path, int(info["offset"]), int(info["length"]), self.mappings[path])
        tensor = loaded.obj
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != sizes or tensor.dtype != dtype:
            raise ConvertError(
                f"{path}: the chunk of {fqn} at {offsets} is not the {sizes} {dtype} tensor the index says"
            )
        span = span_of(tensor, path, loaded.records)
        if span is None:
            if tensor.numel() == 0:
                return Span(path, 0, dtype, (0,))
            raise ConvertError(f"{path}: the chunk of {fqn} at {offsets} is not stored contiguously")
        return Span(span.path, span.offset, dtype, (numel(sizes),), span.record)

    def tensor(self, fqn: str, meta: Any) -> Pieces:
        fields = _fields(meta, self.metadata_path, "TensorStorageMetadata")
        shape = tuple(fields["size"])
        properties = fields["properties"]
        state = properties.recorded_state if isinstance(properties, unpickle.Placeholder) else None
        dtype = state[0] if isinstance(state, tuple) and state else getattr(state, "get", lambda k: None)("dtype")
        if not isinstance(dtype, torch.dtype):
            raise ConvertError(f"{self.metadata_path}: no dtype for {fqn}; the file is damaged")
        chunks = []
        for chunk in fields["chunks"]:
            c = _fields(chunk, self.metadata_path, "ChunkStorageMetadata")
            chunks.append((tuple(c["offsets"]), tuple(c["sizes"])))
        chunks.sort()
        row = 0
        for offsets, sizes in chunks:
            if shape and (offsets[0] != row or offsets[1:] != (0,) * (len(shape) - 1) or sizes[1:] != shape[1:]):
                raise ConvertError(
                    f"{self.metadata_path}: {fqn} is sharded in blocks other than whole rows ({offsets}, {sizes}); "
                    "ckpt2hf stitches row shards only"
                )
            row += sizes[0] if shape else 1
        if row != (shape[0] if shape else 1) and numel(shape):
            raise ConvertError(f"{self.metadata_path}: the chunks of {fqn} cover {row} of {shape[0]} rows")
        runs = tuple(self._chunk(fqn, offsets, sizes, dtype) for offsets, sizes in chunks if numel(sizes))
        return Pieces(dtype, shape, runs)

    def source(self) -> tuple[PiecedSource, dict[str, Any]]:
        state, others = self.weights_state()
        pieces, order, skipped = {}, [], []
        for fqn, meta in self.entries.items():
            path = self._path(str(fqn))
            if path[0] != state:
                continue
            key = ".".join(path[1:])
            if not (isinstance(meta, unpickle.Placeholder) and meta._global.endswith("TensorStorageMetadata")):
                skipped.append(key)
                continue
            pieces[key] = self.tensor(str(fqn), meta)
            order.append(key)
        if skipped:
            raise ConvertError(
                f"{self.metadata_path}: the weights hold {len(skipped)} entries that are not tensors "
                f"({preview(skipped, 3)}); ckpt2hf converts tensors"
            )
        files = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        origins = {key: f"{len(p.runs)} row shards" for key, p in pieces.items()}
        layout = {
            "format": "torch.distributed.checkpoint",
            "files": files,
            "ranks": sum(1 for f in files if f.endswith(".distcp")),
            "weights_state": state,
            "other_states": others,
            "chunks": sum(len(p.runs) for p in pieces.values()),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in pieces.values()}),
        }
        return PiecedSource(self.folder, self.reader, {}, pieces, order, origins), layout


def _check_sizes(folder: Path, streams: Mapping[str, list[tuple[int, int]]]) -> None:
    """Every rank's file at least as long as ``.metadata`` says, optimizer states included: a copy that stopped
    partway is refused before anything is read (a chunk the conversion does not read would otherwise go unnoticed)."""
    for name, spans in sorted(streams.items()):
        path = folder / name
        if not path.is_file():
            continue  # named when a weight's chunk is read from it: "missing; a rank's file ... was not copied"
        end, size = max(offset + length for offset, length in spans), path.stat().st_size
        if size < end:
            raise ConvertError(
                f"{path}: {size} bytes, but {METADATA} records data up to byte {end}; the file was cut short (an "
                "incomplete copy): copy it again from the training machine"
            )


def open_dcp(
    folder: Path, reader: SpanReader
) -> tuple[PiecedSource, dict[str, Any], dict[str, Any], dict[str, list[tuple[int, int]]]]:
    """(source, the checkpoint dict in meta.pt (empty without one), layout facts for inspect, the torch.save
    streams of every entry, optimizer states included: file name -> (offset, length) of each)."""
    dcp = _Reader(folder, reader)
    streams: dict[str, list[tuple[int, int]]] = {}
    for info in dcp.storage.values():
        streams.setdefault(str(info["relative_path"]), []).append((int(info["offset"]), int(info["length"])))
    _check_sizes(folder, streams)
    source, layout = dcp.source()
    meta: dict[str, Any] = {}
    if (folder / META).is_file():
        obj, _ = read_torch_file(folder / META)
        if not isinstance(obj, Mapping):
            raise ConvertError(f"{folder / META}: expected the checkpoint's dict")
        meta = dict(obj)
    return source, meta, layout, streams
