"""Planning one component of the export from metadata alone: its base config, the model it builds (on the meta
device), the adapter's share (``converter.peft``), the tokenizer, the tie, and where every tensor is read.

Tensors the checkpoint does not hold come from the base model's weights when the run did not save them
(``fill_from_base``), or when the run held them in 4-bit (``unquantize``, QLoRA); both open the base's weights as a
source of the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from .accounting import quantized_weights
from .bases import BaseRef, load_base_config, resolve_base
from .errors import ConvertError, preview
from .layout import Component
from .names import CHECKPOINT, CONFIG, SUPPORT_FILES, TOKENIZER_FILES
from .options import ConvertOptions
from .peft import (
    PEFT_PREFIX,
    AdapterInputs,
    ComponentKeys,
    ModelShape,
    adapter_config,
    base_key,
    component_adapter_keys,
    component_config,
    component_keys,
    describe_model,
    plan_adapter,
    renamed,
)
from .plan import QLORA_BASES, OutTensor, PartPlan
from .policy import check_fit, configured_tie, output_dtype, part_dtype, plan_tie
from .sources import Sources, SpanSource, TensorInfo, TensorRef
from .sources.model_folder import open_model_folder
from .tasks import LABELLED, head_config, head_size_from_tensors, task_class
from .vocab import BASE, check_tokenizer, find_tokenizer, has_tokenizer, no_tokenizer
from .weight_format import load_renames, meta_model, save_layout

log = logging.getLogger(__name__)

# Component kind -> the transformers Auto class that loads its folder (None: a bare state_dict file).
AUTO_CLASS: dict[str, str | None] = {
    "hf_model": "AutoModel",
    "hf_causal_lm": "AutoModelForCausalLM",
    "state_dict": None,
}


class PartPlanner:
    """Plans one component; a class only to share its inputs between the steps. ``sources`` is the plan's own set:
    the sources planning opens are added to it."""

    def __init__(self, comp: Component, keys: dict[str, str], opened: Any, opts: ConvertOptions, sources: Sources):
        self.comp, self.opened, self.opts, self.sources = comp, opened, opts, sources
        self.where = f"{opened.inputs.checkpoint} ({comp.name})"
        self.analysis = component_keys(keys, self.where)
        self.inputs = {rel: TensorRef(CHECKPOINT, src) for rel, src in self.analysis.keys.items()}

    def info(self, rel: str) -> TensorInfo:
        return self.sources.info(self.inputs[rel])

    def plan(self) -> PartPlan:
        auto_class = AUTO_CLASS[self.comp.kind]
        if auto_class is not None:
            return self._plan_hf(auto_class)
        analysis = self.analysis
        peft = analysis.peft
        if peft is not None and peft.merged_modules:
            raise ConvertError(
                f"{self.where}: an adapter on a module of a state_dict component "
                f"({preview(list(peft.merged_modules), 2)}) is not merged; make the component a Hugging Face model "
                "(kind hf_model) or keep the adapter off it"
            )
        dtype = part_dtype(self.opts.dtype)
        return PartPlan(  # a state_dict is written under its own names (a modules_to_save copy replacing the original)
            comp=self.comp,
            auto_class=None,
            keys=analysis.keys,
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

    def _adapter_config(self) -> tuple[Any, str] | tuple[None, None]:
        layout = self.analysis.peft
        if layout is None:
            return None, None
        config, found = adapter_config(
            layout, self.opened.adapter, self.opened.checkpoint.hparams, self.where, self.opts.given_config,
            lambda rel: self.info(rel).shape,
        )  # fmt: skip
        if self.opened.split.outer.peft:  # the adapter wraps the whole model: restate its config for this component
            config = component_config(config, layout, self.comp.prefix)
        return config, found

    def _plan_hf(self, auto_class: str) -> PartPlan:
        opened, comp, analysis = self.opened, self.comp, self.analysis
        ckpt = opened.checkpoint
        base = resolve_base(comp, ckpt.hparams, opened.inputs.run, self.opts.bases, ckpt.path)
        config = copy.deepcopy(load_base_config(base))
        self.hf_config = config
        base_vocab = getattr(config.get_text_config(), "vocab_size", None)
        dtype = part_dtype(self.opts.dtype, config)
        if dtype is not None:
            config.dtype = dtype
        self.class_from = "the layout"
        if comp.kind == "hf_causal_lm":  # the run's task model: its class follows the adapter's task, or the base's
            auto_class, self.class_from = task_class(auto_class, _task_type(self), self.opts.auto_class, config)
        self.auto_class = auto_class
        model = _task_model(self, auto_class, config)
        rename = load_renames(model)
        if rename is not None:  # an older checkpoint's names, as from_pretrained reads them
            found = component_keys(renamed(analysis.keys, rename), self.where)
            if found.peft is not None:  # read from today's names: what the checkpoint's own said is kept
                found = dataclasses.replace(found, peft=dataclasses.replace(found.peft, legacy=analysis.peft.legacy))
            analysis = self.analysis = found
            self.inputs = {rel: TensorRef(CHECKPOINT, src) for rel, src in analysis.keys.items()}
        peft_config, config_from = self._adapter_config()
        plain = analysis.plain
        shape = describe_model(
            auto_class,
            config,
            peft_config,
            analysis.peft.adapter_name if analysis.peft else "default",
            embedding_rows=lambda key: self.info(plain[key]).shape[0] if key in plain else None,
            where=self.where,
            base_model=copy.deepcopy(model),
        )
        plain, from_base = fill_from_base(self, base, config, shape)
        quantized = quantized_weights(analysis.keys)
        if quantized:
            unquantize(self, quantized, base, shape)
        tokenizer = self._tokenizer(auto_class, shape, plain, base, base_vocab)
        merged_keys = {f"{m}.weight" for m in (analysis.peft.merged_modules if analysis.peft else ())}
        tie = plan_tie(config, shape.head_key, shape.embed_key, plain, merged_keys, lambda k: self.info(plain[k]))
        optional = {shape.head_key} if tie.tied and shape.head_key not in plain else set()
        planned = {key: self.info(rel).shape for key, rel in plain.items()}
        check_fit(shape.plain, planned, optional, self.where, base.path / CONFIG, comp.name, auto_class)
        adapter, outputs = None, {}
        if analysis.peft is not None:
            adapter = self._plan_adapter(shape, peft_config, config_from, quantized)
            outputs = {key: unit.module for unit in adapter.units for key in unit.outputs}
        candidates = self._candidates(plain, dtype, outputs)
        return PartPlan(
            comp=comp,
            aliases=tied_aliases(model, plain, self.info, shape.head_key, set(outputs)),
            auto_class=auto_class,
            auto_class_from=self.class_from,
            keys=analysis.keys,
            inputs=self.inputs,
            plain=plain,
            fates=analysis.fates,
            candidates=candidates,
            dtype=dtype,
            base=base,
            config=config,
            adapter=adapter,
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
            saved=save_layout(model, {t.name: t.shape for t in candidates}, self.where),
        )

    def _tokenizer(self, auto_class: str, shape: ModelShape, plain: dict[str, str], base: BaseRef, base_vocab: Any):
        if self.comp.kind != "hf_causal_lm":  # the run's language (task) model ships the tokenizer
            return None
        rows = self.info(plain[shape.embed_key]).shape[0] if shape.embed_key in plain else None
        adapter = self.opened.adapter
        folder, found_by = find_tokenizer(
            self.opts.tokenizer,
            adapter.path if adapter is not None else None,
            self.opened.inputs.run,
            self.opened.checkpoint.hparams,
            base.path,
        )
        if found_by == BASE and not has_tokenizer(folder):
            no_tokenizer(self.where, folder)
            return None
        return check_tokenizer(folder, found_by, rows, base_vocab, self.where)

    def _plan_adapter(self, shape: ModelShape, config: Any, config_from: str, quantized: dict) -> Any:
        opened = self.opened
        folder = opened.adapter
        folder_keys = None
        if folder is not None:
            folder_keys = component_adapter_keys(folder.source.keys(), self.comp.prefix, opened.split.outer.peft)
        states = frozenset(rel for weight in quantized.values() for rel in weight.values())
        plan, self.inputs = plan_adapter(
            AdapterInputs(
                where=self.where,
                layout=self.analysis.peft,
                config=config,
                config_from=config_from,
                shape=shape,
                inputs=self.inputs,
                info=self.sources.info,
                skip=states,
                folder=folder,
                folder_keys=folder_keys,
                lora_from=self.opts.lora_from,
                checkpoint=str(opened.inputs.checkpoint),
                auto_class=AUTO_CLASS[self.comp.kind],
                hf_config=self.hf_config,
            )
        )
        return plan

    def base_weights(self, base: BaseRef, why: str) -> tuple[str, SpanSource]:
        """The base model's weights as a source of the plan (opened once per component); ConvertError naming
        ``why``."""
        name = f"base:{self.comp.name}"
        if name not in self.sources:
            weights = open_model_folder(base.path, self.sources.reader)
            if weights is None:
                raise ConvertError(
                    f"{self.where}: {why}, and {base.path} has no weights to take them from; pass --base "
                    f"{self.comp.name}=PATH with the base model's weights"
                )
            self.sources.add(name, weights)
        return name, self.sources[name]


def tied_aliases(model: Any, plain: dict[str, str], info: Any, head: str | None, merged: set[str]) -> tuple[str, ...]:
    """The keys the model ties to another key it writes (``all_tied_weights_keys``; lm_head is the tie decision's),
    whose stored bytes are the same: left out of the files, as ``save_pretrained`` leaves them out."""
    found = []
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target == head or target not in plain or source not in plain or {target, source} & merged:
            continue
        a, b = info(plain[target]), info(plain[source])
        if a.shape == b.shape and a.dtype == b.dtype and a.crc32 is not None and a.crc32 == b.crc32:
            found.append(target)
    return tuple(sorted(found))


def other_task(planner: PartPlanner) -> str:
    """The advice for a task model the checkpoint does not fit: perhaps the run trained another class."""
    if planner.comp.kind != "hf_causal_lm" or planner.opts.auto_class:
        return ""
    return f"; pass --auto-class CLASS if the run trained no {planner.auto_class}"


def _task_type(planner: PartPlanner) -> Any:
    """PEFT's task_type in the adapter's config, if there is one and it can be read."""
    try:
        config, _ = planner._adapter_config()
    except ConvertError:  # reported with its context when the part is planned
        return None
    return getattr(config, "task_type", None)


def _task_model(planner: PartPlanner, auto_class: str, config: Any) -> Any:
    """The component's model on the meta device, as ``auto_class`` builds it; a labelled head sized as the run's
    (the hyper-parameters' num_labels and labels, else the checkpoint's head tensors); ``config`` edited to match."""
    analysis = planner.analysis
    labels_from = head_config(config, auto_class, planner.opened.checkpoint.hparams, planner.where)
    model = meta_model(auto_class, config, planner.where)
    if labels_from is None and auto_class in LABELLED:
        held = lambda k: planner.info(analysis.plain[k]).shape if k in analysis.plain else None  # noqa: E731
        found = head_size_from_tensors(config, {k: tuple(v.shape) for k, v in model.state_dict().items()}, held)
        if found is not None:
            config.num_labels = found
            model = meta_model(auto_class, config, planner.where)
    config.architectures = [type(model).__name__]  # the class written, as save_pretrained records it
    return model


def fill_from_base(planner: PartPlanner, base: BaseRef, config: Any, shape: ModelShape) -> tuple[dict, tuple]:
    """The run did not save its frozen parameters: the tensors the model needs and the checkpoint lacks are the
    base model's (base layers, norms, original copies, a frozen vision tower). Returns the part's plain keys (those
    read from the base included) and the component keys read from the base; the fates stay those of the
    checkpoint's own keys."""
    analysis = planner.analysis
    layout = analysis.peft
    expected = shape.peft if layout is not None else shape.plain
    tied = configured_tie(config)
    from_base = {rel: base_key(rel, layout.adapter_name) if layout is not None else rel for rel in expected}
    # What the base holds: the adapter's own tensors missing are a damaged checkpoint, reported by the adapter's plan.
    missing = [rel for rel in expected if rel not in analysis.keys and from_base[rel] is not None]
    if tied and shape.embed_key in analysis.plain:  # a tied head is the checkpoint's embeddings, not the base's
        missing = [rel for rel in missing if rel.removeprefix(PEFT_PREFIX) != shape.head_key]
    if not missing:
        return analysis.plain, ()
    if planner.opts.strict:
        raise ConvertError(
            f"{planner.where}: {len(missing)} tensors of the model are not in the checkpoint "
            f"({preview(sorted(missing), 3)}) "
            "and --strict forbids taking them from the base model; convert without --strict to read them from "
            f"{base.path}"
        )
    why = f"the run did not save its frozen parameters ({len(missing)} tensors, e.g. {missing[0]})"
    name, weights = planner.base_weights(base, why)
    available = set(weights.keys())
    taken, unresolved = [], []
    for rel in missing:
        key = from_base[rel]
        if key == shape.head_key and key not in available and tied:
            key = shape.embed_key  # a tied head is saved once, as the embeddings
        if key is None or key not in available or weights.info(key).shape != expected[rel]:
            unresolved.append(rel)
            continue
        planner.inputs[rel] = TensorRef(name, key)
        taken.append(rel)
    if unresolved:
        raise ConvertError(
            f"{planner.where}: {len(unresolved)} tensors are neither in the checkpoint nor in the base model at "
            f"{base.path} ({preview(unresolved, 3)}); the checkpoint is incomplete, or the base is not the one the run "
            f"trained from{other_task(planner)}"
        )
    if analysis.keys:
        log.info("%s: %d tensors the run did not save come from %s", planner.comp.name, len(taken), base.path)
    else:
        log.warning(
            "%s: the checkpoint holds none of its tensors (frozen and not saved): all %d are the base model's, read "
            "from %s",
            planner.comp.name,
            len(taken),
            base.path,
        )
    whole: ComponentKeys = component_keys({**analysis.keys, **{rel: rel for rel in taken}}, planner.where)
    return whole.plain, tuple(taken)


def unquantize(planner: PartPlanner, quantized: dict[str, dict[str, str]], base: BaseRef, shape: ModelShape) -> None:
    """QLoRA: the run held these base weights in 4-bit. By default they come from the base model in full
    precision; with --qlora-base dequantized, bitsandbytes dequantizes the run's own 4-bit weights."""
    layout = planner.analysis.peft
    expected = shape.peft if layout is not None else shape.plain
    for states in quantized.values():  # the state goes into the dequantization, if at all: no tensor of its own
        for rel in states.values():
            planner.inputs.pop(rel, None)
    mode = planner.opts.qlora_base
    if mode not in QLORA_BASES:
        raise ConvertError(f"--qlora-base {mode}: use {' or '.join(QLORA_BASES)}")
    keys = planner.analysis.keys
    if mode == "dequantized":
        from .sources.dequantized import DequantizedSource

        packed = {rel: TensorRef(CHECKPOINT, keys[rel]) for rel in quantized}
        states = {
            rel: {state: TensorRef(CHECKPOINT, keys[key]) for state, key in found.items()}
            for rel, found in quantized.items()
        }
        name = f"dequantized:{planner.comp.name}"
        planner.sources.add(name, DequantizedSource(planner.sources, packed, states, expected))
        for rel in quantized:
            planner.inputs[rel] = TensorRef(name, rel)
        return
    name, weights = planner.base_weights(base, f"the run held {len(quantized)} base weights in 4-bit (QLoRA)")
    available = set(weights.keys())
    missing = []
    for rel in quantized:
        key = base_key(rel, layout.adapter_name) if layout is not None else rel
        if key not in available or weights.info(key).shape != expected.get(rel):
            missing.append(rel)
            continue
        planner.inputs[rel] = TensorRef(name, key)
    if missing:
        raise ConvertError(
            f"{planner.where}: {len(missing)} 4-bit weights have no full-precision counterpart in {base.path} "
            f"({preview(missing, 3)}); pass --base {planner.comp.name}=PATH with the model the run quantized, or "
            "--qlora-base dequantized"
        )


__all__ = ["AUTO_CLASS", "PartPlanner"]
