"""PEFT's own model, used three ways: described on the meta device (for planning), built unmerged (the full
engine), and merged (``merge_and_unload``, or one adapted module at a time in the streaming engine).

The merge units are found in the model PEFT builds, never in a list of ours: every outermost tuner layer
(``BaseTunerLayer``) is one unit, merged by the call ``merge_and_unload`` makes for it (its
``unload_and_optionally_merge_module`` where it has one, as nested parameter wrappers do, else its ``merge``), and it
writes the parameters of the module it wraps.

Most tuners are built on the meta device: no memory. A tuner whose initialisation computes with values (BOFT,
SHiRA, UniLoRA) or that creates state it never saves (VeRA's projections with ``save_projection=False``,
FourierFT's spectral indices, both from a PRNG seed in the config) is built as PEFT builds it for training, on the
CPU, around a base whose weights are allocated but never written; its parameters then go to the meta device and
what PEFT created without saving stays, as PEFT would recreate it when loading the adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConvertError, preview
from . import registry
from .config import library_warnings_to_log
from .keys import PEFT_PREFIX, describe_unfit, plain_module

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UnitShape:
    """One merge unit as the model PEFT builds has it (no sources yet)."""

    module: str  # the plain module path whose parameters the merge writes
    path: str  # the outermost tuner layer's path in the PEFT model
    names: tuple[str, ...]  # the layer's state_dict names (its adapter state and the wrapped module's weights)
    outputs: tuple[str, ...]  # plain keys of the wrapped module's own parameters
    probe: bool = False  # a Linear, Conv1D or Embedding: the streaming engine can check its output


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the model a config builds holds, known without memory (built on the meta device)."""

    plain: dict[str, tuple[int, ...]]  # the plain model's state_dict: key -> shape
    embed_key: str | None  # the input embeddings' weight key
    head_key: str | None  # the output embeddings' weight key
    peft: dict[str, tuple[int, ...]] | None = None  # the PEFT model's state_dict, when a PEFT config is given
    units: tuple[UnitShape, ...] = ()
    vocab_resized: int | None = None  # the embeddings' rows, when the config was edited to them
    aliases: frozenset[str] = frozenset()  # layers' keys of state the tuner shares between layers (one tensor)
    unsaved_state: bool = False  # PEFT creates state it does not save (built on the CPU; see the module's doc)
    meta_model: Any = dataclasses.field(default=None, compare=False, repr=False)  # the PEFT model on the meta device


def construction_config(config: Any) -> Any:
    """The config to build the model with: a data-driven initialisation (PiSSA, OLoRA, EVA, LoftQ, ...: a string in
    ``init_lora_weights``/``init_weights``) replaced by the default one. It only decides starting values, which the
    checkpoint's tensors replace, and would compute SVDs of weights that are not loaded yet."""
    built = copy.deepcopy(config)
    for f in dataclasses.fields(built):
        if f.name in ("init_lora_weights", "init_weights") and isinstance(getattr(built, f.name), str):
            setattr(built, f.name, f.default if f.default is not dataclasses.MISSING else True)
    return built


def _embedding_keys(model: nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    key = lambda m: f"{names[id(m)]}.weight" if m is not None and id(m) in names else None  # noqa: E731
    return key(inp), key(out)


def _build_base(auto_class: str, config: Any, where: str, **kwargs: Any) -> nn.Module:
    import transformers

    try:
        return getattr(transformers, auto_class).from_config(config, **kwargs)
    except (ValueError, KeyError) as exc:  # e.g. a vision config given to a causal LM component
        raise ConvertError(
            f"{where}: {auto_class} cannot build a model from the base config ({type(config).__name__}: "
            f"{str(exc).splitlines()[0][:160]}); check the component's kind in the layout config, or pass --base"
        ) from exc


def _wrap(model: nn.Module, config: Any, adapter_name: str, where: str) -> nn.Module:
    from peft import PeftModel

    try:
        return PeftModel(model, construction_config(config), adapter_name=adapter_name)
    except Exception as exc:  # PEFT applying the adapter's config is the last step of reading it: untrusted
        said = f"{type(exc).__name__}: {str(exc).split('. ')[0][:160].rstrip('.')}"
        # PEFT computing its initialisation failed (an SVD that does not converge): a RuntimeError of torch's.
        if isinstance(exc, RuntimeError) and not isinstance(exc, NotImplementedError):
            title = registry.tuner(config.peft_type).title
            raise ConvertError(
                f"{where}: PEFT cannot rebuild the {title} adapter around the base model ({said}); its "
                "initialisation computes with the base weights, which a conversion does not have before it merges; "
                "serve it with PEFT instead (PeftModel.from_pretrained on the base model)"
            ) from exc
        # e.g. target modules that match nothing in this model, or a value PEFT does not implement (bias "oone")
        targets = getattr(config, "target_modules", None)
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        raise ConvertError(
            f"{where}: PEFT cannot apply the adapter's config to the base model ({said}; target_modules "
            f"{targets}); the adapter_config.json is damaged or belongs to another model: pass --adapter-dir with "
            "the run's own"
        ) from exc


def _unsaved_state(peft: nn.Module) -> bool:
    """Whether PEFT created adapter state that no state_dict holds (non-persistent buffers, tensors kept as plain
    attributes): built on the meta device it would have no values."""
    persistent = set(peft.state_dict(keep_vars=True))
    for path, layer in _tuner_layers(peft).items():
        for name, _ in layer.named_buffers():
            if not name.startswith("base_layer.") and f"{path}.{name}" not in persistent:
                return True
        for attr, value in vars(layer).items():
            values = value.values() if isinstance(value, dict) else [value]
            if not attr.startswith("_") and any(isinstance(v, torch.Tensor) for v in values):
                return True
    for child_name, child in peft.base_model.named_children():  # state the tuner keeps for all its layers
        if child_name != "model" and any(
            f"base_model.{child_name}.{name}" not in persistent for name, _ in child.named_buffers()
        ):
            return True
    return False


def release(model: nn.Module) -> None:
    """Every parameter and persistent buffer to the meta device, freeing their memory (the sources supply them);
    what PEFT created without saving it stays where it is."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to("meta")


def _wrap_on_cpu(auto_class: str, hf_config: Any, config: Any, adapter_name: str, where: str) -> nn.Module:
    """The PEFT model built as for training, around a base whose weights are allocated and never written; if PEFT's
    initialisation computes with them (an SVD: TinyLoRA), around zeros. Its parameters then go to the meta device."""
    from transformers.initialization import no_init_weights

    with library_warnings_to_log(), torch.device("cpu"):
        with no_init_weights():
            base = _build_base(auto_class, copy.deepcopy(hf_config), where, dtype=torch.float32)
        try:
            peft = _wrap(base, config, adapter_name, where)
        except ConvertError:
            with no_init_weights():
                base = _build_base(auto_class, copy.deepcopy(hf_config), where, dtype=torch.float32)
            _zero(base)
            peft = _wrap(base, config, adapter_name, where)
    release(peft)
    return peft


def _zero(model: nn.Module) -> None:
    """Weights allocated but not initialised hold whatever memory held (NaN, say): zeros instead. (Buffers, such as
    rotary frequencies, are computed at construction: kept.)"""
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point():
                tensor.zero_()


def _aliases(peft: nn.Module) -> frozenset[str]:
    """Layers' keys whose tensor is state the tuner keeps once for all layers (VBLoRA's vector bank, TinyLoRA's
    vectors): the same tensor under the tuner and under each layer."""
    state = peft.state_dict(keep_vars=True)
    shared = {id(t) for k, t in state.items() if not k.startswith("base_model.model.")}
    return frozenset(k for k, t in state.items() if k.startswith("base_model.model.") and id(t) in shared)


def describe_model(
    auto_class: str,
    hf_config: Any,
    config: Any = None,
    adapter_name: str = "default",
    embedding_rows: Callable[[str], int | None] | None = None,
    where: str = "",
    base_model: nn.Module | None = None,
) -> ModelShape:
    """Build the model (and its PEFT wrapping) on the meta device and read its keys, shapes and merge units.

    ``embedding_rows(key)``: the rows the checkpoint holds for the input embeddings (None: not in it). When they
    differ from the config's ``vocab_size`` (tokens added in training), ``hf_config`` is edited to the checkpoint's
    count and the model built again, so that the export's config fits its weights.
    """
    with library_warnings_to_log(), torch.device("meta"):
        model = base_model if base_model is not None else _build_base(auto_class, copy.deepcopy(hf_config), where)
        embed, head = _embedding_keys(model)
        text = hf_config.get_text_config()
        rows = embedding_rows(embed) if embedding_rows is not None and embed is not None else None
        resized = None
        if rows is not None and hasattr(text, "vocab_size") and rows != text.vocab_size:
            log.warning(
                "the checkpoint's embeddings have %d rows, the base config says vocab_size %d; writing vocab_size %d",
                rows,
                text.vocab_size,
                rows,
            )
            text.vocab_size = rows
            resized = rows
            model = _build_base(auto_class, copy.deepcopy(hf_config), where)
        plain = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        if config is None:
            return ModelShape(plain, embed, head, vocab_resized=resized)
        try:
            peft = _wrap_on_meta(model, config, adapter_name)
        except Exception:  # noqa: BLE001 - an initialisation that computes with values: built on the CPU below
            peft = None
    unsaved = peft is None or _unsaved_state(peft)
    if unsaved:
        peft = _wrap_on_cpu(auto_class, hf_config, config, adapter_name, where)
    units = merge_units(peft)
    shapes = {k: tuple(t.shape) for k, t in peft.state_dict().items()}
    return ModelShape(plain, embed, head, shapes, units, resized, _aliases(peft), unsaved, peft.eval())


def _wrap_on_meta(model: nn.Module, config: Any, adapter_name: str) -> nn.Module:
    """PEFT's model around ``model`` on the meta device (call under ``torch.device("meta")``)."""
    from peft import PeftModel

    return PeftModel(model, construction_config(config), adapter_name=adapter_name)


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def merge_units(peft: nn.Module) -> tuple[UnitShape, ...]:
    """The outermost tuner layers of a PEFT model, in model order, as merge units."""
    layers = _tuner_layers(peft)
    units = []
    for path, layer in layers.items():
        if any(path.startswith(other + ".") for other in layers if other != path):
            continue  # inside another tuner layer: merged with it
        base = layer.get_base_layer()
        module = plain_module(path.removeprefix(PEFT_PREFIX))
        persistent = layer.state_dict(keep_vars=True)
        outputs = tuple(f"{module}.{p}" for p in base.state_dict(keep_vars=True) if "." not in p)
        probe = isinstance(base, (nn.Linear, nn.Embedding)) or type(base).__name__ == "Conv1D"
        units.append(UnitShape(module, path, tuple(persistent), outputs, probe))
    return tuple(units)


def build_peft_model(
    auto_class: str,
    hf_config: Any,
    config: Any,
    adapter_name: str,
    device: torch.device | str,
    where: str = "",
    base_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
) -> nn.Module:
    """The unmerged PEFT model in float32 on ``device``, built as PEFT builds it for training: the base model first
    (``base_weights()``: its plain state as ``(key, tensor)`` pairs, read one at a time; else zeros), then PEFT's
    wrapping, whose initialisation may compute with those weights (PSOFT's SVD) or draw from a CPU generator
    (VeRA's and FourierFT's PRNG key). Built on the CPU, as a training script builds it, then moved to ``device``:
    an SVD on a GPU may choose other signs, and a CPU generator cannot fill a GPU tensor. The caller then loads the
    PEFT model's own state."""
    from transformers.initialization import no_init_weights

    hf_config = copy.deepcopy(hf_config)  # merge_and_unload edits the model's config (tie_word_embeddings)
    with library_warnings_to_log(), torch.device("cpu"):
        with no_init_weights():
            base = _build_base(auto_class, hf_config, where, dtype=torch.float32)
        _zero(base)
        if base_weights is not None:
            params = base.state_dict()
            with torch.no_grad():
                for key, tensor in base_weights():
                    params[key].copy_(tensor)
        model = _wrap(base, config, adapter_name, where)
    return model.to(device).eval()


def _refused(exc: Exception, config: Any, where: str) -> ConvertError:
    title = registry.tuner(config.peft_type).title
    return ConvertError(
        f"{where}: PEFT cannot merge this {title} adapter ({type(exc).__name__}: {str(exc).split('. ')[0][:200]}); "
        "serve it with PEFT instead (PeftModel.from_pretrained on the base model)"
    )


def merge_and_unload(model: nn.Module, progress: bool, where: str = "") -> nn.Module:
    """PEFT's merge_and_unload: every tuner as PEFT defines it."""
    try:
        with library_warnings_to_log(), torch.no_grad():
            return model.merge_and_unload(progressbar=progress)
    except (NotImplementedError, ValueError, TypeError, AttributeError) as exc:  # PEFT refusing this adapter's merge
        raise _refused(exc, model.peft_config[model.active_adapter], where) from exc


def merge_unit(layer: nn.Module, adapter_name: str, config: Any, where: str = "") -> None:
    """One unit merged by the call PEFT's merge_and_unload makes for it."""
    try:
        with library_warnings_to_log(), torch.no_grad():
            if hasattr(layer, "unload_and_optionally_merge_module"):
                layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=[adapter_name])
            else:
                layer.merge(adapter_names=[adapter_name])
    except (NotImplementedError, ValueError, TypeError, AttributeError) as exc:
        raise _refused(exc, config, where) from exc


def check_peft_fit(
    expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], where: str, hint: str
) -> None:
    """The PEFT model the adapter's config builds must hold exactly the component's tensors, with their shapes."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ConvertError(
            f"{where}: the checkpoint does not fit the model built from its config: "
            f"{describe_unfit(missing, unexpected)}; {hint}"
        )
    wrong = [f"{k} {given[k]} vs {expected[k]}" for k in sorted(given) if given[k] != expected[k]]
    if wrong:
        raise ConvertError(
            f"{where}: {len(wrong)} tensors have other shapes than the config gives: {preview(wrong, 2)}; {hint}"
        )
