"""The source checkpoint's identity for the manifest, from what the checkpoint already stores.

A ``torch.save`` file is a zip whose central directory holds every record's name, size and CRC-32: together they
identify the content (a changed tensor changes its CRC-32) and they are read in milliseconds, where a full-file
sha256 of a multi-GB checkpoint, two thirds of it optimizer states the conversion never reads, costs seconds to
tens of seconds of a core (about 1.3 GB/s with SHA extensions, 0.38 GB/s without). The CRC-32s of the records the
conversion reads are checked against their bytes as they are read anyway.

The identity of a file is the sha256 of its record listing; torch.distributed.checkpoint's ``.distcp`` files hold
one ``torch.save`` stream per chunk (their offsets are in ``.metadata``), each listed the same way. A file with no
stored checksums (safetensors, the legacy torch format, a pickle) is hashed in full. The identity of a checkpoint
folder is the sha256 of its files' lines. It is content-only: the same checkpoint copied elsewhere has the same
identity (the manifest records sizes and modification times beside it). CRC-32 is no cryptographic hash: for a
tamper-evident record, ``--source-sha256`` adds the full sha256 (``hashing``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConvertError
from .hashing import sha256_file

log = logging.getLogger(__name__)

RECORDS = "zip records"  # name, size and CRC-32 of every record
FULL = "sha256"  # every byte


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """One file of the checkpoint: how it was identified, and the digest."""

    path: str  # relative to the checkpoint (the file's name for a single file)
    bytes: int
    mtime_ns: int
    method: str  # RECORDS or FULL
    records: int  # zip records listed (0 for FULL)
    digest: str

    def line(self) -> str:
        return f"{self.digest}  {self.bytes}  {self.method}  {self.path}\n"


@dataclasses.dataclass(frozen=True)
class SourceIdentity:
    """What identifies a checkpoint (file or folder); ``check_unchanged`` before the export is committed."""

    path: Path
    files: tuple[FileIdentity, ...]
    stats: tuple[tuple[int, int, int, int], ...]  # (device, inode, size, mtime) of each file

    @property
    def digest(self) -> str:
        if len(self.files) == 1 and not self.path.is_dir():
            return self.files[0].digest
        return hashlib.sha256("".join(f.line() for f in self.files).encode()).hexdigest()

    @property
    def method(self) -> str:
        methods = {f.method for f in self.files}
        if methods == {RECORDS}:
            return "sha256 of the zip records (name, size, CRC-32)" + (" of every file" if len(self.files) > 1 else "")
        if methods == {FULL}:
            return "sha256 of every byte" + (" of every file" if len(self.files) > 1 else "")
        return "sha256 of the zip records (name, size, CRC-32) of each file that has them, of every byte of the others"

    def record(self) -> dict[str, Any]:
        """The manifest's ``source.checkpoint.identity``."""
        newest = max((f.mtime_ns for f in self.files), default=0)
        record: dict[str, Any] = {
            "method": self.method,
            "digest": self.digest,
            "records": sum(f.records for f in self.files),
            "modified": datetime.datetime.fromtimestamp(newest / 1e9, datetime.UTC).isoformat(timespec="seconds"),
        }
        full = [f.path for f in self.files if f.method == FULL]
        if full and len(self.files) > 1:
            record["hashed_in_full"] = full
        return record

    def check_unchanged(self) -> None:
        """ConvertError if a file of the checkpoint was replaced or modified since the identity was taken."""
        try:
            now = _stats(self.path)
        except OSError:
            now = ()
        if now != self.stats:
            raise ConvertError(
                f"{self.path}: it changed while being read; convert a checkpoint that is no longer being written"
            )


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    return [path]


def _stats(path: Path) -> tuple[tuple[int, int, int, int], ...]:
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(f) for f in _files(path)))


def _listing(archive: zipfile.ZipFile) -> list[str]:
    return [f"{i.filename}\t{i.file_size}\t{i.CRC:08x}\n" for i in archive.infolist()]


def _zip_lines(file: Path, blobs: Sequence[tuple[int, int]] | None) -> list[str] | None:
    """The record listing of a zip file, or of each zip stream at (offset, length) in it; None if it has none."""
    from .sources.unpickle import ZIP_ERRORS, Window

    try:
        if blobs is None:
            if not zipfile.is_zipfile(file):
                return None
            with zipfile.ZipFile(file) as archive:
                return _listing(archive)
        lines = []
        for offset, length in sorted(blobs):
            with Window(file, offset, length) as window, zipfile.ZipFile(window) as archive:
                lines.append(f"@{offset}+{length}\n")
                lines += _listing(archive)
        return lines
    except ZIP_ERRORS as exc:
        log.info("%s: no readable zip records (%s); hashing it in full", file, exc)
        return None


def source_identity(path: Path, blobs: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> SourceIdentity:
    """The identity of checkpoint ``path`` (a file or a folder). ``blobs``: for files that hold zip streams at
    offsets (torch.distributed.checkpoint's ``.distcp``), relative path -> (offset, length) of each."""
    path = Path(path)
    blobs = blobs or {}
    try:
        stats = _stats(path)
        found = []
        for file, (_, _, size, mtime) in zip(_files(path), stats, strict=True):
            rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
            lines = _zip_lines(file, blobs.get(rel))
            if lines is not None:
                digest = hashlib.sha256("".join(lines).encode()).hexdigest()
                records = sum(1 for line in lines if not line.startswith("@"))
                found.append(FileIdentity(rel, size, mtime, RECORDS, records, digest))
            else:
                found.append(FileIdentity(rel, size, mtime, FULL, 0, sha256_file(file)))
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    return SourceIdentity(path, tuple(found), stats)
