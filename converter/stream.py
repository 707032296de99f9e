"""The streaming engine: tensor by tensor, in bounded memory, with PEFT's own per-layer ``merge()``.

For each output tensor, in the order of the export's files: a copied tensor is read in row chunks from the
checkpoint (``pread``, CRC-32 checked on the way), cast and handed to a background writer; a merged weight is
produced by materialising only its LoRA layer (base weight, lora_A, lora_B, DoRA magnitude) in float32 on the merge
device, calling the layer's ``merge()`` -- the same call ``merge_and_unload`` makes -- and casting the result. The
PEFT model itself lives on the meta device. Peak memory is about one LoRA layer plus a few chunks, whatever the
model's size.

Verification streams too: each merged layer's output on a random input is compared with the unmerged layer's
before its memory is released; copied tensors are read back from the written files and checked against their
sources (against the source record's CRC-32 where the bytes are unchanged, value by value where the dtype changed);
and the folder is reloaded by ``from_pretrained`` onto the meta device (key names, shapes and the load
report, without reading data).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import verify as checks
from .errors import ConvertError
from .keymap import PEFT_PREFIX
from .lazy import DTYPE_NAMES, Span, SpanReader, safetensors_spans, stored_crc, tensor_bytes
from .verify import check_finite

if TYPE_CHECKING:
    from .components import HFPart

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


WRITEBACK_STEP = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing these bytes to disk now (Linux ``sync_file_range``; no waiting), so that the
    final fsync finds little left to do. Elsewhere a no-op."""
    fn = getattr(_LIBC, "sync_file_range", None)
    if fn is not None:
        fn(ctypes.c_int(fd), ctypes.c_int64(offset), ctypes.c_int64(nbytes), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


IN_FLIGHT_BYTES = 64 << 20  # bytes a stage may hand on before the next one has consumed them (per stage)


class ByteBudget:
    """Bounds the bytes one thread has handed to the next and that are not consumed yet, so that memory does not
    grow with the size of the items: ``acquire(n)`` waits while others hold the budget (an item larger than the
    whole budget still passes, alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Take ``nbytes``; False (nothing taken) if ``stop`` is set while waiting."""
        with self._cond:
            while self.held > 0 and self.held + nbytes > self.limit:
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()


def _nbytes(block: Any) -> int:
    return block.numel() * block.element_size() if isinstance(block, torch.Tensor) else len(block)


class SafetensorsStream:
    """Writes a safetensors file whose tensors are known up front; bytes are appended in header order by a
    background writer thread, and hashed (sha256) by a second one, so neither pass holds up the producer."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict,
        release: Any = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.order = []
        for name, dtype, shape in entries:
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.sha = path, hashlib.sha256()
        self._release = release or (lambda tensor: None)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._queue: queue.Queue = queue.Queue()
        self._hash_queue: queue.Queue = queue.Queue()
        self._budget = ByteBudget(IN_FLIGHT_BYTES)  # queued for writing or hashing
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._hasher = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()
        self._hasher.start()
        self._put(len(raw).to_bytes(8, "little") + raw)
        self._expected = iter(self.order)
        self._current: tuple[str, int] | None = None
        self._left = 0

    @staticmethod
    def _bytes(block: Any) -> Any:
        return tensor_bytes(block) if isinstance(block, torch.Tensor) else block

    def _drain(self) -> None:
        written = flushed = 0
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    written += self._fh.write(self._bytes(block))
                    if written - flushed >= WRITEBACK_STEP:
                        _start_writeback(self._fh.fileno(), flushed, written - flushed)
                        flushed = written
                except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                    self._error = exc
            self._hash_queue.put(block)
        self._hash_queue.put(None)
        if self._error is None:
            try:  # flush this file to disk now, while the next one is produced
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _hash(self) -> None:
        while (block := self._hash_queue.get()) is not None:
            self.sha.update(self._bytes(block))
            self._budget.release(_nbytes(block))
            if isinstance(block, torch.Tensor):
                self._release(block)

    def _put(self, block: Any) -> None:
        if self._error is not None:
            raise self._error
        self._budget.acquire(_nbytes(block))
        self._queue.put(block)

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (a whole tensor or the next rows of it)."""
        if self._left == 0:
            self._current = next(self._expected)
            self._left = self._current[1]
        if name != self._current[0]:
            raise RuntimeError(f"expected {self._current[0]}, got {name}")
        piece = piece.detach().to("cpu").contiguous()
        self._left -= piece.numel() * piece.element_size()
        self._put(piece)

    def finish(self) -> None:
        """No more tensors: the background thread writes what is queued, then fsyncs the file."""
        self._queue.put(None)

    def close(self) -> str:
        """Wait for the file to be written and fsynced; return its sha256; raise the writer's error if any."""
        self._thread.join()
        self._hasher.join()
        self._fh.close()
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        self._hasher.join()
        self._fh.close()


class ReadAhead:
    """Runs a generator on a background thread, ahead of the consumer by at most ``limit`` bytes of items (as
    ``size`` counts them; one item at least).

    Reading and checking the sources (``pread``, CRC-32) then overlaps with merging and casting on the calling
    thread. An exception in the generator is raised by ``next()`` in the consumer; ``close()`` stops it early.
    """

    def __init__(self, items: Iterator[Any], size: Any = lambda item: 1, limit: int = IN_FLIGHT_BYTES) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._size = size
        self._budget = ByteBudget(limit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="ckpt2hf-read", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._budget.acquire(self._size(item), self._stop):
                    return
                self._queue.put(("item", item))
            self._queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(("error", exc))

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        self._budget.release(self._size(value))
        return value

    def close(self) -> None:
        """Stop reading ahead and wait for the thread to end."""
        self._stop.set()  # a producer waiting for budget sees it within 0.1 s
        self._thread.join()


def _source_bytes(item: tuple[str, Any, bool]) -> int:
    """Bytes of a read-ahead item: a chunk, or the sources of one LoRA layer."""
    _, data, _ = item
    tensors = data.values() if isinstance(data, dict) else [data]
    return sum(t.numel() * t.element_size() for t in tensors)


def _probe(base: torch.nn.Module, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A random input for a LoRA layer's base module (Linear, Conv1D, Embedding)."""
    if isinstance(base, torch.nn.Embedding):
        return torch.randint(0, base.num_embeddings, (8,), generator=generator).to(device)
    weight = base.weight
    fan_in = weight.shape[0] if type(base).__name__ == "Conv1D" else weight.shape[1]
    return torch.randn(8, fan_in, generator=generator).to(device)


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


class StreamingWriter:
    """Writes one HF part with the streaming engine."""

    def __init__(self, part: HFPart, reader: SpanReader, verify: bool) -> None:
        _return_freed_memory_to_the_os()
        self.part, self.reader, self.verify = part, reader, verify
        self.ctx = part.ctx
        self.dtype_override = part.out_dtype()
        self.device = self.ctx.device
        self.generator = torch.Generator().manual_seed(1234)
        self.module_checks: list[float] = []  # relative max abs diff per merged layer
        self.sha: dict[str, str] = {}
        self._merged: dict[str, torch.Tensor] = {}
        self.peft = None
        self.of_module: dict[str, str] = {}  # plain key -> LoRA module path, for merged base-layer params
        if part.layout is not None:
            from .merge import build_peft_model

            self.peft = build_peft_model(part.hf_config, part.lora_config, part.layout.adapter_name, "meta")
            lora = set(part.layout.lora_modules)
            for plain, rel in part.plain.items():
                inner = rel.removeprefix(PEFT_PREFIX)
                module, _, leaf = inner.rpartition(".base_layer.")
                if module in lora and "." not in leaf:
                    self.of_module[plain] = module

    # --- sources -----------------------------------------------------------------------------------------
    def _whole(self, rel: str, writable: bool = False) -> torch.Tensor:
        """The whole source tensor; ``writable``: a buffer of its own (lent from the reader's pool: ``release`` it),
        checked already, that may be modified."""
        span = self.part.source_span(rel)
        if span is not None:
            return self.reader.read(span, check_now=writable, pooled=writable)
        tensor = self.part.source_tensor(rel)
        return tensor.clone() if writable else tensor

    def _chunks(self, rel: str, pooled: bool = False) -> Iterator[torch.Tensor]:
        span = self.part.source_span(rel)
        if span is not None:
            for _, _, piece in self.reader.chunks(span, pooled):
                yield piece
        else:
            yield self._whole(rel)

    def out_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        if self.dtype_override is not None and source_dtype.is_floating_point:
            return self.dtype_override
        return source_dtype

    # --- merge ---------------------------------------------------------------------------------------------
    def _layer_sources(self, module: str) -> dict[str, torch.Tensor]:
        """The source tensors of one LoRA layer (base weight, lora_A, lora_B, DoRA magnitude...), each in a buffer
        of its own with its CRC-32 checked: merge() adds into the base weight in place. Runs on the read thread."""
        layer = self.peft.get_submodule(PEFT_PREFIX + module)
        return {name: self._whole(f"{PEFT_PREFIX}{module}.{name}", writable=True) for name in layer.state_dict()}

    def _merge(self, module: str, sources: dict[str, torch.Tensor]) -> None:
        """Materialise one LoRA layer in float32 on the device, merge it with PEFT, keep its base params."""
        part = self.part
        layer = self.peft.get_submodule(PEFT_PREFIX + module)
        state = {name: t.to(self.device, torch.float32, non_blocking=True) for name, t in sources.items()}
        layer.load_state_dict(state, assign=True, strict=True)
        base = layer.get_base_layer()
        with torch.no_grad():
            if self.verify:
                x = _probe(base, self.device, self.generator)
                reference = layer(x)
            layer.merge(adapter_names=[part.layout.adapter_name])
            written = set()  # storages that go to the writer, which releases them once written
            for pname, param in base.named_parameters(recurse=False):
                key = f"{module}.{pname}"
                cast = param.detach().to(self.out_dtype(param.dtype))
                self._merged[key] = check_finite(key, param.detach(), cast, self.ctx.checkpoint_path)
                written.add(cast.untyped_storage().data_ptr())
            if self.verify:
                weight = base.weight
                weight.data = self._merged[f"{module}.weight"].to(torch.float32)
                if getattr(base, "bias", None) is not None:
                    base.bias.data = self._merged[f"{module}.bias"].to(torch.float32)
                got = layer(x)  # merged: the base module alone, with the weights as written
                diff = float((got - reference).abs().max()) / max(1.0, float(reference.abs().max()))
                self.module_checks.append(diff)
        layer.to_empty(device="meta")
        # A source buffer merged in place and written as it is belongs to the writer now; the others go back now.
        for tensor in sources.values():
            if tensor.untyped_storage().data_ptr() not in written:
                self.reader.release(tensor)

    # --- writing -------------------------------------------------------------------------------------------
    def write(self, folder: Path) -> dict[str, Any]:
        from huggingface_hub import split_state_dict_into_shards_factory

        part = self.part
        planned = part.planned()
        shapes = {k: (self.out_dtype(t.dtype), tuple(t.shape)) for k, t in planned.items()}
        split = split_state_dict_into_shards_factory(
            shapes,
            get_storage_size=lambda spec: spec[0].itemsize * max(1, torch.Size(spec[1]).numel()),
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=self.ctx.max_shard_size,
        )
        folder.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=len(planned),
            desc=f"streaming {part.comp.name}",
            unit="tensor",
            disable=not self.ctx.progress,
            leave=False,
        )
        streams: dict[str, SafetensorsStream] = {}
        order = [name for names in split.filename_to_tensors.values() for name in names]
        sources = ReadAhead(self._sources(order), size=_source_bytes)
        try:
            for filename, names in split.filename_to_tensors.items():
                entries = [(n, *shapes[n]) for n in names]
                stream = streams[filename] = SafetensorsStream(
                    folder / filename, entries, {"format": "pt"}, self.reader.release
                )
                for name in names:
                    self._write_tensor(stream, name, shapes[name][0], sources)
                    bar.update()
                stream.finish()  # its thread completes and fsyncs it while the next file is produced
            for filename, stream in streams.items():
                self.sha[filename] = stream.close()
        except BaseException:
            sources.close()
            for stream in streams.values():
                stream.abort()
            raise
        bar.close()
        if split.is_sharded:
            index = {"metadata": {**split.metadata, "format": "pt"}, "weight_map": split.tensor_to_filename}
            (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return {"files": list(split.filename_to_tensors)}

    def _sources(self, order: list[str]) -> Iterator[tuple[str, Any, bool]]:
        """What the writer consumes, in its order (runs on the read thread): ``(module, layer sources, True)`` once
        per merged layer, before its first parameter; ``(name, rows, last)`` for the pieces of a copied tensor."""
        merged: set[str] = set()
        for name in order:
            module = self.of_module.get(name)
            if module is not None:
                if module not in merged:
                    merged.add(module)
                    yield module, self._layer_sources(module), True
                continue
            previous = None
            for piece in self._chunks(self.part.plain[name], pooled=True):
                if previous is not None:
                    yield name, previous, False
                previous = piece
            # a tensor without elements has no rows to read: it is written as zero bytes
            yield name, previous if previous is not None else torch.empty(0, dtype=torch.uint8), True

    def _write_tensor(self, stream: SafetensorsStream, name: str, dtype: torch.dtype, sources: ReadAhead) -> None:
        module = self.of_module.get(name)
        if module is not None:
            if name not in self._merged:
                got, layer_sources, _ = next(sources)
                assert got == module, (got, module)
                self._merge(module, layer_sources)
            stream.write(name, self._merged.pop(name))
            return
        last = False
        while not last:
            got, piece, last = next(sources)
            assert got == name, (got, name)
            out = check_finite(name, piece, piece.to(dtype), self.ctx.checkpoint_path)
            if out.data_ptr() != piece.data_ptr():
                self.reader.release(piece)  # cast into a new tensor: the chunk buffer is free already
            stream.write(name, out)

    # --- verification --------------------------------------------------------------------------------------
    def verify_written(self, folder: Path) -> dict[str, Any]:
        """Reload onto the meta device; read copied tensors back and check them against their sources."""
        part = self.part
        self.reader.wait_crc()  # a corrupt source is reported as such, not as a bad write
        checks.load_clean(folder, part.auto_class, self.device, device_map="meta")
        written: dict[str, Span] = {}
        for name in sorted(folder.glob("model*.safetensors")):
            written.update(safetensors_spans(name))
        exact = 0
        for name, span in written.items():
            if name in self.of_module:
                continue
            exact += 1
            source = part.source_span(part.plain[name])
            stored = stored_crc(source) if source is not None else None
            if stored is not None and (source.dtype, source.shape) == (span.dtype, span.shape):
                # Written unchanged: the bytes read back must have the source record's CRC-32 (checked against
                # the source's bytes when they were read), which saves reading the source a second time.
                if self.reader.crc(span) != stored:
                    raise ConvertError(f"{folder}: {name} was not written exactly; the disk may be failing")
                continue
            offset = 0
            for piece in self._chunks(part.plain[name], pooled=True):
                rows = piece.shape[0] if piece.dim() else 1
                back = (
                    self.reader.rows(span, offset, offset + rows, pooled=True)
                    if span.shape
                    else self.reader.rows(span, 0, 1)
                )
                offset += rows
                same = torch.equal(back, piece.to(span.dtype).reshape(back.shape))
                self.reader.release(piece)
                self.reader.release(back)
                if not same:
                    raise ConvertError(f"{folder}: {name} was not written exactly; the disk may be failing")
        worst = max(self.module_checks, default=0.0)
        dtype = self.dtype_override or torch.float32
        tol = checks.LOGIT_TOLERANCE.get(dtype, 1e-2)
        if not worst <= tol:
            raise ConvertError(
                f"{folder}: a merged layer's output differs from the unmerged layer's by {worst:.3g} (relative; "
                f"tolerance {tol:.3g}); the merge is wrong, report this with --debug output"
            )
        return {
            "loads_clean": True,
            "exact_tensors": exact,
            "merged_tensors": len(self.of_module),
            "max_rel_layer_output_diff": worst,
            "layer_tolerance": tol,
            "layers_checked": len(self.module_checks),
        }
