"""Every sha256 ckpt2hf computes, in one place: of the files it writes, and of the source checkpoint.

- Written files: each safetensors file is hashed as it is written, by a ``BufferHash`` that hashes the blocks its
  writer hands to the disk (the engines' streams start one per file); any other file of an export (configs,
  tokenizer, model card) by ``sha256_file`` when the manifest lists it. ``ckpt2hf verify`` checks them all.
- The source checkpoint: identified by its zip records by default (``identity``); its full sha256 only with
  ``--source-sha256``. Hashing a multi-GB checkpoint is CPU-bound (about 1.3 GB/s with SHA extensions, 0.38 GB/s
  without) and needs nothing but the file's path, while importing torch, transformers and PEFT takes seconds: the CLI
  calls ``prefetch`` as soon as it knows the checkpoint so that both run at once, and the conversion later
  ``take``s the running hash.

This module must not import torch.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from . import timings
from .errors import ConvertError


def sha256_file(path: Path, window: int = 8 << 20, stop: threading.Event | None = None) -> str:
    """sha256 of a file, read in windows into one reused buffer (each read and each update releases the GIL).

    Read, not memory-mapped: a source that another process truncates while it is hashed must end in a changed
    digest (which the identity check reports), not in SIGBUS. ``stop``: when set, hashing ends early and the
    returned digest means nothing.
    """
    digest = hashlib.sha256()
    buffer = bytearray(window)
    view = memoryview(buffer)
    with timings.timed("hashing"), open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                break
    return digest.hexdigest()


class BufferHash:
    """sha256 of a file's bytes as its writer hands them to the disk, computed on a thread of its own.

    The writer hands over each block it has written (``update(block, done)``, in file order); the hasher hashes it
    and calls ``done()`` (which gives the block back to the writer's pool), so that neither the producer nor the
    writer waits for the hash (a core without SHA extensions hashes at about 0.38 GB/s, slower than the rest of the
    pipeline). A finished file's hasher runs on while the next file is written: the shards of a large export are
    hashed in parallel.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt2hf-hash", daemon=True)
        self._thread.start()

    def update(self, block: memoryview, done: Callable[[], None]) -> None:
        """Hash ``block`` next (it must stay unchanged until ``done`` is called, on the hasher's thread)."""
        self._queue.put((block, done))

    def finish(self) -> None:
        """No more blocks."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            block, done = item
            try:
                if self._error is None:
                    with timings.timed("hashing"):
                        self._sha.update(block)  # releases the GIL
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self._error = exc
            finally:
                done()

    def result(self) -> str:
        """The hex digest, once every block handed over is hashed (call ``finish`` first)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()


def _files(path: Path) -> list[Path]:
    """The file itself, or every file under a folder (sorted by relative path)."""
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    return [path]


def sha256_path(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a file; for a folder (a multi-GPU checkpoint), the sha256 of its ``sha256sum`` listing: one line
    ``<sha256>  <relative path>`` per file, sorted by path."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path, stop=stop)
    lines = []
    for file in _files(path):
        lines.append(f"{sha256_file(file, stop=stop)}  {file.relative_to(path).as_posix()}\n")
        if stop is not None and stop.is_set():
            break
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _identity(path: Path) -> tuple:
    """What must not change while a file or folder is hashed: device, inode, size, mtime of each file."""
    found = []
    for file in _files(path):
        st = os.stat(file)
        found.append((file.as_posix(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    return sum(p.stat().st_size for p in _files(Path(path)))


class BackgroundHash:
    """sha256 of one file (or folder, see ``sha256_path``), computed on a daemon thread; ``result()`` waits for it.

    The file's identity (device, inode, size, mtime) is taken before and after hashing: a file replaced or
    modified meanwhile is an error rather than a wrong digest.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stop = threading.Event()
        self._digest: str | None = None
        self._error: str | None = None
        self._identity = _identity(self.path)
        self._thread = threading.Thread(target=self._run, name="ckpt2hf-source-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            digest = sha256_path(self.path, stop=self._stop)
            if _identity(self.path) != self._identity:
                self._error = "it changed while being read; convert a checkpoint that is no longer being written"
            else:
                self._digest = digest
        except OSError as exc:
            self._error = f"cannot read it to hash it ({exc.strerror or exc})"

    def same_file(self, path: Path) -> bool:
        """True if ``path`` is the file being hashed, unchanged since hashing started."""
        try:
            return _identity(Path(path)) == self._identity
        except OSError:
            return False

    def cancel(self, wait: bool = False) -> None:
        """Stop hashing (the thread ends after its current window); ``result()`` is then an error.

        ``wait``: return only once the thread has ended.
        """
        self._stop.set()
        if wait:
            self._thread.join()

    def result(self) -> str:
        """The hex digest; ConvertError if the file could not be read or changed meanwhile."""
        self._thread.join()
        if self._stop.is_set():
            raise RuntimeError("result() of a cancelled hash")
        if self._error is not None:
            raise ConvertError(f"{self.path}: {self._error}")
        return self._digest


_prefetched: dict[Path, BackgroundHash] = {}
_lock = threading.Lock()


def prefetch(path: Path) -> BackgroundHash | None:
    """Start hashing ``path`` in the background unless it is being hashed already; return the running hash
    (None if the file cannot be read: the conversion reports that)."""
    key = Path(path).resolve()
    with _lock:
        if key not in _prefetched:
            try:
                _prefetched[key] = BackgroundHash(key)
            except OSError:
                return None
        return _prefetched[key]


def take(path: Path) -> BackgroundHash:
    """The prefetched hash of ``path`` if one is running for the same unchanged file, else a new one."""
    key = Path(path).resolve()
    with _lock:
        started = _prefetched.pop(key, None)
    if started is not None and started.same_file(key):
        return started
    if started is not None:
        started.cancel()
    try:
        return BackgroundHash(key)
    except OSError as exc:
        raise ConvertError(f"{key}: cannot read it to hash it ({exc.strerror or exc})") from exc


def cancel_prefetched() -> None:
    """Stop the prefetched hashes nobody took (a conversion that failed or never started) and wait for them."""
    with _lock:
        started = list(_prefetched.values())
        _prefetched.clear()
    for hasher in started:
        hasher.cancel(wait=True)
