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
import builtins
import dataclasses
import io
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, untrusted
from .pread import Record

# Top-level modules whose globals can act on the system; any reference to one of them makes a file hostile.
DANGEROUS_MODULES = frozenset(
    [
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "runpy",
        "importlib",
        "builtins",
        "__builtin__",
        "shutil",
        "pty",
        "socket",
        "ctypes",
        "pickle",
        "_pickle",
        "marshal",
        "code",
        "codeop",
        "types",
        "operator",
        "webbrowser",
        "multiprocessing",
        "asyncio",
        "signal",
        "tempfile",
        "io",
        "_io",
        "pdb",
        "timeit",
        "platform",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "zipimport",
        "pkgutil",
        "site",
        "sysconfig",
        "ensurepip",
        "venv",
        "pip",
        "setuptools",
        "distutils",
        "cProfile",
        "profile",
        "trace",
        "threading",
        "_thread",
        "inspect",
        "gc",
        "ctypes",
        "glob",
        "posixpath",
        "ntpath",
        "commands",
        "popen2",
        "dill",
        "cloudpickle",
        "joblib",
    ]
)
# Lower-case globals that only rebuild plain data; calling their placeholder is not a sign of hostility.
BENIGN_CONSTRUCTORS = frozenset(
    {
        "copyreg._reconstructor",
        "collections.defaultdict",
        "collections.deque",
        # A partial object only records a function and its arguments; what it wraps is judged on its own (a
        # partial of os.system is refused for os.system). Hydra configs save optimizers this way.
        "functools.partial",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)
# Plain builtin types that are safe to construct for real.
_SAFE_BUILTINS = (
    "set",
    "frozenset",
    "bytearray",
    "complex",
    "slice",
    "range",
    "list",
    "dict",
    "tuple",
    "int",
    "float",
    "str",
    "bytes",
    "bool",
    "object",
)


class HostileCheckpoint(ConvertError):
    """The file's pickle refers to code that could act on the system; nothing of it was executed."""


class Placeholder:
    """Stands in for an object of a global outside the allowlist; records how the pickle built it, runs nothing."""

    _global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], called=False)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["called"] = True  # reached only through REDUCE, i.e. the pickle calls the global

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        """A gadget chain calls what a call returned: record that too, as a call of the same global."""
        result = type(self).__new__(type(self), self, *args, **kwargs)
        result.__dict__["called"] = True
        return result

    def append(self, item: Any) -> None:
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["items"].extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"].append((key, value))

    def __repr__(self) -> str:
        return f"<unloaded {self._global}>"

    @property
    def recorded_state(self) -> Any:
        """What the pickle restored into the object (BUILD): a dataclass's fields, a ``__getstate__`` result."""
        return self.__dict__["state"]

    @property
    def called(self) -> bool:
        """Whether the pickle called the global (REDUCE) rather than only creating the object."""
        return self.__dict__["called"]

    @property
    def recorded_items(self) -> list[Any]:
        """What the pickle appended or set into the object (a list or dict subclass)."""
        return self.__dict__["items"]

    @property
    def recorded_args(self) -> tuple[Any, ...]:
        """The arguments the pickle built the object with (an enum's value, a namedtuple's fields)."""
        return self.__dict__["args"]

    def mapping(self) -> dict[Any, Any] | None:
        """The key/value pairs of a dict subclass the pickle filled (e.g. Lightning's AttributeDict), else None."""
        items = self.__dict__["items"]
        if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
            return dict(items)
        state = self.__dict__["state"]
        return dict(state) if isinstance(state, dict) and not items else None


_PLACEHOLDERS: dict[str, type[Placeholder]] = {}


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    qualified = f"{module}.{name}"
    cls = _PLACEHOLDERS.get(qualified)
    if cls is None:
        cls = type(name.replace(".", "_") or "Unnamed", (Placeholder,), {"_global": qualified, "__module__": module})
        _PLACEHOLDERS[qualified] = cls
    return cls


def _allowed_globals() -> dict[str, Any]:
    """torch's own weights_only allowlist, plus plain builtin types."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    allowed.update({f"builtins.{name}": getattr(builtins, name) for name in _SAFE_BUILTINS})
    return allowed


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
        return found if found is not None else _placeholder_class(module, name)

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


def _walk(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Any]]:
    stack = [(path, obj)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, (torch.Tensor, str, bytes, int, float, bool, type(None))):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Placeholder) or (isinstance(item, type) and issubclass(item, Placeholder)):
            yield where, item
            if isinstance(item, Placeholder):
                d = item.__dict__
                stack.extend((f"{where}.args[{i}]", a) for i, a in enumerate(d["args"]))
                stack.append((f"{where}.state", d["state"]))
                stack.extend((f"{where}.items[{i}]", a) for i, a in enumerate(d["items"]))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                stack.append((f"{where}.{key}" if where else str(key), value))
                if not isinstance(key, (str, int)):
                    stack.append((f"{where}.<key>", key))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))


def _verdict(where: str, item: Any) -> str | None:
    """Why ``item`` makes the file hostile, or None when it is a benign placeholder."""
    cls = item if isinstance(item, type) else type(item)
    qualified = cls._global
    module = qualified.split(".", 1)[0]
    name = qualified.rsplit(".", 1)[-1]
    if module in DANGEROUS_MODULES:
        return f"refers to {qualified}"
    called = isinstance(item, Placeholder) and item.__dict__["called"]
    if called and qualified not in BENIGN_CONSTRUCTORS and not name.lstrip("_")[:1].isupper():
        return f"calls {qualified}, a function outside the allowlist of tensor-rebuilding functions"
    return None


def _dangerous_globals(data: bytes) -> list[str]:
    """The dangerous globals a pickle names, read from its opcodes (for pickles too malformed to unpickle)."""
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                found.append(f"{module}.{name}")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a damaged stream: report what was read before the damage
        pass
    return [g for g in found if g.split(".", 1)[0] in DANGEROUS_MODULES]


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
    unpickler = _Unpickler(io.BytesIO(data), _allowed_globals(), load_storage)
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
        hostile = _dangerous_globals(data)
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
    for where, item in _walk(obj, "", set()):
        reason = _verdict(where, item)
        if reason is not None:
            raise HostileCheckpoint(
                f"{path}: refused: the pickle {reason} (at {where or 'top level'}); nothing in it was executed; "
                "do not load this file with torch.load(weights_only=False)"
            )
        cls = item if isinstance(item, type) else type(item)
        found.append((where, cls._global))
    return found
