"""Start reading the run's files while torch, transformers and PEFT import.

A conversion spends its first seconds importing (pure CPU), and only then reads the checkpoint. Nothing about the
source needs torch to be found (``discover``), so the command line asks the kernel, before the heavy imports, to
read the files a conversion will read into the page cache (``posix_fadvise(WILLNEED)``, from a background thread):
the checkpoint (a file, or a ZeRO / torch.distributed.checkpoint folder), the adapter folder's weights and the base
folders given with ``--base``. When they are cached already this costs microseconds; from a cold disk the reads
overlap the imports instead of following them.

Only the page cache holds the data (not this process), and at most half the memory available is asked for: a
checkpoint larger than that is read ahead from its start, where the conversion begins. The conversion stops the
prefetch once it has planned (``stop_all``): from then on its own reads, in the order it needs the bytes, take the
disk (the optimizer states a Lightning checkpoint holds after the weights are then not read for nothing). This
module must not import torch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".distcp")
_STEP = 256 << 20  # bytes asked for per call, so that a stop request is seen soon


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def weight_files(paths: Iterable[Path]) -> list[Path]:
    """The files under ``paths`` (files, or folders searched recursively for weight files), each once, in order."""
    found: dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and (child.name.endswith(WEIGHT_SUFFIXES) or path.suffix == ".ckpt"):
                    found[child] = None
    return list(found)


class Prefetch:
    """Reads ``files`` into the page cache on a background thread, in order, up to ``budget`` bytes in all."""

    def __init__(self, files: list[Path], budget: int) -> None:
        self.files, self.budget = files, budget
        self.asked = 0  # bytes the kernel was asked to read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckpt2hf-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the conversion reports what it cannot read
            try:
                size = os.fstat(fd).st_size
                offset = 0
                while offset < size and self.asked < self.budget and not self._stop.is_set():
                    n = min(_STEP, size - offset, self.budget - self.asked)
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)
                    offset += n
                    self.asked += n
            except OSError:
                pass  # a file system without readahead advice: the conversion reads as usual
            finally:
                os.close(fd)
        took = time.perf_counter() - started
        log.debug(
            "prefetch: asked the kernel to read %.2f GB of %d files in %.2f s", self.asked / 1e9, len(self.files), took
        )

    def wait(self) -> None:
        """Wait until everything in the budget has been asked for."""
        self._thread.join()

    def stop(self, wait: bool = True) -> None:
        """Ask nothing more (the requests made are served by the kernel anyway); ``wait`` for the thread."""
        self._stop.set()
        if wait:
            self._thread.join()


_started: list[Prefetch] = []


def start(paths: Iterable[Path]) -> Prefetch | None:
    """Begin reading the weight files under ``paths`` into the page cache; None where there is nothing to do (no
    files, no ``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(paths)
    if not files:
        return None
    prefetch = Prefetch(files, available_memory() // 2)
    _started.append(prefetch)
    return prefetch


def stop_all(wait: bool = True) -> None:
    """Stop every prefetch this process started; ``wait`` for their threads (at the end of a command)."""
    for prefetch in _started:
        prefetch.stop(wait=False)
    while wait and _started:
        _started.pop().stop()
