"""PEFT's own description of its tuners, read once from its registries: nothing here lists a tuner by hand.

``peft.mapping`` registers every PEFT type with its config class, its tuner (model) class and its key prefix; each
tuner layer class names the attributes that hold its adapter state (``adapter_layer_names``, ``other_param_names``).
From those, for every type: which tensor names its layers use (the key grammar reads them), whether it is prompt
learning (no weights to merge) and whether PEFT merges it layer by layer at all. What PEFT cannot tell in advance
(a merge that raises, a merge that would ignore a router) is the small table ``NOT_MERGED`` of reasons, checked
before anything is read, and PEFT's own refusal at merge time otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

# Why a tuner is refused although PEFT may not say so before merging: the effect depends on each input, so no
# single merged weight reproduces it (merging would silently give another model).
NOT_MERGED = {
    "XLORA": "its classifier mixes the LoRA experts token by token; merging would apply every expert at full weight",
    "ADAPTION_PROMPT": "it adds learned prompts with a gate inside attention; there is no weight to merge them into",
    "POLY": "its router mixes the adapter's skills per task id; no single merged weight reproduces it",
    "LILY": "its router mixes the shared adapters per input; PEFT does not merge it",
    "SHADOW": "its update depends on each input (a layer-space carrier); PEFT does not merge it",
}
# Config fields of mergeable tuners that make an adapter input-dependent: set (not None, not empty), it is refused.
INPUT_DEPENDENT_FIELDS = {
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens, so no merged weight reproduces it",
    "arrow_config": "Arrow routes between several LoRA experts per token; merging would apply them all",
}
PROMPT_LEARNING = (
    "prompt learning keeps learned virtual tokens that are prepended at run time; there are no weights to merge"
)


@dataclasses.dataclass(frozen=True)
class Tuner:
    """One PEFT type as PEFT registers it."""

    peft_type: str  # "LORA", "LOHA", ...
    config_cls: type
    model_cls: type | None
    prefix: str | None  # PEFT's key prefix for it ("lora_", "hada_", ...)
    layer_names: frozenset[str]  # attributes of its layers that hold adapter state (adapter_layer_names)
    other_names: frozenset[str]  # its layers' other per-adapter attributes (some hold tensors: vera_A, ranknum)
    prompt_learning: bool

    @property
    def names(self) -> frozenset[str]:
        return self.layer_names | self.other_names

    @property
    def refusal(self) -> str | None:
        """Why PEFT cannot merge this type, when that is known without trying (None: PEFT merges it)."""
        if self.prompt_learning:
            return PROMPT_LEARNING
        if self.peft_type in NOT_MERGED:
            return NOT_MERGED[self.peft_type]
        if self.model_cls is None or getattr(self.model_cls, "tuner_layer_cls", None) is None:
            return "PEFT has no layer merge for it"
        return None

    @property
    def article(self) -> str:
        """``a``/``an`` before the title in a message."""
        return "an" if self.title[:1] in "AEIOU" else "a"

    @property
    def title(self) -> str:
        """How the README and messages name it: PEFT's config class without the suffix (``LoHa``, ``VeRA``)."""
        name = self.config_cls.__name__.removesuffix("Config")
        return name or self.peft_type


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


@functools.cache
def tuners() -> dict[str, Tuner]:
    """Every PEFT type PEFT registers, by name."""
    import peft  # noqa: F401 - importing PEFT registers every tuner
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer_classes = _subclasses(BaseTunerLayer)
    found = {}
    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        model_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        layers: set[type] = set()
        if model_cls is not None:
            package = model_cls.__module__.rsplit(".", 1)[0]  # peft.tuners.<method>
            layers = {c for c in layer_classes if c.__module__ == package or c.__module__.startswith(package + ".")}
            base = getattr(model_cls, "tuner_layer_cls", None)
            if base is not None:
                layers.add(base)
        name = str(getattr(peft_type, "value", peft_type))
        found[name] = Tuner(
            peft_type=name,
            config_cls=config_cls,
            model_cls=model_cls,
            prefix=PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type),
            layer_names=frozenset(n for c in layers for n in c.adapter_layer_names),
            other_names=frozenset(n for c in layers for n in c.other_param_names),
            prompt_learning=issubclass(config_cls, PromptLearningConfig),
        )
    return found


def tuner(peft_type: Any) -> Tuner:
    """The tuner of a PEFT type (a ``PeftType`` or its name); KeyError for a type this PEFT does not know."""
    return tuners()[str(getattr(peft_type, "value", peft_type))]


@functools.cache
def layer_names() -> frozenset[str]:
    """Every attribute name any tuner layer keeps its adapter state in (``lora_A``, ``hada_w1_a``, ``oft_R``...)."""
    return frozenset(n for t in tuners().values() for n in t.layer_names)


@functools.cache
def state_names() -> frozenset[str]:
    """``layer_names`` and the other per-adapter attributes of tuner layers (``vera_A``, ``ranknum``...)."""
    return frozenset(n for t in tuners().values() for n in t.names)


def tuners_holding(segments: set[str]) -> tuple[str, ...]:
    """The PEFT types whose layers name all of ``segments``, the most general first (LoRA before AdaLoRA, whose
    layers add ``lora_E`` and ``ranknum`` to LoRA's)."""
    fitting = [t for t in tuners().values() if segments and segments <= t.names]
    return tuple(t.peft_type for t in sorted(fitting, key=lambda t: (len(t.names), t.peft_type)))


def config_class(name: str) -> type | None:
    """A PEFT config class by its class name (``LoraConfig``) or dotted path (``peft.LoraConfig``)."""
    short = name.rsplit(".", 1)[-1]
    return next((t.config_cls for t in tuners().values() if t.config_cls.__name__ == short), None)


def supported_table(tested: dict[str, str] | None = None) -> str:
    """The README's table of PEFT types, generated from the registry: which ckpt2hf merges, which it refuses and
    why. ``tested``: PEFT type -> what the test suite trains for it."""
    tested = tested or {}
    rows = ["| PEFT type | config class | converted | tested with |", "|---|---|---|---|"]
    for t in sorted(tuners().values(), key=lambda t: t.peft_type):
        if t.refusal is not None:
            verdict = f"refused: {t.refusal}"
        else:
            verdict = "merged" if t.peft_type in tested else "PEFT's own merge (no run in the test suite)"
        rows.append(f"| `{t.peft_type}` | `{t.config_cls.__name__}` | {verdict} | {tested.get(t.peft_type, '')} |")
    return "\n".join(rows)
