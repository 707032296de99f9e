"""A restricted, lazy reader for PyTorch's zip checkpoints that never executes a checkpoint's code.

How it works (after torch's ``weights_only`` unpickler and mergekit's lazy unpickler):

- Globals on torch's own allowlist (tensor-rebuilding functions, dtypes, storages, ``OrderedDict``, ...) and a few
  plain builtin types resolve to the real objects.
- Every other global resolves to an inert *placeholder class*. Calling it (pickle's REDUCE), allocating it (NEWOBJ)
  or restoring its state (BUILD) only records the arguments: nothing outside the allowlist ever runs.
- After unpickling, the object tree is walked. A placeholder for a global that can act on the system (``os.system``,
  ``subprocess.*``, ``builtins.eval``, ``runpy``, ``importlib``, ...), or a call of any non-class global outside the
  allowlist, makes the file hostile: ``HostileCheckpoint`` names the global and where it sits. Placeholders for
  classes (an ``argparse.Namespace``, a ``pathlib`` path, an OmegaConf container, a class that no longer exists)
  are benign: they stay as placeholders and are reported, so the weights still convert.
- Tensor data is memory-mapped straight from the zip records (torch writes them uncompressed), so nothing is read
  until a tensor is touched; ``Loaded.records`` says where each record is and the CRC-32 the zip stores for it.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, untrusted
from .placeholders import (
    HostileCheckpoint,
    Placeholder,
    allowed_globals,
    dangerous_globals,
    placeholder_class,
    verdict,
    walk,
)
from .pread import Record


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: Any, allowed: dict[str, Any], load_storage: Any) -> None:
        super().__init__(fh)
        self._allowed = allowed
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 pickles write them, e.g. __builtin__.eval): map them as pickle itself would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = self._allowed.get(f"{module}.{name}")
        return found if found is not None else placeholder_class(module, name)

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(saved_id)[:60]}")
        _, storage_type, key, _location, numel = saved_id
        if isinstance(storage_type, type) and issubclass(storage_type, Placeholder):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type._global}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return self._load_storage(str(key), dtype, int(numel))


@dataclasses.dataclass
class Loaded:
    """What ``load`` returns: the object tree, the placeholders found in it, and the records behind tensors."""

    obj: Any
    placeholders: list[tuple[str, str]]  # (path in the object, global)
    records: dict[int, Record]  # data_ptr of a record's storage -> record


def _data_offset(fh: Any, info: zipfile.ZipInfo) -> int:
    fh.seek(info.header_offset)
    header = fh.read(30)
    if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class Window(io.RawIOBase):
    """A read-only view of ``length`` bytes of a file from ``start``, seekable as if it were a file of its own (a
    torch.save stream embedded in a larger file, as torch.distributed.checkpoint writes them)."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


# Anything zipfile may raise on a damaged archive (its own errors, and those of the structures it parses).
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, UnicodeDecodeError, struct.error)


def load(path: Path, start: int = 0, length: int | None = None, mapping: torch.UntypedStorage | None = None) -> Loaded:
    """Unpickle a torch zip checkpoint safely (see ``_load``); any failure to parse it is a ConvertError."""
    with untrusted(path, "not a readable PyTorch checkpoint", "the file may be truncated or corrupt; re-copy it"):
        return _load(Path(path), start, length, mapping)


def _load(path: Path, start: int, length: int | None, mapping: torch.UntypedStorage | None) -> Loaded:
    """Unpickle a torch zip checkpoint safely; tensors are memory-mapped views of the file.

    ``start``/``length``: the zip is that window of the file (``mapping``: the file already mapped, to share one
    mapping between many windows). Raises HostileCheckpoint for a pickle that refers to code, ConvertError for
    anything unreadable.
    """
    path = Path(path)
    size = path.stat().st_size
    length = size - start if length is None else length
    if start < 0 or length < 0 or start + length > size:
        raise ConvertError(f"{path}: bytes {start}..{start + length} are outside the file; it is truncated or damaged")
    stream: Any = path if (start, length) == (0, size) else Window(path, start, length)
    try:
        zf = zipfile.ZipFile(stream)
        names = zf.namelist()
        infos = {i.filename: i for i in zf.infolist()}
    except ZIP_ERRORS as exc:
        if not isinstance(stream, Path):
            stream.close()
        raise ConvertError(
            f"{path}: not a readable PyTorch checkpoint ({exc}); the file may be truncated or corrupt"
        ) from exc
    try:
        with zf:
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise ConvertError(f"{path}: a zip file, but not a PyTorch checkpoint (no single data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            try:
                byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
                data = zf.read(pkl[0])  # checks the CRC-32 of the pickle itself
            except (*ZIP_ERRORS, zlib.error) as exc:
                raise ConvertError(f"{path}: the checkpoint's pickle is damaged ({exc}); re-copy the file") from exc
            if byteorder != sys.byteorder:
                raise ConvertError(f"{path}: saved with {byteorder}-endian byte order; convert it on such a machine")
            records: dict[int, Record] = {}
            if mapping is None and size:
                mapping = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
            storages: dict[str, Any] = {}
            raw = stream if not isinstance(stream, Path) else open(path, "rb")  # noqa: SIM115 - closed below

            def load_storage(key: str, dtype: torch.dtype, numel: int) -> Any:
                if key in storages:
                    return storages[key]
                info = infos.get(f"{prefix}data/{key}")
                if info is None:
                    raise ConvertError(f"{path}: tensor record data/{key} is missing; the file is damaged")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ConvertError(f"{path}: tensor record data/{key} is compressed; re-save with torch.save")
                nbytes = numel * torch._utils._element_size(dtype)
                try:
                    offset = start + _data_offset(raw, info)
                except ZIP_ERRORS as exc:
                    raise ConvertError(f"{path}: tensor record data/{key} is damaged ({exc})") from exc
                if nbytes > info.file_size or offset + nbytes > start + length:
                    raise ConvertError(
                        f"{path}: tensor record data/{key} is shorter than its tensor; the file is truncated or damaged"
                    )
                untyped = mapping[offset : offset + nbytes]
                record = Record(info.filename, offset, info.file_size, info.CRC)
                if nbytes:
                    records[untyped.data_ptr()] = record
                storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
                storages[key] = storage
                return storage

            try:
                obj = _unpickle(path, data, load_storage)
            finally:
                if raw is not stream:
                    raw.close()
    finally:
        if not isinstance(stream, Path):
            stream.close()
    return Loaded(obj, _placeholders(obj, path), records)


def load_pickle(path: Path) -> Loaded:
    """Unpickle a plain pickle file (no tensor data, e.g. torch.distributed.checkpoint's ``.metadata``) safely."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read it ({exc.strerror or exc})") from exc

    def no_storage(key: str, dtype: torch.dtype, numel: int) -> Any:
        raise ConvertError(f"{path}: a pickle that should hold no tensor data refers to storage {key}")

    with untrusted(path, "not a readable pickle", "the file may be truncated or corrupt; re-copy it"):
        obj = _unpickle(path, data, no_storage)
        return Loaded(obj, _placeholders(obj, path), {})


def _unpickle(path: Path, data: bytes, load_storage: Any) -> Any:
    unpickler = _Unpickler(io.BytesIO(data), allowed_globals(), load_storage)
    try:
        # pickletools walks every opcode first: a declared length beyond the data (a damaged BYTEARRAY8, say) is an
        # error here, before the C unpickler tries to allocate it (it then fails with a MemoryError and CPython
        # prints a stray "SystemError: deallocated bytearray object has exported buffers" to stderr).
        for _ in pickletools.genops(data):
            pass
        return unpickler.load()
    except ConvertError:
        raise
    except Exception as exc:  # a malformed pickle can raise anything; it is reported, never re-tried
        hostile = dangerous_globals(data)
        if hostile:
            raise HostileCheckpoint(
                f"{path}: refused: the pickle refers to {hostile[0]}; nothing in it was executed; "
                "do not load this file with torch.load(weights_only=False)"
            ) from exc
        raise ConvertError(
            f"{path}: the checkpoint's pickle is malformed ({type(exc).__name__}: {str(exc)[:120]})"
        ) from exc


def _placeholders(obj: Any, path: Path) -> list[tuple[str, str]]:
    """Every placeholder in ``obj`` with where it sits; HostileCheckpoint for one that could act on the system."""
    found = []
    for where, item in walk(obj, "", set()):
        reason = verdict(where, item)
        if reason is not None:
            raise HostileCheckpoint(
                f"{path}: refused: the pickle {reason} (at {where or 'top level'}); nothing in it was executed; "
                "do not load this file with torch.load(weights_only=False)"
            )
        cls = item if isinstance(item, type) else type(item)
        found.append((where, cls._global))
    return found
