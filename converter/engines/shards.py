"""A part's safetensors files: which tensors go into which file (huggingface_hub's split, and its index), and
the writing of them, several files at once (``FileSet``): one ``SafetensorsStream`` each, the open files taking
the producer's tensors in turn."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConvertError
from ..names import FILES_AT_ONCE, SAFETENSORS_METADATA, SHARD_PATTERN, WEIGHTS, WEIGHTS_INDEX
from .streams import Budgets, SafetensorsStream

if TYPE_CHECKING:
    from ..plan import PartPlan


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """Which tensors go into which safetensors file (huggingface_hub's split: names, order, index)."""

    files: dict[str, list[str]]  # file name -> tensor names, in writing order
    split: Any = None  # huggingface_hub's StateDictSplit when sharding was asked for

    @classmethod
    def of(cls, part: PartPlan) -> FileLayout:
        if part.max_shard_size is None:
            return cls({WEIGHTS: [t.name for t in part.written()]})
        from huggingface_hub import split_state_dict_into_shards_factory

        split = split_state_dict_into_shards_factory(
            {t.name: t for t in part.written()},
            get_storage_size=lambda t: max(1, t.nbytes),
            filename_pattern=SHARD_PATTERN,
            max_shard_size=part.max_shard_size,
        )
        return cls(dict(split.filename_to_tensors), split)

    def write_index(self, folder: Path) -> None:
        """model.safetensors.index.json, when the part is sharded."""
        if self.split is not None and self.split.is_sharded:
            index = {
                "metadata": {**self.split.metadata, **SAFETENSORS_METADATA},
                "weight_map": self.split.tensor_to_filename,
            }
            (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def files_at_once() -> int:
    """How many files of a sharded export are written at once: ``CKPT2HF_FILES_AT_ONCE`` if set, else one per four
    cores, at most 4 (so 1 on a machine of up to 7 cores).

    A file's sha256 runs front to back on one core (1.3 to 1.6 GB/s with SHA extensions), no faster than a durable
    copy of the file, while the H200 machine's disk takes direct writes at 2.6 GB/s: only files hashed side by side
    keep the disk busy. On that machine (16 cores) an 8B conversion takes 15.4 s one file at a time, 14.3 s two at a
    time and 11.4 s four at a time (the floor: 10.5 s). Each open file takes a core for its hash and a little of
    another for its copier and disk thread, and 48 MB of staging buffers."""
    chosen = os.environ.get(FILES_AT_ONCE)
    if chosen:
        try:
            return max(1, int(chosen))
        except ValueError:
            raise ConvertError(f"{FILES_AT_ONCE}={chosen!r}: not a number of files; unset it or give one") from None
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class FileSet:
    """A part's safetensors files (``FileLayout``), written at most ``at_once`` at a time.

    ``order`` is the order in which the producer must hand over the tensors, as ``(file, tensor)``: each file's
    tensors in its own order, the open files interleaved (the next tensor always comes from the open file with the
    most bytes still to write, so that they finish together); a file opens when another one is done. Each file's
    bytes are what writing the files one after the other gives. Every stream shares the byte budgets for what is
    queued and not yet copied (``Budgets``), whatever ``at_once``; each open file adds its own staging buffers.
    """

    def __init__(
        self,
        folder: Path,
        layout: FileLayout,
        entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        release: Any = None,
        at_once: int | None = None,
    ) -> None:
        self.folder, self.layout, self.entries, self.release = folder, layout, entries, release
        self._budgets = Budgets()
        self._streams: dict[str, SafetensorsStream] = {}
        self._left = {filename: len(names) for filename, names in layout.files.items()}
        self.order = self._schedule(at_once or files_at_once())

    def _nbytes(self, name: str) -> int:
        dtype, shape = self.entries[name]
        return dtype.itemsize * math.prod(shape)

    def _schedule(self, at_once: int) -> list[tuple[str, str]]:
        waiting = deque(self.layout.files.items())
        opened: list[list[Any]] = []  # [file, its tensors not yet scheduled, their bytes]
        order = []
        while waiting or opened:
            while waiting and len(opened) < at_once:
                filename, names = waiting.popleft()
                if names:
                    opened.append([filename, deque(names), sum(self._nbytes(n) for n in names)])
            if not opened:
                break
            current = max(opened, key=lambda f: f[2])  # the first of the largest on a tie
            name = current[1].popleft()
            current[2] -= self._nbytes(name)
            order.append((current[0], name))
            if not current[1]:
                opened.remove(current)
        return order

    def stream(self, filename: str) -> SafetensorsStream:
        """The file's stream (opened at its first tensor)."""
        stream = self._streams.get(filename)
        if stream is None:
            entries = [(n, *self.entries[n]) for n in self.layout.files[filename]]
            stream = self._streams[filename] = SafetensorsStream(
                self.folder / filename, entries, dict(SAFETENSORS_METADATA), self.release, self._budgets
            )
        return stream

    def done(self, filename: str) -> None:
        """One more of the file's tensors has been handed over whole; after its last, the file completes and is
        fsynced on its thread while the others are produced."""
        self._left[filename] -= 1
        if self._left[filename] == 0:
            self._streams[filename].finish()

    def close(self) -> dict[str, str]:
        """Wait for every file (a file without tensors is written now) and write the index; file -> sha256, in the
        layout's order."""
        hashes = {}
        for filename in self.layout.files:
            if self._left[filename]:
                raise RuntimeError(f"{filename}: {self._left[filename]} tensors were never handed over")
            stream = self.stream(filename)
            if not self.layout.files[filename]:
                stream.finish()
            hashes[filename] = stream.close()
        self.layout.write_index(self.folder)
        return hashes

    def abort(self) -> None:
        for stream in self._streams.values():
            stream.abort()


def write_tensors(folder: Path, part: PartPlan, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write tensors already in memory as the part's safetensors file(s) (and index); return file -> sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    files = FileSet(folder, FileLayout.of(part), {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    try:
        for filename, name in files.order:
            files.stream(filename).write(name, tensors[name])
            files.done(filename)
        return files.close()
    except BaseException:
        files.abort()
        raise
