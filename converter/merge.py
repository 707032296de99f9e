"""PEFT's own code, used three ways: to describe a model from its config (on the meta device, for planning), to
build the unmerged model (the full engine), and to merge (``merge_and_unload``, or a LoRA layer's ``merge()`` in
the streaming engine). Scaling, rsLoRA, rank/alpha patterns, DoRA and fan_in_fan_out behave exactly as in PEFT."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConvertError
from .keymap import PEFT_PREFIX, TOKEN_ADAPTER

log = logging.getLogger(__name__)


@contextlib.contextmanager
def library_warnings_to_log():
    """What PEFT and transformers warn about while ckpt2hf drives them goes to the debug log, not to the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("PEFT/transformers: %s", w.message)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the model a config builds holds, known without memory (built on the meta device)."""

    plain: dict[str, tuple[int, ...]]  # the plain model's state_dict: key -> shape
    embed_key: str | None  # the input embeddings' weight key
    head_key: str | None  # the output embeddings' weight key
    peft: dict[str, tuple[int, ...]] | None  # the PEFT model's state_dict, when a LoraConfig is given
    layers: dict[str, tuple[str, tuple[str, ...]]]  # merged module -> (its PEFT layer's path, state_dict names)
    vocab_resized: int | None = None  # the embeddings' rows, when the config was edited to them


def _embedding_keys(model: nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    key = lambda m: f"{names[id(m)]}.weight" if m is not None and id(m) in names else None  # noqa: E731
    return key(inp), key(out)


def describe_model(
    auto_class: str,
    hf_config: Any,
    lora_config: Any = None,
    adapter_name: str = "default",
    merged: tuple[str, ...] = (),
    embedding_rows: Callable[[str], int | None] | None = None,
    where: str = "",
) -> ModelShape:
    """Build the model (and its PEFT wrapping) on the meta device and read its keys and shapes.

    ``embedding_rows(key)``: the rows the checkpoint holds for the input embeddings (None: not in it). When they
    differ from the config's ``vocab_size`` (tokens added in training), ``hf_config`` is edited to the checkpoint's
    count and the model built again, so that the export's config fits its weights.
    """
    import transformers
    from peft import PeftModel

    def build(config: Any) -> nn.Module:
        try:
            return getattr(transformers, auto_class).from_config(config)
        except (ValueError, KeyError) as exc:  # e.g. a vision config given to a causal LM component
            raise ConvertError(
                f"{where}: {auto_class} cannot build a model from the base config ({type(config).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); check the component's kind in the layout config, or pass --base"
            ) from exc

    with library_warnings_to_log(), torch.device("meta"):
        model = build(copy.deepcopy(hf_config))
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
            model = build(copy.deepcopy(hf_config))
        plain = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        if lora_config is None:
            return ModelShape(plain, embed, head, None, {}, resized)
        try:
            peft = PeftModel(model, copy.deepcopy(lora_config), adapter_name=adapter_name)
        except Exception as exc:  # PEFT applying the adapter's config is the last step of reading it: untrusted
            # e.g. target modules that match nothing in this model, or a value PEFT does not implement (bias "oone")
            targets = lora_config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            said = f"{type(exc).__name__}: {str(exc).split('. ')[0][:160].rstrip('.')}"
            raise ConvertError(
                f"{where}: PEFT cannot apply the adapter's config to the base model ({said}; target_modules "
                f"{targets}); the adapter_config.json is damaged or belongs to another model: pass --adapter-dir with "
                "the run's own"
            ) from exc
    layers = {}
    for module in merged:
        found = _layer(peft, module)
        if found is not None:
            layers[module] = (found[0], tuple(found[1].state_dict()))
    shapes = {k: tuple(t.shape) for k, t in peft.state_dict().items()}
    _keep_meta(_meta_key(auto_class, hf_config, lora_config, adapter_name), peft)
    return ModelShape(plain, embed, head, shapes, layers, resized)


# The meta-device PEFT model ``describe_model`` built while planning, kept for the streaming engine, which needs
# exactly that model (wrapping a model of hundreds of layers takes PEFT a noticeable part of a second). Taken once.
_META: dict[str, nn.Module] = {}
_META_KEEP = 4


def _meta_key(auto_class: str, hf_config: Any, lora_config: Any, adapter_name: str) -> str:
    return "\n".join((auto_class, hf_config.to_json_string(), repr(lora_config), adapter_name))


def _keep_meta(key: str, model: nn.Module) -> None:
    _META[key] = model.eval()
    while len(_META) > _META_KEEP:
        _META.pop(next(iter(_META)))


def _layer(peft: nn.Module, module: str) -> tuple[str, nn.Module] | None:
    """The PEFT layer that merges into ``module`` and its path: a LoRA layer, or a wrapper's token adapter."""
    path = PEFT_PREFIX + module
    try:
        layer = peft.get_submodule(path)
    except AttributeError:
        return None
    if hasattr(layer, TOKEN_ADAPTER):
        return f"{path}.{TOKEN_ADAPTER}", getattr(layer, TOKEN_ADAPTER)
    return path, layer


def build_peft_model(
    auto_class: str, hf_config: Any, lora_config: Any, adapter_name: str, device: torch.device | str
) -> nn.Module:
    """The unmerged PEFT model in float32 on ``device``, its parameters allocated but not initialised (to be
    loaded). On the meta device it allocates nothing (the streaming engine materialises one layer at a time)."""
    import transformers
    from peft import PeftModel
    from transformers.initialization import no_init_weights

    if str(device) == "meta":
        kept = _META.pop(_meta_key(auto_class, hf_config, lora_config, adapter_name), None)
        if kept is not None:
            return kept
    hf_config = copy.deepcopy(hf_config)  # merge_and_unload edits the model's config (tie_word_embeddings)
    with library_warnings_to_log(), torch.device(device), no_init_weights():
        base = getattr(transformers, auto_class).from_config(hf_config, dtype=torch.float32)
        model = PeftModel(base, copy.deepcopy(lora_config), adapter_name=adapter_name)
    return model.eval()


def merge_and_unload(model: nn.Module, progress: bool) -> nn.Module:
    """PEFT's merge_and_unload: every LoRA variant as PEFT defines it."""
    with library_warnings_to_log(), torch.no_grad():
        return model.merge_and_unload(progressbar=progress)


def merge_layer(layer: nn.Module, adapter_name: str) -> None:
    """PEFT's ``merge()`` of one layer: the call merge_and_unload makes for each adapted module."""
    with library_warnings_to_log(), torch.no_grad():
        layer.merge(adapter_names=[adapter_name])
