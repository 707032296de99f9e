"""Hyper-parameters as projects save them, recovered as plain data and searched by name.

Lightning saves whatever ``save_hyperparameters`` was given: a dict, an OmegaConf ``DictConfig`` (Hydra projects),
an ``argparse.Namespace``, a dataclass, objects of the project's own classes. The restricted unpickler builds none of
them: each is an inert placeholder that recorded its state. ``recover`` turns the state of the containers it knows
(OmegaConf containers and value nodes, Namespace, dataclasses, dict subclasses such as Lightning's AttributeDict)
into plain dicts, lists and values, without importing or constructing anything, and applies OmegaConf's
interpolations (``${a.b}``, relative ``${..x}``, inside strings too) within each config (``resolve``). An
interpolation that cannot be resolved -- a resolver call such as ``${oc.env:HOME}``, a key that does not
exist -- stays an ``Unresolved`` value that says why; nothing is ever evaluated. ``find`` looks a name up: a
dotted path, or a bare key at any depth.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConvertError
from .sources.placeholders import Placeholder

OMEGACONF = "omegaconf."
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")
_MISSING = "???"


@dataclasses.dataclass(frozen=True)
class Unresolved:
    """An interpolation that cannot be resolved, and why."""

    text: str
    reason: str
    via: tuple[str, ...] = ()  # the interpolations it went through, outermost first

    @property
    def why(self) -> str:
        through = f" (through {' -> '.join(repr(v) for v in self.via)})" if self.via else ""
        return self.reason + through

    def __str__(self) -> str:
        return f"<unresolved {self.text}: {self.why}>"


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A value that is no plain data (an object of another class, a partial function): its description only."""

    description: str

    def __str__(self) -> str:
        return self.description


def recover(value: Any) -> Any:
    """Plain data from a hyper-parameters value: dicts, lists, strings, numbers, booleans, None, and ``Opaque``
    descriptions of anything else. Placeholders are read, never constructed."""
    return _recover(value, set(), in_config=False)


def _recover(value: Any, seen: set[int], in_config: bool) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if id(value) in seen:
        return Opaque("<a reference cycle>")
    seen = seen | {id(value)}
    if isinstance(value, Mapping):
        return {str(k): _recover(v, seen, in_config) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_recover(v, seen, in_config) for v in value]
    if isinstance(value, (set, frozenset)):  # e.g. a PEFT config's target_modules
        return sorted((_recover(v, seen, in_config) for v in value), key=repr)
    if isinstance(value, type):
        name = getattr(value, "_global", f"{value.__module__}.{value.__qualname__}")
        return Opaque(f"<class {name}>")
    if isinstance(value, Placeholder):
        return _recover_placeholder(value, seen, in_config)
    return Opaque(f"<{type(value).__name__}>")


def _omegaconf_state(value: Any) -> Mapping[str, Any] | None:
    """The pickled state of an OmegaConf container (DictConfig, ListConfig), else None."""
    if isinstance(value, Placeholder) and value._global.startswith(OMEGACONF):
        state = value.recorded_state
        if isinstance(state, Mapping) and "_content" in state:
            return state
    return None


def _recover_placeholder(value: Placeholder, seen: set[int], in_config: bool) -> Any:
    name = value._global
    state = value.recorded_state
    config = _omegaconf_state(value)
    if config is not None:
        content = config["_content"]
        if isinstance(content, str) and content == _MISSING:
            return None
        if in_config or config.get("_parent") is None:
            content = _recover(content, seen, in_config=True)
            # Interpolations are relative to the config's root: the container without a parent.
            return content if in_config else resolve(content)
        return _within_root(value, seen)
    if name.startswith(OMEGACONF) and isinstance(state, Mapping) and "_val" in state:
        return _recover(state["_val"], seen, in_config)  # a value node (AnyNode, StringNode, IntegerNode, ...)
    if name.startswith("pathlib.") and value.recorded_args and all(isinstance(a, str) for a in value.recorded_args):
        flavour = pathlib.PureWindowsPath if "Windows" in name else pathlib.PurePosixPath
        return str(flavour(*value.recorded_args))  # a pure path built from the strings: nothing of the pickle's runs
    if name == "functools.partial":
        args = value.recorded_state if isinstance(value.recorded_state, tuple) else value.recorded_args
        target = args[0] if args else None
        target = getattr(target, "_global", None) or getattr(target, "__name__", "?")
        return Opaque(f"functools.partial({target}, ...)")
    args = value.recorded_args
    if (
        value.called
        and len(args) == 1
        and isinstance(args[0], (str, int))
        and state is None
        and not value.recorded_items
    ):
        return args[
            0
        ]  # an Enum member (PEFT's PeftType and TaskType, say) is pickled as its class called with its value
    mapping = value.mapping()  # a dict subclass the pickle filled, or an object's fields (Namespace, dataclass)
    if mapping is not None:
        return _recover(mapping, seen, in_config)
    return Opaque(f"<unloaded {name}>")


def _within_root(node: Placeholder, seen: set[int]) -> Any:
    """A config that is part of a larger one (``cfg.model`` saved alone pickles its parents too): the whole root
    resolved, then this node's part of it, so that ``${paths.x}`` resolves as it did in training."""
    root, chain = node, {id(node)}
    while (parent := _omegaconf_state(root)["_parent"]) is not None and _omegaconf_state(parent) is not None:
        if id(parent) in chain:
            return Opaque("<a reference cycle>")
        chain.add(id(parent))
        root = parent
    path = _path_to(root, node, set())
    tree = _recover(root, seen - {id(node)}, in_config=False) if path is not None else None
    for key in path or ():
        tree = tree[key] if isinstance(tree, dict) else tree[int(key)]
    return tree if path is not None else Opaque("<a detached OmegaConf node>")


def _path_to(config: Any, target: Placeholder, seen: set[int]) -> tuple[str, ...] | None:
    if config is target:
        return ()
    state = _omegaconf_state(config)
    if state is None or id(config) in seen:
        return None
    seen.add(id(config))
    content = state["_content"]
    items = content.items() if isinstance(content, Mapping) else enumerate(content) if isinstance(content, list) else ()
    for key, child in items:
        found = _path_to(child, target, seen)
        if found is not None:
            return (str(key), *found)
    return None


def resolve(tree: Any) -> Any:
    """``tree`` with OmegaConf's interpolations applied (unresolvable ones become ``Unresolved``)."""
    return _Resolver(tree).value((), tree)


class _Resolver:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.active: set[tuple[str, ...]] = set()

    def value(self, path: tuple[str, ...], node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self.value((*path, k), v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.value((*path, str(i)), v) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            return self.interpolate(path, node)
        return node

    def interpolate(self, path: tuple[str, ...], text: str) -> Any:
        whole = _INTERPOLATION.fullmatch(text)
        if whole is not None:
            return self._outer(text, self.reference(path, whole.group(1), text))
        parts, end = [], 0
        for m in _INTERPOLATION.finditer(text):
            parts.append(text[end : m.start()])
            got = self.reference(path, m.group(1), text)
            if isinstance(got, Unresolved):
                return self._outer(text, got)
            parts.append(str(got))
            end = m.end()
        rest = text[end:]
        if "${" in rest:
            return Unresolved(text, "a nested or unterminated interpolation")
        return "".join(parts) + rest

    @staticmethod
    def _outer(text: str, got: Any) -> Any:
        """An unresolvable inner value, reported against the text that led to it."""
        if isinstance(got, Unresolved) and got.text != text:
            return Unresolved(text, got.reason, (got.text, *got.via))
        return got

    def reference(self, path: tuple[str, ...], expression: str, text: str) -> Any:
        expression = expression.strip()
        if ":" in expression:
            resolver = expression.split(":", 1)[0]
            return Unresolved(text, f"it calls the resolver {resolver}, which ckpt2hf does not evaluate")
        if expression.startswith("."):
            depth = len(expression) - len(expression.lstrip("."))
            base = path[: max(0, len(path) - depth)]
            target = (*base, *[p for p in expression[depth:].split(".") if p])
        else:
            target = tuple(p for p in expression.split(".") if p)
        node: Any = self.root
        for i, key in enumerate(target):
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return Unresolved(text, f"{'.'.join(target[: i + 1])} does not exist")
        if isinstance(node, str) and node == _MISSING:
            return Unresolved(text, f"{'.'.join(target)} is ??? (a mandatory value that was never set)")
        if target in self.active:
            return Unresolved(text, "it refers to itself")
        self.active.add(target)
        try:
            return self.value(target, node)
        finally:
            self.active.discard(target)


def find(tree: Any, name: str) -> list[tuple[str, Any]]:
    """Where ``name`` is in the tree: a dotted path looked up exactly; a bare key at any depth. (path, value) pairs."""
    if "." in name:
        node: Any = tree
        for key in name.split("."):
            if not isinstance(node, dict) or key not in node:
                return []
            node = node[key]
        return [(name, node)]
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else key
                if key == name:
                    found.append((where, value))
                walk(value, where)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(tree, "")
    return found


def lookup(
    tree: Any, names: tuple[str, ...] | list[str], what: str, option: str, where: object = ""
) -> tuple[str, Any] | None:
    """The one value the first of ``names`` found has: (path, value), or None when none is there. Several distinct
    values, or one that cannot be resolved, are a ConvertError naming ``where`` (the checkpoint), the paths and
    ``option``."""
    prefix = f"{where}: " if where else ""
    for name in names:
        found = [(p, v) for p, v in find(tree, name) if v is not None and v != _MISSING]
        if not found:
            continue
        unresolved = [(p, v) for p, v in found if isinstance(v, Unresolved)]
        if unresolved:
            path, value = unresolved[0]
            raise ConvertError(
                f"{prefix}hyper_parameters.{path} = {value.text!r} cannot be resolved: {value.why}; pass {option}"
            )
        distinct = {repr(v) for _, v in found}
        if len(distinct) > 1:
            shown = ", ".join(f"hyper_parameters.{p} = {v!r}" for p, v in found)
            raise ConvertError(f"{prefix}{what} is ambiguous: {shown}; pass {option}")
        return found[0]
    return None


def abbreviated(tree: Any, width: int = 60) -> Any:
    """The tree for display: long strings cut, objects as their descriptions."""
    if isinstance(tree, dict):
        return {k: abbreviated(v, width) for k, v in tree.items()}
    if isinstance(tree, list):
        return [abbreviated(v, width) for v in tree]
    if isinstance(tree, (Opaque, Unresolved)):
        return str(tree)  # whole: the reason matters more than the width
    if isinstance(tree, str) and len(tree) > width:
        return tree[: width - 3] + "..."
    return tree
