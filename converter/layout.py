"""Layout configs: which components a checkpoint holds and how their keys are named.

The built-in layouts are package data, ``converter/configs/*.yaml`` (the checkout's top-level ``configs/`` is a link
to that folder: one copy), read through ``importlib.resources`` so that an installed wheel finds them as a checkout
does.
"""

from __future__ import annotations

import dataclasses
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from .errors import ConvertError

CONFIG_DIR: Traversable = files(__package__) / "configs"
KINDS = ("hf_causal_lm", "hf_model", "state_dict")
# Segments that only a wrapper inserts (torch.compile, Fabric, FSDP, activation checkpointing): removed at any depth
# of a key, inside a component or inside the PEFT model, whatever the layout config says. DDP's ``module.`` may be a
# real module's name: it is removed where a wrapper stands, in front of the keys and in front of a component.
ANYWHERE_WRAPPERS = ("_orig_mod", "_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclasses.dataclass(frozen=True)
class Component:
    """One part of the model: the keys under ``prefix`` become the folder ``out`` of the export."""

    name: str
    prefix: str
    kind: str
    out: str
    base: tuple[str, ...] = ()  # hyper_parameters entries that may name the base config's folder or hub id


@dataclasses.dataclass(frozen=True)
class DropRule:
    pattern: re.Pattern[str]
    reason: str


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """A parsed layout config. ``attribute`` is None when the LightningModule attribute is auto-detected."""

    name: str
    path: Path | Traversable  # a user's YAML file, or a built-in layout inside the package
    components: tuple[Component, ...]
    wrappers: tuple[str, ...]  # segments that may lead every key (DDP's module., Fabric's _forward_module., ...)
    attribute: str | None
    drop: tuple[DropRule, ...]
    inner_wrappers: tuple[str, ...] = ()  # segments removed wherever they stand (activation checkpointing, FSDP)

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)


def builtin_names() -> list[str]:
    """The names of the built-in layouts, sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path | Traversable:
    """A config given as a path, or as the name of a built-in layout."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConvertError(f"{name_or_path}: no such config; pass a YAML file or one of: {', '.join(builtin_names())}")


DEFAULT = "panorama_vlm"
AUTO = "auto"


def builtin_layouts() -> list[LayoutConfig]:
    """The built-in layouts, the default first."""
    return [load_layout(n) for n in sorted(builtin_names(), key=lambda n: n != DEFAULT)]


def load_layout(name_or_path: str = "panorama_vlm") -> LayoutConfig:
    """Read and validate a layout config; raise ConvertError naming the file and the field at fault."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConvertError(f"{path}: not valid YAML ({exc}); fix the file") from exc

    def bad(what: str) -> ConvertError:
        return ConvertError(f"{path}: {what}; see {CONFIG_DIR / DEFAULT}.yaml for the format")

    if not isinstance(raw, dict):
        raise bad("expected a mapping with components")

    components = []
    for i, item in enumerate(raw.get("components") or []):
        if not isinstance(item, dict) or not {"name", "prefix", "kind"} <= item.keys():
            raise bad(f"components[{i}] needs name, prefix and kind")
        if item["kind"] not in KINDS:
            raise bad(f"components[{i}].kind is {item['kind']!r}, expected one of {', '.join(KINDS)}")
        prefix = str(item["prefix"])
        if prefix and not prefix.endswith("."):
            raise bad(f"components[{i}].prefix {prefix!r} must end with a dot (anchored on a module boundary)")
        base = item.get("base") or ()
        base = (base,) if isinstance(base, str) else tuple(base)
        components.append(Component(item["name"], prefix, item["kind"], str(item.get("out", item["name"])), base))
    if not components:
        raise bad("no components")
    if len({c.name for c in components}) != len(components):
        raise bad("component names must be unique")

    drop = []
    for i, item in enumerate(raw.get("drop") or []):
        if not isinstance(item, dict) or not {"pattern", "reason"} <= item.keys():
            raise bad(f"drop[{i}] needs pattern and reason")
        pattern = item["pattern"]
        if not pattern.startswith("^"):
            raise bad(f"drop[{i}].pattern {pattern!r} must be anchored with ^")
        drop.append(DropRule(re.compile(pattern), str(item["reason"])))

    attribute = raw.get("attribute", "auto")
    return LayoutConfig(
        name=path.name.rsplit(".", 1)[0],
        path=path,
        components=tuple(components),
        wrappers=tuple(raw.get("wrappers") or ()),
        attribute=None if attribute in (None, "auto") else str(attribute),
        drop=tuple(drop),
        inner_wrappers=tuple(dict.fromkeys((*ANYWHERE_WRAPPERS, *(raw.get("inner_wrappers") or ())))),
    )
