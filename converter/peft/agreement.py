"""Whether the checkpoint and the adapter folder hold the same adapter: paired by PEFT's own naming, compared by value.

The folder's keys are mapped onto the PEFT model's keys exactly as PEFT loads an adapter folder
(``set_peft_model_state_dict``: the modules_to_save wrappers' load maps, then the tuner's own
``_remap_adapter_state_dict_for_load``), so the pairing holds for every tuner. What training changes (adapter state,
trained copies, shared tuner state) is compared; frozen layers PEFT saves beside an adapter (resized embeddings, the
base layers of embedding LoRA) are expected extras. A tuner whose save transforms its tensors (AdaLoRA keeps only
the ranks its allocation chose) is compared through PEFT's own save of the checkpoint's tensors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConvertError, preview
from ..names import ADAPTER, CHECKPOINT
from ..sources import Sources, TensorInfo, TensorRef
from .config import library_warnings_to_log
from .keys import SAVED, is_trained_state


@dataclasses.dataclass(frozen=True)
class Pairing:
    """The checkpoint's adapter tensors matched with the adapter folder's by meaning (no data read)."""

    pairs: tuple[tuple[str, str], ...]  # (adapter folder key, component-relative checkpoint key), same shapes
    only_checkpoint: tuple[str, ...]  # checkpoint keys of trained state the folder lacks
    only_adapter: tuple[str, ...]
    reshaped: tuple[str, ...]  # "key (checkpoint shape) vs (adapter shape)": trained for another base model
    saved_beside: tuple[str, ...] = ()  # adapter folder keys of frozen layers saved with the adapter
    transformed: tuple[tuple[str, str], ...] = ()  # pairs PEFT reshapes when it saves (AdaLoRA's rank allocation)

    @property
    def keys(self) -> int:
        return len(self.pairs) + len(self.transformed) + len(self.reshaped) + len(self.only_adapter)


CONSUMED = "<loaded by PEFT outside the state_dict>"


def load_map(
    meta_model: Any, config: Any, adapter_name: str, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, str], Any]:
    """Folder key -> the PEFT model key PEFT loads it into (``shapes``: the folder's keys and shapes), and the model
    as PEFT shapes it for the folder (a copy: AdaLoRA's load resizes its modules to the saved ranks)."""
    try:
        return _load_map(copy.deepcopy(meta_model), config, adapter_name, shapes)
    except (NotImplementedError, RuntimeError):  # the load computes with the adapter's values: give it some
        model = copy.deepcopy(meta_model)
        for name, param in list(model.named_parameters()):
            if is_trained_state(name, adapter_name):
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                module._parameters[leaf] = torch.nn.Parameter(torch.zeros(param.shape), requires_grad=False)
        return _load_map(model, config, adapter_name, shapes)


def shape_like_folder(model: Any, config: Any, adapter_name: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Shape a built model as PEFT does when it loads an adapter folder (AdaLoRA keeps only the saved ranks)."""
    if shapes:
        _load_map(model, config, adapter_name, shapes)


def _load_map(model: Any, config: Any, adapter_name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, Any]:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.other import AuxiliaryTrainingWrapper

    tags = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}  # followed by identity
    owner = {id(t): k for k, t in tags.items()}
    state = dict(tags)
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for lookup, store in module.adapter_state_dict_load_map(adapter_name).items():
                if f"{name}.{lookup}" in state:
                    state[f"{name}.{store}"] = state.pop(f"{name}.{lookup}")
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    with library_warnings_to_log():
        remapped = tuner._remap_adapter_state_dict_for_load(
            model=model, config=model.peft_config[adapter_name], adapter_name=adapter_name, state_dict=state
        )
    found = {k: CONSUMED for k in tags}  # what PEFT's load took out of the state dict (SHiRA's indices)
    for model_key, value in remapped.items():
        folder_key = owner.get(id(value))
        if folder_key is not None:
            found[folder_key] = model_key
    return found, model


def pair_sources(
    infos: Mapping[str, TensorInfo],
    folder_infos: Mapping[str, TensorInfo],
    folder_keys: Mapping[str, str],
    meta_model: Any,
    config: Any,
    adapter_name: str,
    aliases: frozenset[str] = frozenset(),
) -> tuple[Pairing, Any]:
    """Pair the component's tensors (``infos``: component-relative key -> info) with the adapter folder's
    (``folder_keys``: the folder's keys of this component as the component names them -> as the folder does;
    ``folder_infos`` by the folder's names; ``aliases``: layers' keys of state shared between layers, which PEFT saves
    once). Returns the pairing and the model as PEFT shapes it for the folder."""
    shapes = {name: folder_infos[akey].shape for name, akey in folder_keys.items()}
    mapping, folder_model = load_map(meta_model, config, adapter_name, shapes)
    shaped = {k: tuple(t.shape) for k, t in folder_model.state_dict().items()}
    pairs, transformed, reshaped, only_adapter, beside = [], [], [], [], []
    paired: set[str] = set()
    for name, akey in sorted(folder_keys.items()):
        model_key = mapping.get(name, name)
        adapter_shape = folder_infos[akey].shape
        if model_key == CONSUMED:  # state PEFT rebuilds from the config and restores from the folder as it loads
            beside.append(akey)
            continue
        if model_key in infos and is_trained_state(model_key, adapter_name):
            paired.add(model_key)
            if infos[model_key].shape == adapter_shape:
                pairs.append((akey, model_key))
            elif shaped.get(model_key) == adapter_shape:
                transformed.append((akey, model_key))
            else:
                reshaped.append(f"{akey} {infos[model_key].shape} vs {adapter_shape}")
        elif model_key in infos or _saved_copy(name, adapter_name) in infos:
            beside.append(akey)  # a frozen layer, or a second copy of a trained one, saved by PEFT with the adapter
        else:
            only_adapter.append(akey)
    # Trained state PEFT's load map leaves out (a tied lm_head's trainable tokens, loaded through the embeddings'):
    # paired by PEFT's own naming rule, the adapter name removed.
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key as saved_name

    trained = {k for k in infos if is_trained_state(k, adapter_name) and k not in aliases}
    for rel in sorted(trained - paired):
        akey = folder_keys.get(saved_name(rel, adapter_name))
        if akey in only_adapter and infos[rel].shape == folder_infos[akey].shape:
            only_adapter.remove(akey)
            pairs.append((akey, rel))
            paired.add(rel)
    only_checkpoint = sorted(trained - paired)
    pairing = Pairing(
        tuple(pairs),
        tuple(only_checkpoint),
        tuple(only_adapter),
        tuple(reshaped),
        tuple(beside),
        tuple(transformed),
    )
    return pairing, folder_model


def _saved_copy(name: str, adapter_name: str) -> str | None:
    """``X.modules_to_save.P`` (how PEFT names the trained copy when it saves a whole embedding layer) as the
    checkpoint names it: ``X.modules_to_save.<adapter>.P``."""
    parts = name.split(".")
    if SAVED not in parts:
        return None
    i = parts.index(SAVED)
    return ".".join([*parts[: i + 1], adapter_name, *parts[i + 1 :]])


@dataclasses.dataclass(frozen=True)
class SourceComparison:
    """The two sources compared by value (``equal``: every paired tensor equal and no unpaired key)."""

    equal: bool
    keys: int
    max_abs_diff: float
    differing: tuple[str, ...]
    only_checkpoint: tuple[str, ...]
    only_adapter: tuple[str, ...]
    reshaped: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "equal": self.equal,
            "keys": self.keys,
            "max_abs_diff": self.max_abs_diff,
            "differing_tensors": len(self.differing),
            "only_in_checkpoint": len(self.only_checkpoint),
            "only_in_adapter": len(self.only_adapter),
            "other_shapes": len(self.reshaped),
        }


def compare_sources(
    pairing: Pairing, keys: Mapping[str, str], sources: Sources, saved_view: Any = None
) -> SourceComparison:
    """Compare each paired tensor by value (``keys``: component-relative key -> the checkpoint's key).
    ``saved_view(model keys) -> {folder key: tensor}``: PEFT's save of the checkpoint's tensors, for the pairs PEFT
    transforms when it saves."""
    differing, max_diff = [k.split(" ", 1)[0] for k in pairing.reshaped], 0.0  # "key (shape) vs (shape)"
    for akey, rel in pairing.pairs:
        equal, diff = sources.equal(TensorRef(CHECKPOINT, keys[rel]), TensorRef(ADAPTER, akey))
        if not equal:
            differing.append(akey)
            max_diff = max(max_diff, diff)
    if pairing.transformed:
        view = saved_view([rel for _, rel in pairing.transformed])
        for akey, _ in pairing.transformed:
            ours, theirs = view.get(akey), sources.read(TensorRef(ADAPTER, akey))
            if ours is None or ours.shape != theirs.shape or not bool((ours.to(theirs.dtype) == theirs).all()):
                differing.append(akey)
                if ours is not None and ours.shape == theirs.shape:
                    max_diff = max(max_diff, float((ours.float() - theirs.float()).abs().max(initial=0.0)))
    equal = not differing and not pairing.only_checkpoint and not pairing.only_adapter
    return SourceComparison(
        equal,
        pairing.keys,
        max_diff,
        tuple(differing),
        pairing.only_checkpoint,
        pairing.only_adapter,
        pairing.reshaped,
    )


def peft_saved_view(meta_model: Any, adapter_name: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """What PEFT's ``save_pretrained`` would write from these tensors (model key -> tensor), named as PEFT names
    them in an adapter folder."""
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(meta_model)  # PEFT's save edits the config it saves (AdaLoRA's rank pattern)
    with library_warnings_to_log():
        return get_peft_model_state_dict(
            model, state_dict=dict(state), adapter_name=adapter_name, save_embedding_layers=False
        )


def require_agreement(comparison: SourceComparison, lora_from: str, adapter: str, checkpoint: str) -> None:
    """With ``--lora-from auto`` the two sources must agree; say by how much they do not, and how to choose."""
    if comparison.equal or lora_from != "auto":
        return
    what = []
    if comparison.differing:
        what.append(
            f"{len(comparison.differing)} of {comparison.keys} tensors differ, max abs diff "
            f"{comparison.max_abs_diff:.3g}"
        )
    if comparison.only_checkpoint or comparison.only_adapter:
        what.append(
            f"{len(comparison.only_checkpoint)} keys only in the checkpoint, "
            f"{len(comparison.only_adapter)} only in the adapter folder"
        )
    raise ConvertError(
        f"{adapter} and {checkpoint} hold different adapter weights ({'; '.join(what)}); the adapter folder was "
        "probably saved at another step; choose one with --lora-from checkpoint or --lora-from adapter"
    )


def refuse_reshaped(pairing: Pairing, adapter: str, checkpoint: str) -> None:
    """An adapter whose tensors have other shapes (that PEFT's own save does not explain) was trained for another
    base model."""
    if pairing.reshaped:
        raise ConvertError(
            f"{adapter} does not fit the model in {checkpoint}: {len(pairing.reshaped)} tensors have other shapes "
            f"({preview(list(pairing.reshaped), 2)}); the adapter was trained for another base model; use "
            "--lora-from checkpoint or the run's own adapter folder"
        )
