"""The adapter's share of a conversion plan: which PEFT model to rebuild, where each of its tensors is read, and
the merge units the engines execute. Decided from metadata alone (``plan_adapter``); the comparison of the two
sources by value is filled in before writing (``settle``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, preview
from ..names import ADAPTER, CHECKPOINT
from ..sources import TensorInfo, TensorRef
from . import registry
from .agreement import Pairing, SourceComparison, pair_sources, refuse_reshaped
from .config import parameters
from .keys import BASE_LAYER, PeftLayout, is_trained_state
from .model import ModelShape, UnitShape, check_peft_fit, merge_units
from .rebuilt import base_dependent_units


@dataclasses.dataclass(frozen=True)
class MergeUnit:
    """One outermost tuner layer to merge: its state (as the layer names it) and the plain parameters it writes."""

    module: str  # plain module path, e.g. model.layers.0.self_attn.q_proj
    path: str  # where the layer sits in the PEFT model, e.g. base_model.model.model.layers.0.self_attn.q_proj
    inputs: tuple[tuple[str, TensorRef], ...]  # the layer's state name -> source tensor
    outputs: tuple[str, ...]  # plain keys written from it (module.weight, module.bias)
    input_dtypes: tuple[torch.dtype, ...] = ()  # the dtypes its inputs are stored in
    probe: bool = False  # its output can be checked on a random input (Linear, Conv1D, Embedding)

    def base_input(self, param: str) -> TensorRef | None:
        """Where the wrapped module's parameter ``param`` (``weight``) is read, before the merge."""
        for name, ref in self.inputs:
            parts = name.split(".")
            if parts[-1] == param and all(seg == BASE_LAYER for seg in parts[:-1]) and len(parts) > 1:
                return ref
        return None


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """The adapter merged into a part."""

    adapter_name: str
    peft_type: str
    config: Any  # the PEFT config (LoraConfig, LoHaConfig, ...)
    config_from: str  # "adapter_config.json", "hyper_parameters.<path>" or "hyper_parameters (lora_r, lora_alpha)"
    tensors_from: str  # "checkpoint" or "adapter"
    units: tuple[MergeUnit, ...]
    layout: PeftLayout
    adapter_folder: Path | None = None  # the weights file of the adapter folder, if the run has one
    pairing: Pairing | None = None  # checkpoint vs adapter folder by key (None: no adapter folder)
    comparison: SourceComparison | None = None  # by value: filled in by ``settle``
    idle: tuple[str, ...] = ()  # units whose merge changed nothing: filled in by the engines
    unsaved_state: bool = False  # PEFT creates state it does not save: rebuilt as for training (the full engine)
    base_dependent: (
        tuple[str, ...] | None
    ) = ()  # units whose merge reads that state's base-derived part (None: untested)
    folder_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # --lora-from adapter: what PEFT shapes the model for
    meta_model: Any = dataclasses.field(default=None, compare=False, repr=False)  # PEFT's model on the meta device

    @property
    def title(self) -> str:
        return registry.tuner(self.peft_type).title

    def facts(self) -> dict[str, Any]:
        """What the manifest records about the adapter."""
        return {
            "name": self.adapter_name,
            "peft_type": self.peft_type,
            "tuner": self.title,
            "parameters": parameters(self.config),
            "config_from": self.config_from,
            "tensors_from": self.tensors_from,
            "adapted_modules": len(self.units),
            "idle_modules": len(self.idle),
            "trainable_token_modules": list(self.layout.token_modules),
            "legacy_peft_names": self.layout.legacy,
            "sources_compared": self.comparison.as_dict() if self.comparison is not None else None,
        }


@dataclasses.dataclass(frozen=True)
class AdapterInputs:
    """What ``plan_adapter`` is given: the component's tensors as the planner sees them."""

    where: str
    layout: PeftLayout
    config: Any
    config_from: str
    shape: ModelShape
    inputs: Mapping[str, TensorRef]  # component-relative key -> where it is read
    info: Callable[[TensorRef], TensorInfo]
    skip: frozenset[str] = frozenset()  # keys the fit check leaves out (4-bit quantization state)
    folder: Any = None  # the run's AdapterFolder
    folder_keys: Mapping[str, str] | None = None  # this component's folder keys: component naming -> folder naming
    lora_from: str = "auto"
    checkpoint: str = ""
    auto_class: str = ""  # with ``hf_config``: to test whether the merge reads base-dependent state (``rebuilt``)
    hf_config: Any = None


def plan_adapter(given: AdapterInputs) -> tuple[AdapterPlan, dict[str, TensorRef]]:
    """The adapter plan and the component's inputs (some read from the adapter folder with ``--lora-from
    adapter``)."""
    inputs = dict(given.inputs)
    given_shapes = {rel: given.info(ref).shape for rel, ref in inputs.items() if rel not in given.skip}
    lacking = sorted(
        k for k in set(given.shape.peft) - set(given_shapes) if is_trained_state(k, given.layout.adapter_name)
    )
    if lacking:
        raise ConvertError(
            f"{given.where}: {len(lacking)} adapter tensors the config describes are not in the checkpoint "
            f"({preview(lacking, 3)}); the checkpoint is damaged or was edited; re-save it from the training run"
        )
    hint = "check that the base config matches the trained model (--base)"
    check_peft_fit(given.shape.peft, given_shapes, given.where, hint)
    units, model = given.shape.units, given.shape.meta_model
    pairing, tensors_from = None, CHECKPOINT
    folder = given.folder
    if folder is not None:
        infos = {rel: given.info(ref) for rel, ref in inputs.items()}
        folder_infos = {k: folder.source.info(k) for k in given.folder_keys.values()}
        pairing, folder_model = pair_sources(
            infos, folder_infos, given.folder_keys, model, given.config, given.layout.adapter_name, given.shape.aliases
        )
        if given.lora_from != "checkpoint":
            refuse_reshaped(pairing, str(folder.weights_path), given.checkpoint)
        if given.lora_from == "adapter":
            inputs, units, model = _from_folder(given, pairing, folder_model, inputs)
            tensors_from = ADAPTER
    elif given.lora_from == "adapter":
        raise ConvertError(f"{given.where}: --lora-from adapter, but there is no adapter folder (lora_weights/)")
    planned = tuple(_unit(u, inputs, given) for u in units)
    plan = AdapterPlan(
        adapter_name=given.layout.adapter_name,
        peft_type=registry.tuner(given.config.peft_type).peft_type,
        config=given.config,
        config_from=given.config_from,
        tensors_from=tensors_from,
        units=planned,
        layout=given.layout,
        adapter_folder=folder.weights_path if folder is not None else None,
        pairing=pairing,
        unsaved_state=given.shape.unsaved_state,
        base_dependent=_base_dependent(given, units),
        folder_shapes=tuple((name, folder.source.info(akey).shape) for name, akey in (given.folder_keys or {}).items())
        if tensors_from == ADAPTER
        else (),
        meta_model=model,
    )
    return plan, inputs


def _base_dependent(given: AdapterInputs, units: tuple[UnitShape, ...]) -> tuple[str, ...] | None:
    if not given.shape.unsaved_state:
        return ()
    nbytes = 4 * sum(math.prod(s) for s in given.shape.plain.values())
    return base_dependent_units(given.auto_class, given.hf_config, given.config, given.layout.adapter_name, units,
                                nbytes, given.where)  # fmt: skip


def _from_folder(
    given: AdapterInputs, pairing: Pairing, folder_model: Any, inputs: dict[str, TensorRef]
) -> tuple[dict[str, TensorRef], tuple[UnitShape, ...], Any]:
    """``--lora-from adapter``: the adapter's tensors from the folder, into the model as PEFT shapes it for them."""
    if pairing.only_adapter:
        raise ConvertError(
            f"{given.folder.weights_path}: {len(pairing.only_adapter)} adapter tensors have no place in the "
            f"checkpoint's model ({preview(list(pairing.only_adapter), 3)}); the adapter belongs to another model"
        )
    for akey, rel in (*pairing.pairs, *pairing.transformed):
        inputs[rel] = TensorRef(ADAPTER, akey)
    shapes = {k: tuple(t.shape) for k, t in folder_model.state_dict().items()}
    given_shapes = {rel: given.info(ref).shape for rel, ref in inputs.items() if rel not in given.skip}
    check_peft_fit(shapes, given_shapes, given.where, "the adapter folder does not fit the checkpoint's model")
    return inputs, merge_units(folder_model), folder_model


def _unit(unit: UnitShape, inputs: Mapping[str, TensorRef], given: AdapterInputs) -> MergeUnit:
    refs = []
    for name in unit.names:
        rel = f"{unit.path}.{name}"
        if rel not in inputs:
            raise ConvertError(f"{given.where}: {rel} is needed to merge {unit.module} but is in no source")
        refs.append((name, inputs[rel]))
    dtypes = tuple(sorted({given.info(ref).dtype for _, ref in refs}, key=str))
    return MergeUnit(unit.module, unit.path, tuple(refs), unit.outputs, dtypes, unit.probe)
