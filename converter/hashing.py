"""sha256 of files, and of the source checkpoint on a background thread started before the heavy imports.

The manifest records the source checkpoint's sha256. Hashing a multi-GB checkpoint is CPU-bound (about 1.2 GB/s
with SHA-NI) and needs nothing but the file's path, while importing torch, transformers and PEFT takes seconds on
one core: the CLI calls ``prefetch`` as soon as it knows the checkpoint so that both run at once, and the
conversion later ``take``s the running hash. This module must not import torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

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
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                break
    return digest.hexdigest()


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
