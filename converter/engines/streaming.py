"""The streaming engine: tensor by tensor, in bounded memory, with PEFT's own per-module merge.

For each output tensor, in the order of the export's files: a copied tensor is read in row chunks from its source
(checked on the way), cast and handed to a background writer; a merged weight is produced by materialising only
its merge unit (the wrapped module's weights and the adapter's state, whatever the tuner) in float32 on the merge
device, merging it with the call ``merge_and_unload`` makes for it (``units``), and casting the result. The PEFT
model itself lives on the meta device. Peak memory is about one unit plus a few chunks, whatever the model's size.

Verification streams too: each merged unit's output on a random input is compared with the unmerged layer's
before its memory is released (a Linear, Conv1D or Embedding; fused expert weights have no forward of their own
and are counted as not probed); copied tensors are read back from the written files and checked against their
sources (against the checksum the source stores where the bytes are unchanged, value by value where the dtype
changed); and the folder is reloaded by ``from_pretrained`` onto the meta device (key names, shapes and the load
report, without reading data).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import verification
from ..errors import ConvertError
from ..plan import OutTensor, PartPlan
from ..policy import cast_checked, settled_tie, tolerance
from ..sources import Sources, TensorRef
from ..sources.crc import crc32_combine
from ..sources.safetensors import SafetensorsSource
from .base import Engine, Written
from .shards import FileLayout, FileSet
from .streams import ReadAhead, SafetensorsStream
from .units import UnitMerger

log = logging.getLogger(__name__)

READ_BACK_THREADS = 4  # copied tensors read back from the written files at once, when verifying
READ_BACK_PIECE = 128 << 20  # bytes of one tensor each of them reads back and checks


def _return_freed_memory_to_the_os() -> None:
    """Have glibc serve buffers of 1 MiB and more with mmap, so that freeing them returns the memory at once.

    Without it glibc's dynamic threshold moves blocks of the sizes this engine churns through (a layer's weights,
    a chunk) onto the heap, where freed memory stays resident and the process grows with every layer.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _source_bytes(item: tuple[str, Any, bool]) -> int:
    """Bytes of a read-ahead item: a chunk, or the sources of one merged layer."""
    _, data, _ = item
    tensors = data.values() if isinstance(data, dict) else [data]
    return sum(t.numel() * t.element_size() for t in tensors)


class StreamingEngine(Engine):
    name = "streaming"

    def write(self, part: PartPlan, folder: Path, verify: bool) -> StreamingWritten:
        _return_freed_memory_to_the_os()
        writer = _PartWriter(self, part, verify)
        if part.tie is not None and not part.tie.settled:
            writer.settle_tie()
        return writer.write(folder)


@dataclasses.dataclass
class StreamingWritten(Written):
    sources: Sources
    device: torch.device
    layer_checks: list[float]  # relative max abs output difference per merged unit
    unprobed: int = 0  # merged units whose module has no forward to probe on its own

    def verify(self, folder: Path) -> dict[str, Any]:
        """Reload onto the meta device; read copied tensors back and check them against their sources."""
        part, sources = self.part, self.sources
        sources.wait()  # a corrupt source is reported as such, not as a bad write
        result: dict[str, Any] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt2hf-reload") as reload:
            # The reload (Python, reading only the headers) runs while the copies are read back (the disk's time
            # and CRC-32's, without the GIL); its verdict comes first.
            loaded = None
            if part.auto_class is not None:
                loaded = reload.submit(verification.load_clean, folder, part.auto_class, self.device, "meta")
            try:
                exact = self._read_back(folder)
            finally:
                if loaded is not None:
                    loaded.result()
        if loaded is not None:
            result["loads_clean"] = True
        result["exact_tensors"] = exact
        if part.auto_class is not None:
            worst = max(self.layer_checks, default=0.0)
            tol = tolerance(part.check_dtype)
            if not worst <= tol:
                raise ConvertError(
                    f"{folder}: a merged layer's output differs from the unmerged layer's by {worst:.3g} (relative; "
                    f"tolerance {tol:.3g}); the merge is wrong, report this with --debug output"
                )
            merged = sum(1 for t in part.written() if t.merged_from is not None)
            result.update(
                merged_tensors=merged,
                max_rel_layer_output_diff=worst,
                layer_tolerance=tol,
                layers_checked=len(self.layer_checks),
                layers_not_probed=self.unprobed,
            )
        return result

    def _read_back(self, folder: Path) -> int:
        """Every copied tensor read back from the written files and checked against its source; how many."""
        part, sources = self.part, self.sources
        copies = {t.name: t for t in part.written() if t.source is not None}
        hub, expected = SavedFormat(part), {}
        exact, checks = 0, []
        for name in verification.written_files(folder):
            written = SafetensorsSource(folder / name, sources.reader)
            for key in written.keys():
                if key not in copies:
                    continue
                origin = hub.source(key)
                if origin in hub.converted:  # computed from the source by transformers: computed again, compared
                    if key not in expected:
                        tensor = next(t for t in part.tensors if t.name == origin)
                        expected = hub.saved.convert({origin: sources.read(tensor.source).to(tensor.dtype)})
                    if not torch.equal(written.read(key), expected.pop(key)):
                        raise ConvertError(f"{folder}: {key} was not written exactly; the disk may be failing")
                else:
                    checks.append((copies[key].source, written, key))
                exact += 1
        # Read back from the disk (O_DIRECT writes left nothing cached) on several threads: a disk serves parallel
        # reads several times faster than one stream of them (0.6 against 2.2 GB/s with 4 on this project's VM).
        # A tensor written unchanged must have the checksum its source stores (checked against the source's bytes
        # when they were read), which saves reading the source again; it is checked in pieces on all the threads
        # (the embeddings are 1.2 GB of an 8B model's), its CRC-32 put together from the pieces'. The others are
        # compared value by value with their sources.
        whole, pieces = [], []
        for ref, written, key in checks:
            source, span = sources.info(ref), written.spans[key]
            if source.crc32 is None or (source.dtype, source.shape) != (span.dtype, span.shape):
                whole.append((ref, written, key))
                continue
            step = max(1, READ_BACK_PIECE // max(1, span.row_bytes))
            pieces += [
                (key, source.crc32, written, span, r, min(span.rows, r + step)) for r in range(0, span.rows, step)
            ]
        with ThreadPoolExecutor(READ_BACK_THREADS, thread_name_prefix="ckpt2hf-readback") as pool:
            crcs = pool.map(lambda p: p[2].reader.crc(p[3], p[4], p[5]), pieces)
            checked = pool.map(lambda c: _check_copy(sources, *c, folder), whole)
            got: dict[str, int] = {}
            for (key, stored, _, span, first, last), crc in zip(pieces, crcs, strict=True):
                got[key] = crc32_combine(got[key], crc, (last - first) * span.row_bytes) if first else crc
                if last == span.rows and got.pop(key) != stored:
                    raise ConvertError(f"{folder}: {key} was not written exactly; the disk may be failing")
            for _ in checked:
                pass  # the first failed check raises here
        return exact


def _check_copy(sources: Sources, ref: TensorRef, written: SafetensorsSource, key: str, folder: Path) -> None:
    """A copied tensor as written must equal its source cast to the written dtype, value by value."""
    pieces = sources.chunks(ref, pooled=True)
    first = next(pieces, None)
    if first is None:
        return
    backs = written.chunks(key, pooled=True, step=first[1] - first[0])
    for (_, _, piece), (_, _, back) in zip(_chain(first, pieces), backs, strict=True):
        same = torch.equal(back, piece.to(back.dtype).reshape(back.shape))
        sources.release(piece)
        written.release(back)
        if not same:
            raise ConvertError(f"{folder}: {key} was not written exactly; the disk may be failing")


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


class _PartWriter:
    """Writes one part with the streaming engine."""

    def __init__(self, engine: StreamingEngine, part: PartPlan, verify: bool) -> None:
        self.engine, self.part, self.verify = engine, part, verify
        self.sources, self.device = engine.sources, engine.device
        self.sha: dict[str, str] = {}
        self._merged: dict[str, torch.Tensor] = {}
        self.merger = UnitMerger(part, self.sources, self.device, verify) if part.adapter is not None else None

    def settle_tie(self) -> None:
        """The adapter changes lm_head or the embeddings of a tied base: merge both first (they are written later
        from memory) and tie them only if the merged values are equal, as the full engine does."""
        part = self.part
        tie = part.tie
        tensors = {t.name: t for t in part.candidates}
        dtypes = {t.name: t.dtype for t in part.candidates}
        values: dict[str, torch.Tensor] = {}
        for key in (tie.head, tie.embed):
            tensor = tensors[key]
            if tensor.merged_from is None:
                values[key] = self.sources.read(tensor.source).float()
            elif key not in values:
                unit = self.merger.units[tensor.merged_from]
                self._merged.update(self.merger.merge(unit, self.merger.read(unit), dtypes, keep=values))
        tie = settled_tie(tie, torch.equal(values[tie.head], values[tie.embed]), "after the merge")
        self.part = dataclasses.replace(part, tie=tie)
        if tie.tied:
            self._merged.pop(tie.head, None)

    # --- writing -------------------------------------------------------------------------------------------
    def write(self, folder: Path) -> StreamingWritten:
        part = self.part
        tensors = {t.name: t for t in part.tensors}
        written = {t.name: t for t in part.written()}
        hub = SavedFormat(part)
        folder.mkdir(parents=True, exist_ok=True)
        files = FileSet(
            folder,
            FileLayout.of(part),
            {name: (t.dtype, t.shape) for name, t in written.items()},
            self.sources.release,
        )
        progress = self.engine.progress
        bar = tqdm(total=len(written), desc=f"streaming {part.name}", unit="tensor", disable=not progress, leave=False)
        order = [tensors[n] for n in dict.fromkeys(hub.source(name) for _, name in files.order)]
        sources = ReadAhead(self._sources(order, hub), size=_source_bytes)
        dtypes = {t.name: t.dtype for t in part.tensors}
        try:
            for filename, name in files.order:
                self._write_tensor(files.stream(filename), name, tensors[hub.source(name)], hub, sources, dtypes)
                files.done(filename)
                bar.update()
            self.sha.update(files.close())
        except BaseException:
            sources.close()
            files.abort()
            raise
        bar.close()
        merger = self.merger
        if merger is not None:
            part = dataclasses.replace(part, adapter=dataclasses.replace(part.adapter, idle=tuple(merger.idle)))
        return StreamingWritten(
            part,
            dict(self.sha),
            merger.precision if merger else {},
            self.sources,
            self.device,
            merger.layer_checks if merger else [],
            merger.unprobed if merger else 0,
        )

    def _sources(self, order: list[OutTensor], hub: SavedFormat) -> Iterator[tuple[str, Any, bool]]:
        """What the writer consumes, in its order (runs on the read thread): ``(module, unit sources, True)`` once
        per merge unit, before its first parameter; ``(name, rows, last)`` for the pieces of a copied tensor (the
        whole tensor, in a buffer of its own, for one the hub's format computes other tensors from)."""
        merged = {t.merged_from for t in order if t.name in self._merged}  # merged already (a tie settled)
        for tensor in order:
            module = tensor.merged_from
            if module is not None:
                if module not in merged:
                    merged.add(module)
                    yield module, self.merger.read(self.merger.units[module]), True
                continue
            if tensor.name in hub.converted:
                yield tensor.name, self.sources.read(tensor.source), True
                continue
            previous = None
            for _, _, piece in self.sources.chunks(tensor.source, pooled=True):
                if previous is not None:
                    yield tensor.name, previous, False
                previous = piece
            # a tensor without elements has no rows to read: it is written as zero bytes
            yield tensor.name, previous if previous is not None else torch.empty(0, dtype=torch.uint8), True

    def _merged_value(self, tensor: OutTensor, sources: ReadAhead, dtypes: dict[str, torch.dtype]) -> torch.Tensor:
        module = tensor.merged_from
        if tensor.name not in self._merged:
            got, unit_sources, _ = next(sources)
            assert got == module, (got, module)
            self._merged.update(self.merger.merge(self.merger.units[module], unit_sources, dtypes))
        return self._merged.pop(tensor.name)

    def _write_tensor(
        self,
        stream: SafetensorsStream,
        name: str,
        tensor: OutTensor,
        hub: SavedFormat,
        sources: ReadAhead,
        dtypes: dict[str, torch.dtype],
    ) -> None:
        """Write the file's tensor ``name``, which comes from the in-memory ``tensor``."""
        if tensor.name in hub.converted:
            if name not in hub.pending:
                if tensor.merged_from is not None:
                    value = self._merged_value(tensor, sources, dtypes)
                else:
                    got, whole, _ = next(sources)
                    assert got == tensor.name, (got, tensor.name)
                    value = cast_checked(tensor.name, whole, tensor.dtype, self.sources.path(tensor.source))
                hub.compute(tensor.name, value)
                if tensor.merged_from is not None:
                    # A merged unit's output may be its pooled source buffer, merged in place. The hub's tensors
                    # computed from it (one per expert) are views of that buffer, and the writer hands back each
                    # tensor's buffer once written: the first expert's would free the buffer for the next read
                    # while the other experts wait to be written. They are written from copies of their own; the
                    # buffer goes back now.
                    hub.pending = {k: v.clone() for k, v in hub.pending.items()}
                    self.sources.release(value)
            stream.write(name, hub.pending.pop(name))
            return
        if tensor.merged_from is not None:
            stream.write(name, self._merged_value(tensor, sources, dtypes))
            return
        last, where = False, self.sources.path(tensor.source)
        while not last:
            got, piece, last = next(sources)
            assert got == tensor.name, (got, tensor.name)
            out = cast_checked(tensor.name, piece, tensor.dtype, where)
            if out.data_ptr() != piece.data_ptr():
                self.sources.release(piece)  # cast into a new tensor: the chunk buffer is free already
            stream.write(name, out)


class SavedFormat:
    """The hub's format for the streaming writer (``save_pretrained``'s: fused experts one tensor per expert): which
    in-memory tensor each file's tensor comes from, and a conversion's outputs waiting for their turn in the files
    (at most one in-memory tensor's per file being written: its outputs are consecutive in that file's order)."""

    def __init__(self, part: PartPlan) -> None:
        self.saved = part.saved
        self.origin: dict[str, str] = {}  # file's tensor -> in-memory tensor
        self.converted: set[str] = set()  # in-memory tensors the files hold computed, not byte for byte
        self.pending: dict[str, torch.Tensor] = {}
        for t in part.tensors:
            outputs = self.saved.of(t.name) if self.saved is not None else ()
            self.origin.update({o.name: t.name for o in outputs})
            if outputs and not (len(outputs) == 1 and outputs[0].renamed):
                self.converted.add(t.name)

    def source(self, name: str) -> str:
        return self.origin.get(name, name)

    def compute(self, name: str, value: torch.Tensor) -> None:
        self.pending.update(self.saved.convert({name: value}))
