"""Building the plan from metadata alone: key names, shapes, dtypes, stored checksums, hyper-parameters, the
layout config, the base configs and the adapter's config. No tensor data is read here."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from .bases import BaseRef, load_base_config, resolve_base
from .discover import RunInputs, find_inputs
from .errors import ConvertError, preview
from .keymap import (
    ComponentKeys,
    PeftLayout,
    Split,
    base_key,
    component_adapter_keys,
    component_keys,
    quantized_weights,
    split_components,
)
from .layout import Component, LayoutConfig, load_layout
from .lora import component_config, lora_config_from, pair_sources, refuse_reshaped
from .merge import ModelShape, describe_model
from .names import ADAPTER, CHECKPOINT, CONFIG, SUPPORT_FILES, TOKENIZER_FILES
from .options import ConvertOptions
from .plan import QLORA_BASES, LoraPlan, MergeLayer, OutTensor, PartPlan, Plan
from .policy import check_fit, check_peft_fit, configured_tie, output_dtype, part_dtype, plan_tie
from .sources import (
    AdapterFolder,
    Checkpoint,
    Sources,
    SpanReader,
    SpanSource,
    TensorRef,
    find_adapter_folder,
    open_adapter_folder,
)
from .sources import open_checkpoint as open_checkpoint_file
from .sources.model_folder import open_model_folder
from .vocab import check_tokenizer, find_tokenizer

log = logging.getLogger(__name__)

# Component kind -> the transformers Auto class that loads its folder (None: a bare state_dict file).
AUTO_CLASS: dict[str, str | None] = {
    "hf_model": "AutoModel",
    "hf_causal_lm": "AutoModelForCausalLM",
    "state_dict": None,
}

STREAM_ABOVE = 1 << 30  # float32 bytes of a part above which auto streams even when memory would allow the full engine


@dataclasses.dataclass
class Opened:
    """A run's inputs, opened for planning: metadata read and tensors located, nothing else."""

    inputs: RunInputs
    checkpoint: Checkpoint
    layout: LayoutConfig
    split: Split
    sources: Sources  # "checkpoint", and "adapter" once an adapter folder is opened
    adapter: AdapterFolder | None = None  # the run's adapter folder, once a PEFT component opened it

    def close(self) -> None:
        self.sources.close()


def open_run(opts: ConvertOptions) -> Opened:
    """Find the inputs, open the checkpoint lazily and sort its keys by component."""
    inputs = find_inputs(opts.run, opts.ckpt, opts.adapter_dir)
    log.info("checkpoint: %s (%s)", inputs.checkpoint, inputs.reason)
    log.info("adapter folder: %s", inputs.adapter_root or "none")
    reader = SpanReader(opts.chunk_bytes, opts.pool_bytes)
    try:
        checkpoint = open_checkpoint_file(inputs.checkpoint, reader)
        layout = load_layout(opts.config)
        split = split_components(checkpoint.source.keys(), layout)
    except BaseException:
        reader.close()
        raise
    log.info(
        "outer prefix %r (wrappers: %s; attribute: %s)",
        split.outer.prefix,
        ", ".join(split.outer.wrappers) or "none",
        split.outer.attribute or "none",
    )
    return Opened(inputs, checkpoint, layout, split, Sources(reader, {CHECKPOINT: checkpoint.source}))


def build_plan(opened: Opened, opts: ConvertOptions) -> Plan:
    """Plan every part of the export (see ``plan``); ConvertError for anything that cannot be converted as given."""
    split, layout = opened.split, opened.layout
    split.raise_for_unclaimed(layout)
    unknown = sorted(set(opts.bases) - {c.name for c in layout.components})
    if unknown:
        raise ConvertError(f"--base {unknown[0]}=...: no component named {unknown[0]} in {layout.path.name}")
    parts = []
    for comp in layout.components:
        keys = split.keys[comp.name]
        if not keys and not (opened.checkpoint.frozen_excluded and AUTO_CLASS[comp.kind] is not None):
            log.warning("component %s: the checkpoint has no keys for it; skipped", comp.name)
            continue
        parts.append(_PartPlanner(comp, keys, opened, opts).plan())
    ckpt = opened.checkpoint
    plan = Plan(
        inputs=opened.inputs,
        checkpoint_format=ckpt.format,
        epoch=ckpt.epoch,
        global_step=ckpt.global_step,
        lightning_version=ckpt.lightning_version,
        layout=layout.name,
        outer=split.outer,
        dropped={reason: tuple(keys) for reason, keys in split.dropped.items()},
        parts=tuple(parts),
        lora_from=opts.lora_from,
        checkpoint_layout=dict(ckpt.layout),
        frozen_excluded=ckpt.frozen_excluded,
    )
    return dataclasses.replace(plan, engine=choose_engine(opts, plan.parts))


def choose_engine(opts: ConvertOptions, parts: tuple[PartPlan, ...]) -> str:
    """``streaming`` for a part over 1 GiB in float32 or when the whole-model engine would need more than
    ``max_memory`` (default: half the RAM); ``full`` otherwise (small models: it also compares logits end to end)."""
    if opts.engine in ("full", "streaming"):
        return opts.engine
    if opts.engine != "auto":
        raise ConvertError(f"--engine {opts.engine}: use auto, full or streaming")
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        limit = parse_size_to_int(opts.max_memory) if opts.max_memory else _ram() // 2
    except ValueError as exc:
        raise ConvertError(f"--max-memory {opts.max_memory}: not a size; use e.g. 8GB") from exc
    # The full engine holds the float32 model, the merged copy being cast and the output: about 3x float32.
    largest = max((sum(t.numel for t in p.candidates) * 4 for p in parts), default=0)
    return "streaming" if largest > STREAM_ABOVE or 3 * largest > limit else "full"


def _ram() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _PartPlanner:
    """Plans one component; a class only to share its inputs between the steps."""

    def __init__(self, comp: Component, keys: dict[str, str], opened: Opened, opts: ConvertOptions) -> None:
        self.comp, self.keys, self.opened, self.opts = comp, keys, opened, opts
        self.where = f"{opened.inputs.checkpoint} ({comp.name})"
        self.inputs = {rel: TensorRef(CHECKPOINT, src) for rel, src in keys.items()}

    def info(self, rel: str):
        return self.opened.sources.info(self.inputs[rel])

    def plan(self) -> PartPlan:
        auto_class = AUTO_CLASS[self.comp.kind]
        analysis = component_keys(self.keys, self.where)
        if auto_class is not None:
            return self._plan_hf(auto_class, analysis)
        peft = analysis.peft
        if peft is not None and peft.merged_modules:
            raise ConvertError(
                f"{self.where}: LoRA on a module of a state_dict component ({preview(list(peft.merged_modules), 2)}) "
                "is not merged; make the component a Hugging Face model (kind hf_model) or keep LoRA off it"
            )
        dtype = part_dtype(self.opts.dtype)
        return PartPlan(  # a state_dict is written under its own names (a modules_to_save copy replacing the original)
            comp=self.comp,
            auto_class=None,
            keys=self.keys,
            inputs=self.inputs,
            plain=analysis.plain,
            fates=analysis.fates,
            candidates=self._candidates(analysis.plain, dtype),
            dtype=dtype,
        )

    def _candidates(self, plain: dict[str, str], dtype: Any, merged: dict[str, str] | None = None) -> tuple:
        merged = merged or {}
        out = []
        for key, rel in plain.items():
            info = self.info(rel)
            if key in merged:
                out.append(OutTensor(key, output_dtype(dtype, info.dtype), info.shape, merged_from=merged[key]))
            else:
                out.append(OutTensor(key, output_dtype(dtype, info.dtype), info.shape, source=self.inputs[rel]))
        return tuple(out)

    def _plan_hf(self, auto_class: str, analysis: ComponentKeys) -> PartPlan:
        opened, comp = self.opened, self.comp
        ckpt = opened.checkpoint
        base = resolve_base(comp, ckpt.hparams, opened.inputs.run, self.opts.bases, ckpt.path)
        config = copy.deepcopy(load_base_config(base))
        base_vocab = getattr(config.get_text_config(), "vocab_size", None)
        plain = analysis.plain
        lora = None
        if analysis.peft is not None:
            lora = self._plan_lora(analysis.peft)
        dtype = part_dtype(self.opts.dtype, config)
        if dtype is not None:
            config.dtype = dtype
        shape = describe_model(
            auto_class,
            config,
            lora.config if lora else None,
            lora.adapter_name if lora else "default",
            lora.layout.merged_modules if lora else (),
            embedding_rows=lambda key: self.info(plain[key]).shape[0] if key in plain else None,
            where=self.where,
        )
        from_base: tuple[str, ...] = ()
        if ckpt.frozen_excluded:
            analysis, from_base = self._fill_from_base(base, config, shape, analysis, lora)
            plain = analysis.plain
        quantized = quantized_weights(analysis.keys)
        if quantized:
            self._unquantize(quantized, base, shape, lora)
        tokenizer = None
        if auto_class == "AutoModelForCausalLM":
            rows = self.info(plain[shape.embed_key]).shape[0] if shape.embed_key in plain else None
            folder, found_by = find_tokenizer(
                self.opts.tokenizer,
                self.opened.adapter.path if self.opened.adapter is not None else None,
                self.opened.inputs.run,
                ckpt.hparams,
                base.path,
            )
            tokenizer = check_tokenizer(folder, found_by, rows, base_vocab, self.where)
        merged_keys = {f"{m}.weight" for m in (lora.layout.merged_modules if lora else ())}
        tie = plan_tie(config, shape.head_key, shape.embed_key, plain, merged_keys, lambda k: self.info(plain[k]))
        optional = {shape.head_key} if tie.tied and shape.head_key not in plain else set()
        planned = {key: self.info(rel).shape for key, rel in plain.items()}
        check_fit(shape.plain, planned, optional, self.where, base.path / CONFIG, comp.name)
        outputs: dict[str, str] = {}
        if lora is not None:
            states = {rel for weight in quantized.values() for rel in weight.values()}
            given = {rel: self.info(rel).shape for rel in analysis.keys if rel not in states}
            hint = "check that the base config matches the trained model (--base)"
            check_peft_fit(shape.peft, given, self.where, hint)
            layers = self._merge_layers(lora, shape.layers, plain)
            outputs = {key: layer.module for layer in layers for key in layer.outputs}
            lora = dataclasses.replace(lora, layers=layers)
        return PartPlan(
            comp=comp,
            auto_class=auto_class,
            keys=self.keys,
            inputs=self.inputs,
            plain=plain,
            fates=analysis.fates,
            candidates=self._candidates(plain, dtype, outputs),
            dtype=dtype,
            base=base,
            config=config,
            lora=lora,
            tie=tie,
            support_files=tuple(
                n
                for n in SUPPORT_FILES
                if (base.path / n).is_file() and (tokenizer is None or n not in TOKENIZER_FILES)
            ),
            tokenizer=tokenizer,
            vocab_resized=shape.vocab_resized,
            max_shard_size=self.opts.max_shard_size,
            from_base=from_base,
            quantized=tuple(quantized),
            qlora_base=self.opts.qlora_base if quantized else None,
        )

    def _base_weights(self, base: BaseRef, why: str) -> tuple[str, SpanSource]:
        """The base model's weights as a source (registered once per component); ConvertError naming ``why``."""
        name = f"base:{self.comp.name}"
        sources = self.opened.sources
        if name not in sources:
            weights = open_model_folder(base.path, sources.reader)
            if weights is None:
                raise ConvertError(
                    f"{self.opened.inputs.checkpoint} ({self.comp.name}): {why}, and {base.path} has no weights to "
                    f"take them from; pass --base {self.comp.name}=PATH with the base model's weights"
                )
            sources.add(name, weights)
        return name, sources[name]

    def _unquantize(
        self, quantized: dict[str, dict[str, str]], base: BaseRef, shape: ModelShape, lora: LoraPlan | None
    ) -> None:
        """QLoRA: the run held these base weights in 4-bit. By default they come from the base model in full
        precision; with --qlora-base dequantized, bitsandbytes dequantizes the run's own 4-bit weights."""
        expected = shape.peft if lora is not None else shape.plain
        for states in quantized.values():  # the state goes into the dequantization, if at all: no tensor of its own
            for rel in states.values():
                self.inputs.pop(rel, None)
        mode = self.opts.qlora_base
        if mode not in QLORA_BASES:
            raise ConvertError(f"--qlora-base {mode}: use {' or '.join(QLORA_BASES)}")
        if mode == "dequantized":
            from .sources.dequantized import DequantizedSource

            packed = {rel: TensorRef(CHECKPOINT, self.keys[rel]) for rel in quantized}
            states = {
                rel: {state: TensorRef(CHECKPOINT, self.keys[key]) for state, key in found.items()}
                for rel, found in quantized.items()
            }
            name = f"dequantized:{self.comp.name}"
            self.opened.sources.add(name, DequantizedSource(self.opened.sources, packed, states, expected))
            for rel in quantized:
                self.inputs[rel] = TensorRef(name, rel)
            return
        name, weights = self._base_weights(base, f"the run held {len(quantized)} base weights in 4-bit (QLoRA)")
        available = set(weights.keys())
        missing = []
        for rel in quantized:
            key = base_key(rel, lora.adapter_name) if lora is not None else rel
            if key not in available or weights.info(key).shape != expected.get(rel):
                missing.append(rel)
                continue
            self.inputs[rel] = TensorRef(name, key)
        if missing:
            raise ConvertError(
                f"{self.opened.inputs.checkpoint} ({self.comp.name}): {len(missing)} 4-bit weights have no "
                f"full-precision counterpart in {base.path} ({preview(missing, 3)}); pass --base {self.comp.name}=PATH "
                "with the model the run quantized, or --qlora-base dequantized"
            )

    def _fill_from_base(
        self, base: BaseRef, config: Any, shape: ModelShape, analysis: ComponentKeys, lora: LoraPlan | None
    ) -> tuple[ComponentKeys, tuple[str, ...]]:
        """The run did not save its frozen parameters: the tensors the model needs and the checkpoint lacks are the
        base model's (base layers, norms, original copies, a frozen vision tower)."""
        expected = shape.peft if lora is not None else shape.plain
        missing = [rel for rel in expected if rel not in analysis.keys]
        if not missing:
            return analysis, ()
        why = f"the run did not save its frozen parameters ({len(missing)} tensors, e.g. {missing[0]})"
        name, weights = self._base_weights(base, why)
        available = set(weights.keys())
        tied = configured_tie(config)
        taken, unresolved = [], []
        for rel in missing:
            key = base_key(rel, lora.adapter_name) if lora is not None else rel
            if key == shape.head_key and key not in available and tied:
                key = shape.embed_key  # a tied head is saved once, as the embeddings
            if key is None or key not in available or weights.info(key).shape != expected[rel]:
                unresolved.append(rel)
                continue
            self.inputs[rel] = TensorRef(name, key)
            taken.append(rel)
        if unresolved:
            raise ConvertError(
                f"{self.opened.inputs.checkpoint} ({self.comp.name}): {len(unresolved)} tensors are neither in the "
                f"checkpoint nor in the base model at {base.path} ({preview(unresolved, 3)}); the checkpoint is "
                "incomplete, or the base is not the one the run trained from"
            )
        log.info("%s: %d frozen tensors the run did not save come from %s", self.comp.name, len(taken), base.path)
        keys = {**analysis.keys, **{rel: rel for rel in taken}}
        return component_keys(keys, self.where), tuple(taken)

    def _plan_lora(self, layout: PeftLayout) -> LoraPlan:
        opened, opts = self.opened, self.opts
        adapter = self._adapter(layout.adapter_name)
        config, config_from = lora_config_from(layout, adapter, opened.checkpoint.hparams, self.where)
        if opened.split.outer.peft:  # the adapter wraps the whole model: restate its config for this component
            config = component_config(config, layout, self.comp.prefix)
        pairing, tensors_from = None, CHECKPOINT
        if adapter is not None:
            infos = {rel: self.info(rel) for rel in self.keys}
            folder_keys = component_adapter_keys(adapter.source.keys(), self.comp, self.opened.split.outer)
            pairing = pair_sources(self.keys, infos, adapter, layout.adapter_name, folder_keys)
            if opts.lora_from != "checkpoint":
                refuse_reshaped(pairing, str(adapter.weights_path), str(opened.inputs.checkpoint))
            if opts.lora_from == "adapter":
                if pairing.only_adapter:
                    raise ConvertError(
                        f"{adapter.weights_path}: {len(pairing.only_adapter)} adapter tensors have no place in the "
                        f"checkpoint's model ({preview(list(pairing.only_adapter), 3)}); the adapter belongs to "
                        "another model"
                    )
                for akey, rel in pairing.pairs:
                    self.inputs[rel] = TensorRef(ADAPTER, akey)
                tensors_from = ADAPTER
        elif opts.lora_from == "adapter":
            raise ConvertError(
                f"{opened.inputs.run}: --lora-from adapter, but there is no adapter folder (lora_weights/)"
            )
        return LoraPlan(
            adapter_name=layout.adapter_name,
            config=config,
            config_from=config_from,
            tensors_from=tensors_from,
            layers=(),
            layout=layout,
            adapter_folder=adapter.weights_path if adapter else None,
            pairing=pairing,
        )

    def _adapter(self, adapter_name: str) -> AdapterFolder | None:
        """The run's adapter folder, opened once for every component it serves."""
        opened = self.opened
        if opened.adapter is None:
            root = opened.inputs.adapter_root
            folder = find_adapter_folder(root, adapter_name) if root else None
            if folder is None:
                return None
            opened.adapter = open_adapter_folder(folder, opened.sources.reader)
            opened.sources.add(ADAPTER, opened.adapter.source)
        return opened.adapter

    def _merge_layers(self, lora: LoraPlan, layers: dict, plain: dict[str, str]) -> tuple[MergeLayer, ...]:
        """Each merged module's PEFT layer: its state (from the sources) and the plain parameters it produces."""
        inverse = {rel: key for key, rel in plain.items()}
        planned = []
        for module in lora.layout.merged_modules:
            if module not in layers:
                raise ConvertError(
                    f"{self.where}: {module} carries LoRA tensors, but the adapter's config does not adapt it; "
                    "pass --adapter-dir with the run's own adapter folder"
                )
            path, names = layers[module]
            rel = {name: f"{path}.{name}" for name in names}
            outputs = tuple(inverse[r] for name, r in rel.items() if name.startswith("base_layer.") and r in inverse)
            inputs = tuple((n, self.inputs[r]) for n, r in rel.items())
            dtypes = tuple(sorted({self.info(r).dtype for r in rel.values()}, key=str))
            planned.append(MergeLayer(module, path, inputs, outputs, dtypes))
        return tuple(planned)
