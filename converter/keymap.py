"""Key mapping: wrapper prefixes, components and PEFT's key layout, as small pure functions over key names.

Every rule is anchored (``^...$`` regexes, whole dot-separated segments); nothing here looks for substrings.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from .errors import ConvertError, preview
from .layout import Component, LayoutConfig

PEFT_PREFIX = "base_model.model."
LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
TOKEN_ADAPTER = "token_adapter"  # PEFT's trainable tokens: <module>.token_adapter.{base_layer,trainable_tokens_delta}
TOKEN_DELTA = "trainable_tokens_delta"
_NAMED = (*LORA_FACTORS, TOKEN_DELTA)  # segments followed by the adapter's name
_ADAPTER_SLOT = re.compile(r"^(?:.+\.)?(?:" + "|".join((*_NAMED, "modules_to_save")) + r")\.(?P<name>[^.]+)(?:\..+)?$")

# Dispositions of a source key.
WRITTEN = "written"
MERGED = "merged into its base layer"
SUPERSEDED = "original_module superseded by modules_to_save"
TIED = "lm_head tied to the input embeddings (identical values)"
QUANT_STATE = "4-bit quantization state of a base weight (bitsandbytes)"

# bitsandbytes' 4-bit state beside a packed weight W: W.absmax, W.quant_map, W.nested_absmax, W.nested_quant_map,
# W.quant_state.bitsandbytes__nf4 (or __fp4).
_QUANT_STATE = re.compile(
    r"^(?P<w>.+)\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__(?:nf4|fp4))$"
)


@dataclasses.dataclass(frozen=True)
class OuterPrefix:
    """The segments in front of every component prefix: wrappers, at most one LightningModule attribute, and
    PEFT's ``base_model.model.`` when PEFT wraps the whole model (LLaVA-style) rather than one component."""

    prefix: str
    wrappers: tuple[str, ...]
    attribute: str | None
    peft: bool = False

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


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """What a PEFT-wrapped sub-model's keys say about it (keys relative to the component)."""

    adapter_name: str
    lora_modules: tuple[str, ...]  # module paths (without base_model.model.) that carry lora_A/lora_B
    modules_to_save: tuple[str, ...]  # module paths wrapped by ModulesToSaveWrapper
    use_dora: bool
    base_layers: int
    token_modules: tuple[str, ...] = ()  # module paths with trainable token rows (token_adapter)

    @property
    def merged_modules(self) -> tuple[str, ...]:
        """The module paths whose weights a merge changes: LoRA layers and trainable-token layers."""
        return tuple(sorted({*self.lora_modules, *self.token_modules}))

    @property
    def target_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.lora_modules})

    @property
    def saved_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules_to_save})


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


def split_components(keys: Iterable[str], config: LayoutConfig) -> Split:
    """Assign every source key to a component or a drop rule; the rest are listed in ``unclaimed``."""
    names: dict[str, str] = {}  # key without inner wrappers -> source key
    for key in keys:
        name = strip_inner_wrappers(key, config.inner_wrappers)
        if name in names:
            raise ConvertError(f"two checkpoint keys name the same tensor {name!r}: {names[name]!r} and {key!r}")
        names[name] = key
    outer = detect_outer_prefix(list(names), config)
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
        if comp is None:
            unclaimed.append(key)
            continue
        by_comp[comp.name][rest[len(comp.prefix) :]] = key
    if outer.peft:  # PEFT wraps the whole model: a component with PEFT's markers reads as a PEFT sub-model
        for name, keys in by_comp.items():
            if any(_has_peft_markers(rel) for rel in keys):
                by_comp[name] = {PEFT_PREFIX + rel: key for rel, key in keys.items()}
    return Split(outer, by_comp, dict(dropped), unclaimed)


_MARKERS = {*LORA_FACTORS, "base_layer", "modules_to_save", "original_module", TOKEN_ADAPTER}


def _has_peft_markers(key: str) -> bool:
    return any(seg in _MARKERS for seg in key.split("."))


def is_peft_wrapped(keys: Iterable[str]) -> bool:
    """True when the component's keys are those of a PeftModel (every key under ``base_model.model.``)."""
    keys = list(keys)
    wrapped = [k.startswith(PEFT_PREFIX) for k in keys]
    return bool(keys) and all(wrapped)


def detect_peft_layout(keys: Iterable[str], where: str) -> PeftLayout:
    """Read adapter name(s), adapted modules and modules_to_save from a PEFT sub-model's keys."""
    names: set[str] = set()
    lora, lora_b, saved, tokens = set(), set(), set(), set()
    dora = False
    base_layers = 0
    for key in keys:
        inner = key.removeprefix(PEFT_PREFIX)
        m = _ADAPTER_SLOT.match(inner)
        if m:
            names.add(m.group("name"))
        parts = inner.split(".")
        for i, seg in enumerate(parts):
            if seg in ("lora_A", "lora_embedding_A"):
                lora.add(".".join(parts[:i]))
            elif seg in ("lora_B", "lora_embedding_B"):
                lora_b.add(".".join(parts[:i]))
            elif seg == "modules_to_save":
                saved.add(".".join(parts[:i]))  # "" when the component itself is saved whole
            elif seg == "lora_magnitude_vector":
                dora = True
            elif seg == TOKEN_DELTA and i > 0 and parts[i - 1] == TOKEN_ADAPTER:
                tokens.add(".".join(parts[: i - 1]))
            elif seg == "base_layer" and i == len(parts) - 2 and parts[-1] == "weight":
                base_layers += 1
    if len(names) > 1:
        raise ConvertError(
            f"{where}: the checkpoint holds several adapters ({', '.join(sorted(names))}); "
            "ckpt2hf merges one; delete the others from the model before saving or convert from an adapter folder"
        )
    if not names:
        raise ConvertError(f"{where}: PEFT-wrapped keys without any LoRA adapter tensors; nothing to merge")
    unpaired = sorted(lora ^ lora_b)
    if unpaired:
        which = [f"{m} ({'lora_A without lora_B' if m in lora else 'lora_B without lora_A'})" for m in unpaired]
        raise ConvertError(
            f"{where}: {len(unpaired)} LoRA modules are incomplete: {preview(which, 2)}; "
            "the checkpoint is damaged or was edited; re-save it from the training run"
        )
    return PeftLayout(names.pop(), tuple(sorted(lora)), tuple(sorted(saved)), dora, base_layers, tuple(sorted(tokens)))


def _peft_rules(adapter: str) -> list[tuple[re.Pattern[str], str | None, str]]:
    """Ordered, anchored rules from a PEFT key (without ``base_model.model.``) to the plain HF key."""
    a = re.escape(adapter)
    return [
        (_QUANT_STATE, None, QUANT_STATE),
        (re.compile(rf"^(?P<m>.+)\.{TOKEN_ADAPTER}\.base_layer\.(?P<p>[^.]+)$"), r"\g<m>.\g<p>", MERGED),
        (re.compile(rf"^.+\.{TOKEN_ADAPTER}\.{TOKEN_DELTA}\.{a}$"), None, MERGED),
        (re.compile(r"^(?P<m>.+)\.base_layer\.(?P<p>[^.]+)$"), r"\g<m>.\g<p>", MERGED),
        (re.compile(rf"^.+\.(?:lora_A|lora_B)\.{a}\.weight$"), None, MERGED),
        (re.compile(rf"^.+\.(?:lora_embedding_A|lora_embedding_B)\.{a}$"), None, MERGED),
        (re.compile(rf"^.+\.lora_magnitude_vector\.{a}\.weight$"), None, MERGED),
        (re.compile(r"^(?:.+\.)?original_module\..+$"), None, SUPERSEDED),
        (re.compile(rf"^(?P<m>.+)\.modules_to_save\.{a}\.(?P<p>.+)$"), r"\g<m>.\g<p>", WRITTEN),
        (re.compile(rf"^modules_to_save\.{a}\.(?P<p>.+)$"), r"\g<p>", WRITTEN),  # the component saved whole
        (re.compile(r"^(?P<k>.+)$"), r"\g<k>", WRITTEN),
    ]


def plain_keys(keys: Iterable[str], adapter: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map PEFT keys to the merged model's plain keys.

    Returns ``(plain -> the key of the tensor written under it, disposition -> keys)``. A base_layer key maps to
    the plain weight that receives the merge; LoRA factors and superseded originals map to nothing.
    """
    rules = _peft_rules(adapter)
    plain: dict[str, str] = {}
    fate: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        inner = key.removeprefix(PEFT_PREFIX)
        m, template, disposition = next((m, t, d) for p, t, d in rules if (m := p.match(inner)))
        fate[disposition].append(key)
        if template is not None:
            target = m.expand(template)
            if target in plain:
                raise ConvertError(f"two checkpoint keys map to {target!r}: {plain[target]!r} and {key!r}")
            plain[target] = key
    return plain, dict(fate)


def adapter_key(key: str, adapter: str) -> str | None:
    """The key PEFT's save_pretrained gives a checkpoint key of adapter ``adapter`` (None: not in the adapter)."""
    parts = key.split(".")
    for i, seg in enumerate(parts[:-1]):
        if seg == "lora_magnitude_vector" and parts[i + 1 :] == [adapter, "weight"]:
            return ".".join(parts[: i + 1])  # PEFT keeps DoRA's pre-refactor key, without ".weight"
        if seg in _NAMED and parts[i + 1] == adapter:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
        if seg == "modules_to_save" and parts[i + 1] == adapter:
            return ".".join(parts[:i] + parts[i + 2 :])
    return None


@dataclasses.dataclass(frozen=True)
class AdapterKeys:
    """What an adapter folder's keys (names without the adapter) hold, by PEFT's naming."""

    lora_modules: tuple[str, ...]  # modules with lora_A/lora_B or lora_embedding_A/B
    modules_to_save: tuple[str, ...]  # modules saved whole (ModulesToSaveWrapper's trained copy)
    token_modules: tuple[str, ...]  # modules with trainable token rows
    base_layers: tuple[str, ...]  # base layers saved too (resized or adapted embedding layers)

    @property
    def saved_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules_to_save})


def classify_adapter_keys(keys: Iterable[str]) -> AdapterKeys:
    """Sort an adapter folder's keys into LoRA modules, trainable tokens, saved base layers and modules_to_save."""
    lora, saved, tokens, bases = set(), set(), set(), set()
    for key in keys:
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        factor = next((i for i, seg in enumerate(parts) if seg in LORA_FACTORS), None)
        if factor is not None:
            lora.add(".".join(parts[:factor]))
        elif TOKEN_DELTA in parts:
            tokens.add(".".join(parts[: parts.index(TOKEN_DELTA)]).removesuffix("." + TOKEN_ADAPTER))
        elif len(parts) >= 2 and parts[-2] == "base_layer":
            bases.add(".".join(parts[:-2]))
        else:
            saved.add(".".join(parts[:-1]))
    return AdapterKeys(*(tuple(sorted(s)) for s in (lora, saved, tokens, bases)))


def is_saved_copy(key: str, adapter: str) -> bool:
    """True for a modules_to_save copy of ``adapter`` (``...<module>.modules_to_save.<adapter>.<param>``)."""
    parts = key.split(".")
    return any(seg == "modules_to_save" and parts[i + 1] == adapter for i, seg in enumerate(parts[:-2]))


@dataclasses.dataclass(frozen=True)
class ComponentKeys:
    """A component's keys and what their names alone say: the PEFT layout, the plain names, each key's fate."""

    keys: dict[str, str]  # component-relative key -> source key
    peft: PeftLayout | None
    plain: dict[str, str]  # plain key -> component-relative key of the tensor written under it
    fates: dict[str, tuple[str, ...]]  # fate -> component-relative keys


def quantized_weights(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Weights stored in 4-bit by bitsandbytes: weight key -> {state name (``absmax``, ...): its key}."""
    keys = list(keys)
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        m = _QUANT_STATE.match(key)
        if m is not None:
            found[m.group("w")][key[len(m.group("w")) + 1 :]] = key
    return {w: states for w, states in found.items() if w in set(keys)}


def component_keys(keys: dict[str, str], where: str) -> ComponentKeys:
    """Read a component's keys: a PEFT sub-model is mapped to the plain model's names (``plain_keys``)."""
    if not is_peft_wrapped(keys):
        if any(_QUANT_STATE.match(k) for k in keys):
            plain, fates = plain_keys(keys, "")
            return ComponentKeys(keys, None, plain, {fate: tuple(rels) for fate, rels in fates.items()})
        return ComponentKeys(keys, None, {rel: rel for rel in keys}, {WRITTEN: tuple(keys)})
    layout = detect_peft_layout(keys, where)
    plain, fates = plain_keys(keys, layout.adapter_name)
    return ComponentKeys(keys, layout, plain, {fate: tuple(rels) for fate, rels in fates.items()})


def base_key(key: str, adapter: str) -> str | None:
    """The base model's key that a PEFT model's tensor starts from: base layers and original copies map to the
    plain key; the adapter's own tensors (LoRA factors, trained copies, token deltas) have none."""
    inner = key.removeprefix(PEFT_PREFIX)
    if adapter_key(key, adapter) is not None:
        return None
    parts = inner.split(".")
    for i, seg in enumerate(parts[:-1]):
        if seg == TOKEN_ADAPTER and parts[i + 1] == "base_layer":
            return ".".join(parts[:i] + parts[i + 2 :])
        if seg in ("base_layer", "original_module"):
            return ".".join(parts[:i] + parts[i + 1 :])
    return inner


def component_adapter_keys(adapter_keys: Iterable[str], component: Component, outer: OuterPrefix) -> dict[str, str]:
    """An adapter folder's keys that belong to ``component``, as the component's keys name them -> as the folder
    does. When PEFT wraps one component the whole folder is its; when PEFT wraps the whole model, the folder's keys
    carry the component prefixes."""
    if not outer.peft:
        return {key: key for key in adapter_keys}
    found = {}
    for key in adapter_keys:
        rest = key.removeprefix(PEFT_PREFIX)
        if rest.startswith(component.prefix):
            found[PEFT_PREFIX + rest[len(component.prefix) :]] = key
    return found
