"""PEFT's key grammar, for every tuner at once: what a PEFT model's state_dict keys say, read from the names alone.

A PEFT sub-model's keys are ``base_model.model.<the base model's key>`` with PEFT's segments inserted:

- a tuner layer replaces the module it adapts; the module itself moves under ``base_layer`` (nested tuner layers,
  such as LoRA on two parameters of one module, stack ``base_layer.base_layer``), and the layer's adapter state is
  ``<module>.<state name>.<adapter>[.<rest>]``, the state names being those PEFT's layer classes declare
  (``lora_A``, ``hada_w1_a``, ``oft_R``, ``vera_lambda_b``, ...: ``registry``);
- state a tuner shares between layers sits outside the model: ``base_model.<state name>.<adapter>...`` (VeRA's
  projections, RandLoRA's bases);
- ``modules_to_save`` keeps ``<module>.original_module.*`` and the trained ``<module>.modules_to_save.<adapter>.*``;
- trainable tokens wrap the embeddings: ``<module>.token_adapter.{base_layer,trainable_tokens_delta.<adapter>}``.

PEFT before 0.7 (no ``base_layer``) kept the adapted module's own weights at ``<module>.weight``; ``normalized`` renames
them. Every rule matches whole dot-separated segments; nothing here looks for substrings.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from ..accounting import MERGED, QUANT_STATE, SUPERSEDED, WRITTEN, is_quant_state
from ..errors import ConvertError, preview
from . import registry

PEFT_PREFIX = "base_model.model."
TUNER_PREFIX = "base_model."
# PEFT's structural names: a tuner layer's wrapped module, ModulesToSaveWrapper's two copies, TrainableTokensWrapper.
BASE_LAYER = "base_layer"
ORIGINAL = "original_module"
SAVED = "modules_to_save"
TOKEN_ADAPTER = "token_adapter"
PROMPT_ENCODER = "prompt_encoder"  # a prompt-learning PeftModel's learned tokens
_WRAPPING = (BASE_LAYER, TOKEN_ADAPTER)  # segments that wrap the module a plain model has in their place


def markers() -> frozenset[str]:
    """Segments that only PEFT's wrapping puts into a key."""
    return frozenset({BASE_LAYER, ORIGINAL, SAVED, TOKEN_ADAPTER, *registry.layer_names()})


def has_markers(key: str) -> bool:
    found = markers()
    return any(seg in found for seg in key.split("."))


def is_shared(key: str) -> bool:
    """A tuner's state shared between its layers, kept outside the model (``base_model.vera_A.default``)."""
    if not key.startswith(TUNER_PREFIX) or key.startswith(PEFT_PREFIX):
        return False
    return key.split(".")[1] in registry.state_names()


def is_peft_wrapped(keys: Iterable[str]) -> bool:
    """True when the keys are those of a PeftModel: every key under ``base_model.model.`` or shared tuner state."""
    keys = list(keys)
    return any(k.startswith(PEFT_PREFIX) for k in keys) and all(k.startswith(PEFT_PREFIX) or is_shared(k) for k in keys)


def plain_module(path: str) -> str:
    """The plain model's module path for a PEFT module path (``base_layer``/``token_adapter`` segments removed)."""
    return ".".join(seg for seg in path.split(".") if seg not in _WRAPPING)


def _slot(parts: list[str], adapter: str | None) -> int | None:
    """Index of the adapter-state segment in a key's parts (a state name followed by the adapter name)."""
    names = registry.state_names() if adapter is not None else registry.layer_names()
    for i, seg in enumerate(parts[:-1]):
        if seg in names and (adapter is None or parts[i + 1] == adapter):
            return i
    return None


def _saved(parts: list[str], adapter: str) -> int | None:
    return next((i for i, seg in enumerate(parts[:-1]) if seg == SAVED and parts[i + 1] == adapter), None)


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """What a PEFT sub-model's keys say about it (keys relative to the component)."""

    adapter_name: str
    segments: frozenset[str]  # the adapter state names found (lora_A, hada_w1_a, ...)
    adapted: tuple[str, ...]  # PEFT module paths (without base_model.model.) of the tuner layers holding state
    modules_to_save: tuple[str, ...]  # plain module paths wrapped by ModulesToSaveWrapper ("": the component)
    token_modules: tuple[str, ...]  # plain module paths with trainable token rows (token_adapter)
    base_layers: int  # keys of adapted modules' own weights
    shared: tuple[str, ...] = ()  # shared tuner state keys
    tuners: tuple[str, ...] = ()  # PEFT types whose layers hold these names, most general first
    legacy: bool = False  # written by PEFT before 0.7: adapted modules' weights without base_layer

    @property
    def merged_modules(self) -> tuple[str, ...]:
        """The plain module paths whose weights a merge changes."""
        return tuple(sorted({plain_module(m) for m in self.adapted}))

    @property
    def target_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.merged_modules if m not in self.token_modules})

    @property
    def saved_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules_to_save})

    @property
    def tuner(self) -> str | None:
        """The PEFT type the tensors point to (before any config says so)."""
        return self.tuners[0] if self.tuners else None


def read_layout(keys: Iterable[str], where: str) -> PeftLayout:
    """Read adapter name, tuner, adapted modules and modules_to_save from a PEFT sub-model's keys."""
    keys = list(keys)
    names: set[str] = set()
    for key in keys:
        if is_shared(key):
            continue
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        i = _slot(parts, None)
        if i is not None:
            names.add(parts[i + 1])
        j = next((j for j, seg in enumerate(parts[:-1]) if seg == SAVED), None)
        if j is not None:
            names.add(parts[j + 1])
    if len(names) > 1:
        raise ConvertError(
            f"{where}: the checkpoint holds several adapters ({', '.join(sorted(names))}); ckpt2hf merges one; "
            "delete the others from the model before saving or convert from an adapter folder"
        )
    if not names:
        raise ConvertError(f"{where}: PEFT-wrapped keys without any adapter tensors; nothing to merge")
    adapter = names.pop()
    segments, adapted, saved, tokens, shared = set(), set(), set(), set(), []
    for key in keys:
        if is_shared(key):
            shared.append(key)
            segments.add(key.split(".")[1])
            continue
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        i, j = _slot(parts, adapter), _saved(parts, adapter)
        if j is not None:
            saved.add(".".join(parts[:j]))
        elif i is not None:
            module = ".".join(parts[:i])
            adapted.add(module)
            if TOKEN_ADAPTER in parts[:i]:  # trainable tokens beside a tuner: a wrapper's state, like modules_to_save
                tokens.add(plain_module(module))
            else:
                segments.add(parts[i])
    inner = [k.removeprefix(PEFT_PREFIX) for k in keys if not is_shared(k)]
    wrapped = any(BASE_LAYER in k.split(".") for k in inner)
    legacy = not wrapped and any(k.rpartition(".")[0] in adapted for k in inner)
    base_layers = sum(1 for k in keys if _is_base_weight(k.removeprefix(PEFT_PREFIX), adapter, legacy, adapted))
    return PeftLayout(
        adapter,
        frozenset(segments),
        tuple(sorted(adapted)),
        tuple(sorted(saved)),
        tuple(sorted(tokens)),
        base_layers,
        tuple(sorted(shared)),
        registry.tuners_holding(segments),
        legacy,
    )


def _is_base_weight(inner: str, adapter: str, legacy: bool, adapted: set[str]) -> bool:
    parts = inner.split(".")
    if legacy:
        return len(parts) >= 2 and ".".join(parts[:-1]) in adapted and parts[-1] == "weight"
    return parts[-2:-1] == [BASE_LAYER] and parts[-1] == "weight" and _slot(parts, adapter) is None


def normalized(keys: Mapping[str, str], layout: PeftLayout) -> dict[str, str]:
    """The component's keys in today's PEFT naming: an adapted module's own tensors, which PEFT before 0.7 kept at
    ``<module>.<name>``, move to ``<module>.base_layer.<name>`` (values: the source keys, unchanged)."""
    if not layout.legacy:
        return dict(keys)
    modules = {PEFT_PREFIX + m for m in layout.adapted}
    found = {}
    for rel, src in keys.items():
        module, _, name = rel.rpartition(".")
        found[f"{module}.{BASE_LAYER}.{name}" if module in modules else rel] = src
    return found


def plain_keys(keys: Iterable[str], adapter: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map a PEFT model's keys to the merged model's plain keys.

    Returns ``(plain -> the key of the tensor written under it, fate -> keys)``. An adapted module's own weights map
    to the plain weight that receives the merge; adapter state and superseded originals map to nothing.
    """
    plain: dict[str, str] = {}
    fate: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        disposition, target = _fate(key, adapter)
        fate[disposition].append(key)
        if target is not None:
            if target in plain:
                raise ConvertError(f"two checkpoint keys map to {target!r}: {plain[target]!r} and {key!r}")
            plain[target] = key
    return plain, dict(fate)


def _fate(key: str, adapter: str) -> tuple[str, str | None]:
    if is_shared(key):
        return MERGED, None
    inner = key.removeprefix(PEFT_PREFIX)
    if is_quant_state(inner):
        return QUANT_STATE, None
    parts = inner.split(".")
    if ORIGINAL in parts:
        return SUPERSEDED, None
    j = _saved(parts, adapter)
    if j is not None:
        return WRITTEN, ".".join(parts[:j] + parts[j + 2 :])
    if _slot(parts, adapter) is not None:
        return MERGED, None
    if any(seg in _WRAPPING for seg in parts):
        return MERGED, plain_module(inner)
    return WRITTEN, inner


def base_key(key: str, adapter: str) -> str | None:
    """The base model's key that a PEFT model's tensor starts from: adapted modules' own weights and original copies
    map to the plain key; the adapter's own tensors (adapter state, trained copies) have none."""
    if is_shared(key):
        return None
    inner = key.removeprefix(PEFT_PREFIX)
    parts = inner.split(".")
    if _saved(parts, adapter) is not None or _slot(parts, adapter) is not None:
        return None
    return ".".join(seg for seg in parts if seg not in (*_WRAPPING, ORIGINAL))


def is_trained_state(key: str, adapter: str) -> bool:
    """What training changes and PEFT saves: its layers' adapter state (not their other per-adapter attributes, such
    as VeRA's per-layer references to the shared projections), shared tuner state and modules_to_save copies."""
    if is_shared(key):
        return True
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    layer = registry.layer_names()
    own = any(seg in layer and parts[i + 1] == adapter for i, seg in enumerate(parts[:-1]))
    return own or _saved(parts, adapter) is not None


def is_adapter_state(key: str, adapter: str) -> bool:
    """The adapter's own tensors: its layers' state, shared tuner state and trained modules_to_save copies."""
    if is_shared(key):
        return True
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    return _slot(parts, adapter) is not None or _saved(parts, adapter) is not None


def is_saved_copy(key: str, adapter: str) -> bool:
    """True for a modules_to_save copy of ``adapter`` (``...<module>.modules_to_save.<adapter>.<param>``)."""
    return _saved(key.split("."), adapter) is not None


@dataclasses.dataclass(frozen=True)
class AdapterKeys:
    """What an adapter folder's keys (PEFT's naming: no adapter name) hold."""

    adapted: tuple[str, ...]  # plain modules with adapter state
    modules_to_save: tuple[str, ...]  # modules saved whole (ModulesToSaveWrapper's trained copy)
    token_modules: tuple[str, ...]  # modules with trainable token rows
    base_layers: tuple[str, ...]  # base layers saved too (resized or adapted embedding layers)
    shared: tuple[str, ...] = ()  # shared tuner state


def classify_adapter_keys(keys: Iterable[str]) -> AdapterKeys:
    """Sort an adapter folder's keys into adapted modules, trainable tokens, saved base layers and modules_to_save."""
    adapted, saved, tokens, bases, shared = set(), set(), set(), set(), set()
    names = registry.state_names()
    for key in keys:
        if key.startswith(TUNER_PREFIX) and not key.startswith(PEFT_PREFIX):
            shared.add(key)
            continue
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        i = next((i for i, seg in enumerate(parts) if seg in names), None)
        if i is not None:
            module = ".".join(parts[:i])
            (tokens if TOKEN_ADAPTER in parts[:i] else adapted).add(plain_module(module))
        elif len(parts) >= 2 and parts[-2] == BASE_LAYER:
            bases.add(".".join(parts[:-2]))
        else:
            saved.add(".".join(parts[:-1]))
    return AdapterKeys(*(tuple(sorted(s)) for s in (adapted, saved, tokens, bases, shared)))


def component_adapter_keys(adapter_keys: Iterable[str], prefix: str, whole_model: bool) -> dict[str, str]:
    """An adapter folder's keys that belong to a component, as the component's keys name them -> as the folder
    does. When PEFT wraps one component the whole folder is its; when PEFT wraps the whole model (``whole_model``),
    the folder's keys carry the component prefixes (``prefix``)."""
    if not whole_model:
        return {key: key for key in adapter_keys}
    found = {}
    for key in adapter_keys:
        rest = key.removeprefix(PEFT_PREFIX)
        if rest.startswith(prefix):
            found[PEFT_PREFIX + rest[len(prefix) :]] = key
    return found


def describe_unfit(missing: list[str], unexpected: list[str]) -> str:
    """Missing and unexpected keys, for a message."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({preview(missing, 3)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({preview(unexpected, 3)})")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class ComponentKeys:
    """A component's keys and what their names alone say: the PEFT layout, the plain names, each key's fate."""

    keys: dict[str, str]  # component-relative key (today's PEFT naming) -> source key
    peft: PeftLayout | None
    plain: dict[str, str]  # plain key -> component-relative key of the tensor written under it
    fates: dict[str, tuple[str, ...]]  # fate -> component-relative keys


def refuse_prompt_learning(keys: Iterable[str], where: str) -> None:
    """A prompt-learning PeftModel keeps its learned tokens in ``prompt_encoder.<adapter>``, beside the base model
    under ``base_model.``: nothing to merge."""
    found = sorted(k for k in keys if k.split(".")[0] == PROMPT_ENCODER)
    if found and any(k.startswith(TUNER_PREFIX) for k in keys):
        raise ConvertError(
            f"{where}: the checkpoint holds a prompt-learning adapter ({preview(found, 1)}): "
            f"{registry.PROMPT_LEARNING}; serve it with PEFT instead (PeftModel.from_pretrained on the base model)"
        )


def renamed(keys: Mapping[str, str], rename: Callable[[str], str]) -> dict[str, str]:
    """The keys with the base model's part of each renamed (``rename``: transformers' renaming of an older
    checkpoint's names); PEFT's own prefix stays."""
    found = {}
    for rel, src in keys.items():
        if is_shared(rel):
            found[rel] = src
        elif rel.startswith(PEFT_PREFIX):
            found[PEFT_PREFIX + rename(rel.removeprefix(PEFT_PREFIX))] = src
        else:
            found[rename(rel)] = src
    return found


def component_keys(keys: Mapping[str, str], where: str) -> ComponentKeys:
    """Read a component's keys: a PEFT sub-model is mapped to the plain model's names (``plain_keys``)."""
    refuse_prompt_learning(keys, where)
    if not is_peft_wrapped(keys):
        if any(is_quant_state(k) for k in keys):
            plain, fates = plain_keys(keys, "")
            return ComponentKeys(dict(keys), None, plain, {fate: tuple(rels) for fate, rels in fates.items()})
        return ComponentKeys(dict(keys), None, {rel: rel for rel in keys}, {WRITTEN: tuple(keys)})
    layout = read_layout(keys, where)
    keys = normalized(keys, layout)
    plain, fates = plain_keys(keys, layout.adapter_name)
    return ComponentKeys(keys, layout, plain, {fate: tuple(rels) for fate, rels in fates.items()})
