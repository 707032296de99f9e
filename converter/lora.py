"""LoRA facts a plan needs: the adapter's LoraConfig, and how the checkpoint's adapter tensors pair with the
adapter folder's (by key and shape when planning, by value when checking)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from .errors import ConvertError, preview
from .keymap import PeftLayout, adapter_key
from .names import ADAPTER, ADAPTER_CONFIG, CHECKPOINT
from .sources import AdapterFolder, Sources, TensorInfo, TensorRef

log = logging.getLogger(__name__)


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
        try:
            cfg = LoraConfig(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ValueError) as exc:
            where = adapter.path / ADAPTER_CONFIG
            raise ConvertError(f"{where}: PEFT rejects it ({exc}); re-save the adapter") from exc
        cfg.inference_mode = True
        h_r, h_alpha = hparams.get("lora_r"), hparams.get("lora_alpha")
        if (h_r is not None and h_r != cfg.r) or (h_alpha is not None and h_alpha != cfg.lora_alpha):
            log.warning(
                "hyper_parameters say lora_r=%s lora_alpha=%s but %s says r=%s alpha=%s; using the adapter config",
                h_r,
                h_alpha,
                adapter.path / ADAPTER_CONFIG,
                cfg.r,
                cfg.lora_alpha,
            )
        return cfg, ADAPTER_CONFIG
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


@dataclasses.dataclass(frozen=True)
class Pairing:
    """The checkpoint's adapter tensors matched with the adapter folder's by key and shape (no data read)."""

    pairs: tuple[tuple[str, str], ...]  # (adapter folder key, component-relative checkpoint key), same shapes
    only_checkpoint: tuple[str, ...]  # adapter-folder names of checkpoint tensors the folder lacks
    only_adapter: tuple[str, ...]
    reshaped: tuple[str, ...]  # "key (checkpoint shape) vs (adapter shape)"

    @property
    def keys(self) -> int:
        return len(self.pairs) + len(self.reshaped) + len(self.only_adapter)


def pair_sources(
    keys: Mapping[str, str], infos: Mapping[str, TensorInfo], adapter: AdapterFolder, adapter_name: str
) -> Pairing:
    """Pair the component's adapter tensors (``keys``: component-relative key -> source key, ``infos`` by
    component-relative key) with the adapter folder's tensors."""
    ours = {}
    for rel in keys:
        akey = adapter_key(rel, adapter_name)
        if akey is not None:
            ours[akey] = rel
    theirs = {k: adapter.source.info(k) for k in adapter.source.keys()}
    pairs, reshaped = [], []
    for akey in sorted(ours.keys() & theirs.keys()):
        ckpt_shape, adapter_shape = infos[ours[akey]].shape, theirs[akey].shape
        if ckpt_shape != adapter_shape:
            reshaped.append(f"{akey} {ckpt_shape} vs {adapter_shape}")
        else:
            pairs.append((akey, ours[akey]))
    return Pairing(
        tuple(pairs),
        tuple(sorted(ours.keys() - theirs.keys())),
        tuple(sorted(theirs.keys() - ours.keys())),
        tuple(reshaped),
    )


@dataclasses.dataclass(frozen=True)
class SourceComparison:
    """The two LoRA sources compared by value (``equal``: every paired tensor equal and no unpaired key)."""

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


def compare_sources(pairing: Pairing, keys: Mapping[str, str], sources: Sources) -> SourceComparison:
    """Compare each paired tensor by value (``keys``: component-relative key -> the checkpoint's key)."""
    differing, max_diff = [k.split(" ", 1)[0] for k in pairing.reshaped], 0.0
    for akey, rel in pairing.pairs:
        equal, diff = sources.equal(TensorRef(CHECKPOINT, keys[rel]), TensorRef(ADAPTER, akey))
        if not equal:
            differing.append(akey)
            max_diff = max(max_diff, diff)
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
        f"{adapter} and {checkpoint} hold different LoRA weights ({'; '.join(what)}); the adapter folder was "
        "probably saved at another step; choose one with --lora-from checkpoint or --lora-from adapter"
    )


def refuse_reshaped(pairing: Pairing, adapter: str, checkpoint: str) -> None:
    """An adapter whose tensors have other shapes was trained for another base model."""
    if pairing.reshaped:
        raise ConvertError(
            f"{adapter} does not fit the model in {checkpoint}: {len(pairing.reshaped)} tensors have other shapes "
            f"({preview(list(pairing.reshaped), 2)}); the adapter was trained for another base model; use "
            "--lora-from checkpoint or the run's own adapter folder"
        )
