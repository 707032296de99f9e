"""The plan of a conversion: pure data, frozen, decided from metadata alone (no tensor data read).

For each part of the export it says which tensors are written, under which names, in which dtype, where each one
comes from (a ``TensorRef`` into a named source) or which LoRA layer's merge produces it, what happens to every
source key, the tie decision, the LoRA config and the config file to write. ``planner`` builds it; ``settle`` (in
``checks``) fills in what only data can tell (the two LoRA sources compared, a tie confirmed); the engines only
execute it; ``--dry-run`` and ``inspect`` print it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .bases import BaseRef
from .discover import RunInputs
from .keymap import TIED, WRITTEN, OuterPrefix, PeftLayout
from .layout import Component
from .lora import Pairing, SourceComparison
from .sources import TensorRef
from .vocab import Tokenizer

FROM_BASE = "not in the checkpoint (frozen, not saved): read from the base model"
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
    merged_from: str | None = None  # a module path of ``LoraPlan.layers``

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
class MergeLayer:
    """One PEFT layer to merge: its state (as the layer names it) and the plain parameters it produces."""

    module: str  # plain module path, e.g. model.layers.0.self_attn.q_proj
    path: str  # where the layer sits in the PEFT model, e.g. base_model.model.model.layers.0.self_attn.q_proj
    inputs: tuple[tuple[str, TensorRef], ...]  # the layer's state_dict name -> source tensor
    outputs: tuple[str, ...]  # plain keys written from it (module.weight, module.bias)
    input_dtypes: tuple[torch.dtype, ...] = ()  # the dtypes its inputs are stored in


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """The adapter merged into a part."""

    adapter_name: str
    config: Any  # peft.LoraConfig
    config_from: str  # "adapter_config.json" or "hyper_parameters"
    tensors_from: str  # "checkpoint" or "adapter"
    layers: tuple[MergeLayer, ...]
    layout: PeftLayout
    adapter_folder: Path | None = None  # the weights file of the adapter folder, if the run has one
    pairing: Pairing | None = None  # checkpoint vs adapter folder by key (None: no adapter folder)
    comparison: SourceComparison | None = None  # by value: filled in by ``settle``
    idle: tuple[str, ...] = ()  # LoRA modules whose B factors are all zeros: filled in by ``settle``

    def facts(self) -> dict[str, Any]:
        """What the manifest records about the adapter."""
        cfg = self.config
        targets = cfg.target_modules
        return {
            "name": self.adapter_name,
            "r": cfg.r,
            "alpha": cfg.lora_alpha,
            "target_modules": [targets] if isinstance(targets, str) else sorted(targets or []),
            "modules_to_save": sorted(cfg.modules_to_save or []),
            "use_rslora": bool(cfg.use_rslora),
            "use_dora": bool(cfg.use_dora),
            "config_from": self.config_from,
            "tensors_from": self.tensors_from,
            "lora_pairs": len(self.layout.lora_modules),
            "idle_lora_modules": len(self.idle),
            "trainable_token_modules": list(self.layout.token_modules),
            "sources_compared": self.comparison.as_dict() if self.comparison is not None else None,
        }


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
    lora: LoraPlan | None = None
    tie: Tie | None = None
    support_files: tuple[str, ...] = ()
    vocab_resized: int | None = None  # rows of the embeddings, when they differ from the base's vocab_size
    max_shard_size: str | int | None = None  # None: always one file
    from_base: tuple[str, ...] = ()  # component keys the run did not save, read from the base model's weights
    tokenizer: Tokenizer | None = None  # shipped with a language model (its files replace the base's)
    quantized: tuple[str, ...] = ()  # component keys of weights the run held in 4-bit (QLoRA)
    qlora_base: str | None = None  # where their full-precision values come from (see QLORA_BASES)

    @property
    def name(self) -> str:
        return self.comp.name

    @property
    def out(self) -> str:
        return self.comp.out

    @property
    def check_dtype(self) -> torch.dtype:
        """The dtype whose tolerance verification applies: the export's, or the run's when that is narrower (a
        bf16 run's LoRA factors carry bf16 precision whatever the export's dtype)."""
        dtypes = [self.dtype or torch.float32]
        if self.lora is not None:
            dtypes += [ref_dtype for layer in self.lora.layers for ref_dtype in layer.input_dtypes]
        floating = [d for d in dtypes if d.is_floating_point]
        return min(floating, key=lambda d: (d.itemsize, 0 if d == torch.bfloat16 else 1))

    @property
    def tied(self) -> bool:
        return self.tie is not None and self.tie.tied

    @property
    def tensors(self) -> tuple[OutTensor, ...]:
        """The tensors written: lm_head is left out when tied to the embeddings."""
        if not self.tied:
            return self.candidates
        return tuple(t for t in self.candidates if t.name != self.tie.head)

    def accounting(self) -> dict[str, int]:
        """How many source keys each fate takes (a tied lm_head is moved from written to tied)."""
        fates = {fate: list(keys) for fate, keys in self.fates.items()}
        if self.tied and self.tie.head in self.plain:
            head = self.plain[self.tie.head]
            fates[WRITTEN] = [k for k in fates.get(WRITTEN, []) if k != head]
            fates[TIED] = [head]
        counts = {fate: len(keys) for fate, keys in fates.items() if keys}
        if self.from_base:
            counts[FROM_BASE] = len(self.from_base)
        return counts

    def summary(self) -> dict[str, Any]:
        """The part as ``--dry-run`` prints it and the manifest records it."""
        tensors = self.tensors
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
            out["tie_word_embeddings"] = self.tied
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.record()
        if self.quantized:
            out["qlora"] = {"quantized_weights": len(self.quantized), "base_weights_from": QLORA_BASES[self.qlora_base]}
        if self.lora is not None:
            out["lora"] = {
                "adapter": self.lora.adapter_name,
                "pairs": len(self.lora.layout.lora_modules),
                "tensors_from": self.lora.tensors_from,
            }
        return out

    def files(self) -> list[str]:
        if self.auto_class is None:
            return ["model.safetensors"]
        tokenizer = list(self.tokenizer.files) if self.tokenizer is not None else []
        return ["config.json", "model.safetensors (or shards + index)", *self.support_files, *tokenizer]


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

    def part(self, name: str) -> PartPlan:
        return next(p for p in self.parts if p.name == name)
