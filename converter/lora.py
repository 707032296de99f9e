"""LoRA facts a plan needs: the adapter's LoraConfig, and how the checkpoint's adapter tensors pair with the
adapter folder's (by key and shape when planning, by value when checking)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConvertError, preview, untrusted
from .hparams import lookup
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
        with untrusted(adapter.path / ADAPTER_CONFIG, "PEFT rejects it", "re-save the adapter"):
            cfg = LoraConfig(**{k: v for k, v in raw.items() if k in known})
        cfg.inference_mode = True
        h_r, h_alpha = (_hparam(hparams, name, where) for name in ("lora_r", "lora_alpha"))
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
    found = {name: lookup(hparams, (name,), name, "--adapter-dir with the run's adapter folder", where) for name in
             ("lora_r", "lora_alpha", "use_rslora")}  # fmt: skip
    r, alpha = (found[name][1] if found[name] else None for name in ("lora_r", "lora_alpha"))
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
        use_rslora=bool(found["use_rslora"][1]) if found["use_rslora"] else False,
        lora_dropout=0.0,
        inference_mode=True,
    )
    paths = ", ".join(found[name][0] for name in ("lora_r", "lora_alpha"))
    return cfg, f"hyper_parameters ({paths})"


def component_config(config: Any, layout: PeftLayout, prefix: str) -> Any:
    """A whole-model adapter's LoraConfig restated for one component's model (PEFT wrapped the whole VLM): the
    component's LoRA modules as exact targets, its modules_to_save, and each module's r and alpha as PEFT's own
    pattern matching gives them for the module's full name (``prefix`` + its path in the component)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = {}, {}
    for module in layout.lora_modules:
        name = prefix + module
        r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.lora_alpha)
        if r != config.r:
            ranks[re.escape(module)] = r
        if alpha != config.lora_alpha:
            alphas[re.escape(module)] = alpha
    restated = copy.deepcopy(config)
    restated.target_modules = set(layout.lora_modules)
    restated.modules_to_save = layout.saved_names or None
    restated.rank_pattern, restated.alpha_pattern = ranks, alphas
    restated.layers_to_transform = restated.layers_pattern = restated.exclude_modules = None
    return restated


def _hparam(hparams: Mapping[str, Any], name: str, where: str) -> Any:
    found = lookup(hparams, (name,), name, "--adapter-dir with the run's adapter folder", where)
    return found[1] if found else None


@dataclasses.dataclass(frozen=True)
class Pairing:
    """The checkpoint's adapter tensors matched with the adapter folder's by meaning (no data read).

    Only what training changes is paired and compared: LoRA factors, trainable token rows, modules_to_save copies.
    Frozen layers PEFT saves beside an adapter (resized embeddings, the base layers of embedding LoRA, original
    copies) are expected extras: ``saved_beside``.
    """

    pairs: tuple[tuple[str, str], ...]  # (adapter folder key, component-relative checkpoint key), same shapes
    only_checkpoint: tuple[str, ...]  # adapter-folder names of checkpoint tensors the folder lacks
    only_adapter: tuple[str, ...]
    reshaped: tuple[str, ...]  # "key (checkpoint shape) vs (adapter shape)"
    saved_beside: tuple[str, ...] = ()  # adapter folder keys of frozen layers saved with the adapter

    @property
    def keys(self) -> int:
        return len(self.pairs) + len(self.reshaped) + len(self.only_adapter)


def pair_sources(
    keys: Mapping[str, str],
    infos: Mapping[str, TensorInfo],
    adapter: AdapterFolder,
    adapter_name: str,
    folder_keys: Mapping[str, str],
) -> Pairing:
    """Pair the component's adapter tensors (``keys``: component-relative key -> source key, ``infos`` by
    component-relative key) with the adapter folder's (``folder_keys``: the folder's keys of this component, as the
    component names them -> as the folder names them)."""
    ours = {}
    for rel in keys:
        akey = adapter_key(rel, adapter_name)
        if akey is not None:
            ours[akey] = rel
    pairs, reshaped, only_adapter, beside = [], [], [], []
    for name, akey in sorted(folder_keys.items()):
        if name in ours:
            ckpt_shape, adapter_shape = infos[ours[name]].shape, adapter.source.info(akey).shape
            if ckpt_shape != adapter_shape:
                reshaped.append(f"{akey} {ckpt_shape} vs {adapter_shape}")
            else:
                pairs.append((akey, ours[name]))
        elif name in keys or _saved_copy(name, adapter_name) in keys:
            beside.append(akey)  # a frozen layer, or a second copy of a trained one, saved by PEFT with the adapter
        else:
            only_adapter.append(akey)
    return Pairing(
        tuple(pairs),
        tuple(sorted(ours.keys() - folder_keys.keys())),
        tuple(only_adapter),
        tuple(reshaped),
        tuple(beside),
    )


def _saved_copy(name: str, adapter_name: str) -> str | None:
    """``X.modules_to_save.P`` (how PEFT names the trained copy when it saves a whole embedding layer) as the
    checkpoint names it: ``X.modules_to_save.<adapter>.P``."""
    parts = name.split(".")
    if "modules_to_save" not in parts:
        return None
    i = parts.index("modules_to_save")
    return ".".join([*parts[: i + 1], adapter_name, *parts[i + 1 :]])


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
    differing, max_diff = [k.split(" ", 1)[0] for k in pairing.reshaped], 0.0  # "key (shape) vs (shape)"
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
