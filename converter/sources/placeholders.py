"""What the restricted unpickler (``unpickle``) lets a checkpoint be: torch's allowlist of tensor-rebuilding globals
and plain builtin types are real; every other global is an inert ``Placeholder`` that records how the pickle built
it. A placeholder of a global that can act on the system, or a call of any function outside the allowlist, makes the
file hostile (``HostileCheckpoint``, found by walking the object tree: ``dangerous``); placeholders of classes are
benign."""

from __future__ import annotations

import builtins
import pickletools
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import ConvertError

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


def placeholder_class(module: str, name: str) -> type[Placeholder]:
    qualified = f"{module}.{name}"
    cls = _PLACEHOLDERS.get(qualified)
    if cls is None:
        cls = type(name.replace(".", "_") or "Unnamed", (Placeholder,), {"_global": qualified, "__module__": module})
        _PLACEHOLDERS[qualified] = cls
    return cls


def allowed_globals() -> dict[str, Any]:
    """torch's own weights_only allowlist, plus plain builtin types."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    allowed.update({f"builtins.{name}": getattr(builtins, name) for name in _SAFE_BUILTINS})
    return allowed


def walk(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Any]]:
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


def verdict(where: str, item: Any) -> str | None:
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


def dangerous_globals(data: bytes) -> list[str]:
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
