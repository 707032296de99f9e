"""The plan of a conversion: pure data, frozen, decided from metadata alone (no tensor data read).

For each part of the export it says which tensors are written, under which names, in which dtype, where each one
comes from (a ``TensorRef`` into a named source) or which merge unit produces it, what happens to every source key,
the tie decision, the adapter's plan (``converter.peft``) and the config file to write. ``planner`` builds it;
``settle`` fills in what only data can tell before writing (the two adapter sources compared, a tie the stored
checksums could not decide); an engine settles, through ``policy``, what only the merged values can tell (a tie when
the adapter changes lm_head or the embeddings; which units changed nothing) and returns the plan as executed;
``--dry-run`` and ``inspect`` print it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch

from .accounting import ALIASED, FROM_BASE, TIED, WRITTEN
from .bases import BaseRef
from .discover import RunInputs
from .keymap import OuterPrefix
from .layout import Component
from .names import CONFIG, TOKENIZER_CONFIG, WEIGHTS
from .peft import AdapterPlan
from .sources import Sources, TensorRef
from .vocab import NO_TOKENIZER, Tokenizer
from .weight_format import SaveLayout

QLORA_BASES = {
    "base": "the base model's weights (full precision)",
    "dequantized": "the checkpoint's 4-bit weights, dequantized by bitsandbytes (as the trained model saw them)",
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One tensor of the export: copied from ``source`` (cast to ``dtype``), or produced by merging ``merged_from``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: TensorRef | None = None
    merged_from: str | None = None  # the plain module path of the merge unit that produces it

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Tie:
    """Whether the export ties lm_head to the input embeddings (and so does not write lm_head)."""

    configured: bool  # the base config says tie_word_embeddings
    tied: bool
    settled: bool  # False: the values decide, before writing (``settle``) or after the merge (``after_merge``)
    because: str  # how it was (or will be) decided
    head: str | None = None  # plain keys
    embed: str | None = None
    after_merge: bool = False  # LoRA changes lm_head or the embeddings: only the merged values can tell


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """One part of the export: a folder (``out``, relative to OUT) and everything written into it."""

    comp: Component
    auto_class: str | None  # the transformers Auto class that loads the folder; None: a bare state_dict file
    keys: dict[str, str]  # component-relative key -> source key (every source key of the component)
    inputs: dict[str, TensorRef]  # component-relative key -> where its tensor is read (--lora-from adapter)
    plain: dict[str, str]  # written (plain) key -> component-relative key
    fates: dict[str, tuple[str, ...]]  # what happens to each source key -> those keys (component-relative)
    candidates: tuple[OutTensor, ...]  # every tensor the part may write, lm_head included
    dtype: torch.dtype | None  # the output dtype of floating tensors (None: as in the source)
    base: BaseRef | None = None
    config: Any = None  # the transformers config to write (edited copy of the base's)
    adapter: AdapterPlan | None = None
    tie: Tie | None = None
    support_files: tuple[str, ...] = ()
    vocab_resized: int | None = None  # rows of the embeddings, when they differ from the base's vocab_size
    max_shard_size: str | int | None = None  # None: always one file
    from_base: tuple[str, ...] = ()  # component keys the run did not save, read from the base model's weights
    tokenizer: Tokenizer | None = None  # shipped with a language model (its files replace the base's)
    aliases: tuple[str, ...] = ()  # keys the model ties to another written tensor (T5's encoder/decoder embed_tokens)
    auto_class_from: str = ""  # why ``auto_class``: the layout, the adapter's task_type or --auto-class
    quantized: tuple[str, ...] = ()  # component keys of weights the run held in 4-bit (QLoRA)
    qlora_base: str | None = None  # where their full-precision values come from (see QLORA_BASES)
    saved: SaveLayout | None = None  # the hub's format when save_pretrained writes other tensors (fused experts)

    @property
    def name(self) -> str:
        return self.comp.name

    @property
    def out(self) -> str:
        return self.comp.out

    @property
    def check_dtype(self) -> torch.dtype:
        """The dtype whose tolerance verification applies: the export's, or the run's when that is narrower (a
        bf16 run's adapter tensors carry bf16 precision whatever the export's dtype)."""
        dtypes = [self.dtype or torch.float32]
        if self.adapter is not None:
            dtypes += [ref_dtype for unit in self.adapter.units for ref_dtype in unit.input_dtypes]
        floating = [d for d in dtypes if d.is_floating_point]
        return min(floating, key=lambda d: (d.itemsize, 0 if d == torch.bfloat16 else 1))

    @property
    def tied(self) -> bool:
        return self.tie is not None and self.tie.tied

    @property
    def tensors(self) -> tuple[OutTensor, ...]:
        """The tensors written: lm_head is left out when tied to the embeddings, and every other tensor the model ties
        to a written one (as ``save_pretrained`` leaves them out; ``from_pretrained`` ties them again)."""
        left_out = {*self.aliases, *([self.tie.head] if self.tied else [])}
        return tuple(t for t in self.candidates if t.name not in left_out) if left_out else self.candidates

    def written(self) -> tuple[OutTensor, ...]:
        """The tensors of the files, as ``save_pretrained`` names and shapes them (the hub's format); each in the
        dtype of the in-memory tensor it comes from, whose ``source``/``merged_from`` it keeps."""
        if self.saved is None:
            return self.tensors
        found = []
        for t in self.tensors:
            outputs = self.saved.of(t.name)
            if not outputs:
                found.append(t)
            found.extend(dataclasses.replace(t, name=s.name, shape=s.shape) for s in outputs)
        return tuple(found)

    def accounting(self) -> dict[str, int]:
        """How many source keys each fate takes (a tied lm_head is moved from written to tied)."""
        fates = {fate: list(keys) for fate, keys in self.fates.items()}
        for fate, keys in ((ALIASED, self.aliases), (TIED, [self.tie.head] if self.tied else [])):
            moved = [self.plain[k] for k in keys if k in self.plain]
            if moved:
                fates[WRITTEN] = [k for k in fates.get(WRITTEN, []) if k not in moved]
                fates[fate] = moved
        counts = {fate: len(keys) for fate, keys in fates.items() if keys}
        if self.from_base:
            counts[FROM_BASE] = len(self.from_base)
        return counts

    def summary(self) -> dict[str, Any]:
        """The part as ``--dry-run`` prints it and the manifest records it."""
        tensors = self.written()
        out = {
            "component": self.name,
            "kind": self.comp.kind,
            "out": self.out or ".",
            "files": self.files(),
            "tensors": len(tensors),
            "dtypes": dict(Counter(dtype_name(t.dtype) for t in tensors)),
            "bytes": sum(t.nbytes for t in tensors),
        }
        if self.base is not None:
            out["base"] = self.base.name
            out["auto_class"] = self.auto_class
            out["architecture"] = (self.config.architectures or [None])[0] if self.config is not None else None
            out["auto_class_from"] = self.auto_class_from
            out["tie_word_embeddings"] = self.tied
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.record()
        elif self.ships_no_tokenizer:
            out["tokenizer"] = NO_TOKENIZER
        if self.quantized:
            out["qlora"] = {"quantized_weights": len(self.quantized), "base_weights_from": QLORA_BASES[self.qlora_base]}
        if self.adapter is not None:
            out["adapter"] = {
                "name": self.adapter.adapter_name,
                "peft_type": self.adapter.peft_type,
                "adapted_modules": len(self.adapter.units),
                "tensors_from": self.adapter.tensors_from,
            }
        return out

    @property
    def ships_no_tokenizer(self) -> bool:
        """A language model exported without a tokenizer (neither the run nor its base had one)."""
        shipped = self.tokenizer is not None or TOKENIZER_CONFIG in self.support_files
        return self.comp.kind == "hf_causal_lm" and not shipped

    def files(self) -> list[str]:
        if self.auto_class is None:
            return [WEIGHTS]
        tokenizer = list(self.tokenizer.files) if self.tokenizer is not None else []
        return [CONFIG, f"{WEIGHTS} (or shards + index)", *self.support_files, *tokenizer]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The whole conversion."""

    inputs: RunInputs
    checkpoint_format: str
    epoch: int | None
    global_step: int | None
    lightning_version: str | None
    layout: str  # the layout config's name
    outer: OuterPrefix
    dropped: dict[str, tuple[str, ...]]  # reason -> source keys dropped by a config rule
    parts: tuple[PartPlan, ...]
    lora_from: str
    engine: str = "full"
    checkpoint_layout: dict[str, Any] = dataclasses.field(default_factory=dict)  # files, ranks, stage...
    frozen_excluded: bool = False  # the run saved no frozen parameters; they are read from the base models
    sources: Sources | None = dataclasses.field(default=None, compare=False, repr=False)  # every source it refers to

    def part(self, name: str) -> PartPlan:
        return next(p for p in self.parts if p.name == name)
