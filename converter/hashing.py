"""Every sha256 ckpt2hf computes, in one place: of the files it writes, and of the source checkpoint.

- Written files: each safetensors file is hashed as it is written, by a ``TrailingHash`` that follows its writer
  through the page cache (the engines' streams start one per file); any other file of an export (configs,
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
import mmap
import os
import threading
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


HASH_WINDOW = 16 << 20  # bytes of the written file a hasher maps at a time
# At most this many files are hashed at once (a finished shard's hasher runs on while the next shard is written).
_HASHERS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


class TrailingHash:
    """sha256 of a file as it is being written, read back from the page cache behind the writer.

    The writer reports how far the file is written (``advance``); the hasher maps each newly written window and
    hashes it on its own thread, so that neither the producer nor the writer waits for the hash (a core without SHA
    extensions hashes at about 0.38 GB/s, slower than the rest of the pipeline), and the buffers written go back at
    once. Several files' hashers run at the same time, up to the number of cores.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sha = hashlib.sha256()
        self._written = 0
        self._done = False
        self._failed = False
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt2hf-hash", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify()

    def finish(self, failed: bool = False) -> None:
        """The writer is done (``failed``: it stopped early; the hasher stops too)."""
        with self._cond:
            self._done, self._failed = True, failed
            self._cond.notify()

    def _ready(self, hashed: int) -> tuple[int, bool]:
        """Bytes written and whether writing is over, once a full window (or the end) is there to hash."""
        with self._cond:
            while not self._done and self._written - hashed < HASH_WINDOW:
                self._cond.wait()
            return self._written, self._done

    def _run(self) -> None:
        hashed = 0
        try:
            with _HASHERS, open(self.path, "rb", buffering=0) as fh:
                while True:
                    written, done = self._ready(hashed)
                    if self._failed:
                        return
                    hashed = self._hash_range(fh.fileno(), hashed, written)
                    if done and hashed >= written:
                        return
        except BaseException as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def _hash_range(self, fd: int, start: int, stop: int) -> int:
        """Hash bytes ``start:stop`` of the file through read-only mappings (the pages the writer just filled)."""
        granule = mmap.ALLOCATIONGRANULARITY
        while start < stop:
            base = start - start % granule
            length = min(stop, base + HASH_WINDOW) - base
            with timings.timed("hashing"), mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=base) as mapped:
                self._sha.update(memoryview(mapped)[start - base :])  # releases the GIL
            start = base + length
        return start

    def result(self) -> str:
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
