"""Wrappers and components: which part of the model each checkpoint key belongs to, as small pure functions over key
names. What PEFT's own segments mean is the PEFT wing's (``converter.peft.keys``).

Every rule is anchored (whole dot-separated segments, prefixes on module boundaries); nothing looks for substrings.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable

from .errors import ConvertError, preview
from .layout import Component, LayoutConfig
from .peft.keys import PEFT_PREFIX, has_markers


@dataclasses.dataclass(frozen=True)
class OuterPrefix:
    """The segments in front of every component prefix: wrappers, at most one LightningModule attribute, and
    PEFT's ``base_model.model.`` when PEFT wraps the whole model (LLaVA-style) rather than one component."""

    prefix: str
    wrappers: tuple[str, ...]
    attribute: str | None
    peft: bool = False
    removed: tuple[str, ...] = ()  # wrapper segments removed wherever they stood in a key (torch.compile's, FSDP's)

    @property
    def plain_prefix(self) -> str:
        """The prefix a plain (un-PEFT'd) model's keys have."""
        return self.prefix.removesuffix(PEFT_PREFIX) if self.peft else self.prefix


@dataclasses.dataclass(frozen=True)
class Split:
    """Source keys sorted by component. ``keys[name]`` maps the component-relative key (inner wrappers removed)
    to the source key."""

    outer: OuterPrefix
    keys: dict[str, dict[str, str]]
    dropped: dict[str, list[str]]  # reason -> source keys dropped by a config rule
    unclaimed: list[str]  # keys no component or drop rule claims

    def raise_for_unclaimed(self, config: LayoutConfig) -> None:
        """Every key must be accounted for: list the leftovers and say which file to edit."""
        if not self.unclaimed:
            return
        prefixes = ", ".join(repr(c.prefix) for c in config.components)
        raise ConvertError(
            f"{len(self.unclaimed)} checkpoint keys belong to no component of {config.path.name}: "
            f"{preview(sorted(self.unclaimed), 3)}; add a component or a drop rule to {config.path} "
            f"(outer prefix {self.outer.prefix!r}, component prefixes {prefixes})"
        )


def _claims(component: Component, rest: str) -> bool:
    if component.prefix:
        return rest.startswith(component.prefix)
    # An empty prefix is anchored by PEFT's own marker when the component is PEFT-wrapped.
    return True


def _match_component(config: LayoutConfig, rest: str) -> Component | None:
    for comp in config.components:
        if _claims(comp, rest):
            return comp
    return None


PEFT_SEGMENTS = tuple(PEFT_PREFIX.rstrip(".").split("."))


def _outer_candidates(key: str, config: LayoutConfig) -> Iterable[tuple[str, ...]]:
    """Leading segment tuples that could be the outer prefix of ``key`` (wrappers and an attribute, then possibly
    PEFT's ``base_model.model``)."""
    parts = key.split(".")
    yield ()
    attribute_used = False
    for i, seg in enumerate(parts[:-1][:4]):
        if tuple(parts[i : i + 2]) == PEFT_SEGMENTS and i + 2 < len(parts):
            yield tuple(parts[: i + 2])
            return
        if seg in config.wrappers:
            pass
        elif not attribute_used and (config.attribute is None or seg == config.attribute):
            attribute_used = True
        else:
            return
        yield tuple(parts[: i + 1])


def detect_outer_prefix(keys: list[str], config: LayoutConfig) -> OuterPrefix:
    """Pick the outer prefix that lets the config's components claim the most keys.

    Ties prefer a prefix that consumes a LightningModule attribute, then the shorter one. An empty component
    prefix claims a key only where PEFT's ``base_model.model.`` follows, if any key carries that marker.
    """
    peft_anchor = any(k.split(".").count("base_model") for k in keys)
    scores: Counter[tuple[str, ...]] = Counter()
    for key in keys:
        for cand in _outer_candidates(key, config):
            rest = key[len(".".join(cand)) + 1 :] if cand else key
            comp = _match_component(config, rest)
            if comp is None:
                continue
            if not comp.prefix and peft_anchor and not rest.startswith(PEFT_PREFIX):
                continue
            scores[cand] += 1
    if not scores:
        return OuterPrefix("", (), None)

    def peft(cand: tuple[str, ...]) -> bool:
        return cand[-2:] == PEFT_SEGMENTS

    def rank(cand: tuple[str, ...]) -> tuple[int, int, int]:
        plain = cand[:-2] if peft(cand) else cand
        has_attr = any(seg not in config.wrappers for seg in plain)
        return (scores[cand], int(has_attr), -len(cand))

    best = max(scores, key=rank)
    plain = best[:-2] if peft(best) else best
    attribute = next((seg for seg in plain if seg not in config.wrappers), None)
    wrappers = tuple(seg for seg in plain if seg in config.wrappers)
    return OuterPrefix(".".join(best) + "." if best else "", wrappers, attribute, peft(best))


def strip_inner_wrappers(key: str, inner: Iterable[str]) -> str:
    """``key`` without the segments that wrappers insert anywhere (e.g. ``_checkpoint_wrapped_module``)."""
    inner = set(inner)
    return ".".join(seg for seg in key.split(".") if seg not in inner) if inner else key


def strip_leading_wrappers(rel: str, wrappers: Iterable[str]) -> str:
    """A component-relative key without the wrappers in front of it (a component wrapped by DDP: ``module.``)."""
    head, _, rest = rel.partition(".")
    while rest and head in wrappers:
        rel = rest
        head, _, rest = rel.partition(".")
    return rel


def split_components(keys: Iterable[str], config: LayoutConfig) -> Split:
    """Assign every source key to a component or a drop rule; the rest are listed in ``unclaimed``."""
    names: dict[str, str] = {}  # key without inner wrappers -> source key
    inner = set(config.inner_wrappers)
    removed: dict[str, None] = {}
    for key in keys:
        removed.update(dict.fromkeys(seg for seg in key.split(".") if seg in inner))
        name = strip_inner_wrappers(key, config.inner_wrappers)
        if name in names:
            raise ConvertError(f"two checkpoint keys name the same tensor {name!r}: {names[name]!r} and {key!r}")
        names[name] = key
    outer = dataclasses.replace(detect_outer_prefix(list(names), config), removed=tuple(removed))
    anchored = not outer.peft and any(k.split(".").count("base_model") for k in names)
    by_comp: dict[str, dict[str, str]] = {c.name: {} for c in config.components}
    dropped: dict[str, list[str]] = defaultdict(list)
    unclaimed = []
    for name, key in names.items():
        if not name.startswith(outer.prefix):
            unclaimed.append(key)
            continue
        rest = name[len(outer.prefix) :]
        rule = next((r for r in config.drop if r.pattern.match(rest)), None)
        if rule is not None:
            dropped[rule.reason].append(key)
            continue
        comp = _match_component(config, rest)
        if comp is None or (not comp.prefix and anchored and not rest.startswith(PEFT_PREFIX)):
            unclaimed.append(key)  # an empty prefix claims only what PEFT's marker anchors, where there is one
            continue
        by_comp[comp.name][strip_leading_wrappers(rest[len(comp.prefix) :], config.wrappers)] = key
    if outer.peft:  # PEFT wraps the whole model: a component with PEFT's markers reads as a PEFT sub-model
        for name, keys in by_comp.items():
            if any(has_markers(rel) for rel in keys):
                by_comp[name] = {PEFT_PREFIX + rel: key for rel, key in keys.items()}
    return Split(outer, by_comp, dict(dropped), unclaimed)


@dataclasses.dataclass(frozen=True)
class Discovered:
    """The layout a run's keys fit, and the evidence: how many keys each built-in layout claims."""

    layout: LayoutConfig
    split: Split
    claimed: dict[str, int]  # layout name -> keys its components claim
    given: bool  # named with --config (not discovered)

    @property
    def evidence(self) -> str:
        if self.given:
            return f"--config {self.layout.name}"
        total = len(self.split.unclaimed) + sum(len(k) for k in self.split.keys.values())
        total += sum(len(k) for k in self.split.dropped.values())
        others = ", ".join(f"{name} {n}" for name, n in self.claimed.items() if name != self.layout.name)
        return f"discovered: its components claim {self.claimed[self.layout.name]} of the {total} keys ({others})"


def discover_layout(keys: list[str], layouts: list[LayoutConfig]) -> Discovered:
    """The layout whose components claim every key (the first of ``layouts`` that does, the default first); when
    none claims them all, the one that claims the most, whose split then lists the keys left over."""
    splits = [(layout, split_components(keys, layout)) for layout in layouts]
    claimed = {layout.name: len(keys) - len(split.unclaimed) for layout, split in splits}
    whole = [(layout, split) for layout, split in splits if not split.unclaimed]
    layout, split = whole[0] if whole else max(splits, key=lambda ls: (claimed[ls[0].name], -splits.index(ls)))
    return Discovered(layout, split, claimed, given=False)
