"""LoRA: which config and which tensors to merge, and the merge itself, done by PEFT's own code."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConvertError, preview
from .keymap import PeftLayout, adapter_key
from .lazy import Span, SpanReader, chunked_equal, stored_crc
from .reader import AdapterFolder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AdapterFacts:
    """What the manifest records about the merged adapter."""

    name: str
    r: int
    alpha: float
    target_modules: list[str]
    modules_to_save: list[str]
    use_rslora: bool
    use_dora: bool
    config_from: str  # "adapter_config.json" or "hyper_parameters"
    tensors_from: str  # "checkpoint" or "adapter"
    lora_pairs: int
    sources_compared: dict[str, Any] | None = None


def lora_config_from(
    layout: PeftLayout, adapter: AdapterFolder | None, hparams: Mapping[str, Any], where: str
) -> tuple[Any, str]:
    """The LoraConfig to rebuild the PEFT model with: adapter_config.json, else hparams ``lora_r``/``lora_alpha``."""
    from peft import LoraConfig

    if adapter is not None:
        raw = dict(adapter.config)
        if raw.get("peft_type", "LORA") != "LORA":
            raise ConvertError(f"{adapter.path}: peft_type {raw.get('peft_type')} is not LoRA; ckpt2hf merges LoRA")
        raw.pop("peft_type", None)
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        ignored = sorted(set(raw) - known)
        if ignored:
            log.info("adapter_config.json fields unknown to this PEFT version, ignored: %s", ", ".join(ignored))
        cfg = LoraConfig(**{k: v for k, v in raw.items() if k in known})
        cfg.inference_mode = True
        h_r, h_alpha = hparams.get("lora_r"), hparams.get("lora_alpha")
        if (h_r is not None and h_r != cfg.r) or (h_alpha is not None and h_alpha != cfg.lora_alpha):
            log.warning(
                "hyper_parameters say lora_r=%s lora_alpha=%s but %s says r=%s alpha=%s; using the adapter config",
                h_r,
                h_alpha,
                adapter.path / "adapter_config.json",
                cfg.r,
                cfg.lora_alpha,
            )
        return cfg, "adapter_config.json"
    r, alpha = hparams.get("lora_r"), hparams.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise ConvertError(
            f"{where}: the LoRA scaling is unknown: no adapter_config.json (lora_weights/) and no lora_r/lora_alpha "
            "in hyper_parameters; pass --adapter-dir with the run's adapter folder"
        )
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=layout.target_names,
        modules_to_save=layout.saved_names or None,
        use_dora=layout.use_dora,
        use_rslora=bool(hparams.get("use_rslora", False)),
        lora_dropout=0.0,
        inference_mode=True,
    )
    return cfg, "hyper_parameters"


@dataclasses.dataclass
class SourceComparison:
    equal: bool
    keys: int
    max_abs_diff: float
    differing: list[str]
    only_checkpoint: list[str]
    only_adapter: list[str]
    reshaped: list[str]  # "key (checkpoint shape) vs (adapter shape)" where the shapes differ

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


def _same(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Equal after rounding both to the narrower dtype; also the max abs difference in float32."""
    if a.shape != b.shape:
        return False, float("inf")
    narrow = a.dtype if torch.finfo(a.dtype).bits <= torch.finfo(b.dtype).bits else b.dtype
    equal = torch.equal(a.to(narrow), b.to(narrow))
    diff = 0.0 if equal else float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return equal, diff


def compare_sources(
    checkpoint: Mapping[str, torch.Tensor],
    adapter: AdapterFolder,
    adapter_name: str,
    spans: Mapping[str, Span] | None = None,
    reader: SpanReader | None = None,
) -> SourceComparison:
    """Compare the checkpoint's LoRA/modules_to_save tensors with the adapter folder's, key by key.

    With ``spans`` (checkpoint key -> Span) and a ``reader``, values are compared in bounded chunks.
    """
    ours, our_spans = {}, {}
    for key, tensor in checkpoint.items():
        akey = adapter_key(key, adapter_name)
        if akey is not None:
            ours[akey] = tensor
            if spans is not None and key in spans:
                our_spans[akey] = spans[key]
    theirs = {k: span.shape for k, span in adapter.spans.items()}  # shapes from the header: no data read
    differing, max_diff, reshaped = [], 0.0, []
    for key in sorted(ours.keys() & theirs.keys()):
        if tuple(ours[key].shape) != theirs[key]:
            reshaped.append(f"{key} {tuple(ours[key].shape)} vs {theirs[key]}")
            differing.append(key)
            continue
        if reader is not None and key in our_spans and key in adapter.spans:
            equal, diff = _compare_spans(reader, our_spans[key], adapter.spans[key])
        else:
            equal, diff = _same(ours[key], adapter.tensors[key])
        if not equal:
            differing.append(key)
            max_diff = max(max_diff, diff)
    only_ckpt = sorted(ours.keys() - theirs.keys())
    only_adapter = sorted(theirs.keys() - ours.keys())
    equal = not differing and not only_ckpt and not only_adapter
    return SourceComparison(equal, len(theirs), max_diff, differing, only_ckpt, only_adapter, reshaped)


def _compare_spans(reader: SpanReader, ours: Span, theirs: Span) -> tuple[bool, float]:
    """(equal, max abs diff) of a checkpoint tensor and an adapter tensor stored on disk.

    When the checkpoint's zip record stores a CRC-32 for exactly this tensor and the dtypes match, one pass over the
    adapter's bytes settles the usual case (the same tensor saved twice): equal CRC-32s are taken as agreement (the
    checkpoint's bytes are checked against that CRC-32 when the conversion reads them). Otherwise, and whenever
    the CRC-32s differ, the values are compared chunk by chunk, which also measures the difference.
    """
    stored = stored_crc(ours)
    same_layout = ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if stored is not None and same_layout and reader.crc(theirs) == stored:
        return True, 0.0
    return chunked_equal(reader, ours, theirs)


def adapter_keys_as_checkpoint(checkpoint_keys: list[str], adapter: AdapterFolder, adapter_name: str) -> dict[str, str]:
    """For ``--lora-from adapter``: checkpoint key -> the adapter folder's key that replaces it."""
    inverse = {adapter_key(k, adapter_name): k for k in checkpoint_keys}
    inverse.pop(None, None)
    missing = sorted(set(adapter.spans) - inverse.keys())
    if missing:
        raise ConvertError(
            f"{adapter.weights_path}: {len(missing)} adapter tensors have no place in the checkpoint's model "
            f"({preview(missing, 3)}); the adapter belongs to another model"
        )
    return {inverse[k]: k for k in adapter.spans}


@contextlib.contextmanager
def _peft_warnings_to_log():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("PEFT/transformers: %s", w.message)


def build_peft_model(hf_config: Any, lora_config: Any, adapter_name: str, device: torch.device) -> nn.Module:
    """The unmerged PEFT model, float32 on ``device``, parameters allocated but not initialised (to be loaded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    hf_config = copy.deepcopy(hf_config)  # merge_and_unload edits the model's config (tie_word_embeddings)
    with _peft_warnings_to_log(), torch.device(device), no_init_weights():
        base = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model = PeftModel(base, lora_config, adapter_name=adapter_name)
    return model.eval()


def load_exactly(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str, hint: str) -> None:
    """Copy ``tensors`` into ``model`` (float32); every parameter must be covered, every tensor used, shapes equal."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({preview(missing, 3)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({preview(unexpected, 3)})")
        raise ConvertError(
            f"{where}: the checkpoint does not fit the model built from its config: {'; '.join(parts)}; {hint}"
        )
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(expected)
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ConvertError(
            f"{where}: {len(wrong)} tensors have other shapes than the config gives: {preview(wrong, 2)}; {hint}"
        )
    with torch.no_grad():
        model.load_state_dict(dict(tensors), strict=True)


def merge(model: nn.Module, progress: bool) -> nn.Module:
    """PEFT's merge_and_unload: every LoRA variant (scaling, rsLoRA, DoRA, fan_in_fan_out) as PEFT defines it."""
    with _peft_warnings_to_log(), torch.no_grad():
        return model.merge_and_unload(progressbar=progress)
