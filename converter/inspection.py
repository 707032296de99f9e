"""``inspect``: explain a run or checkpoint exactly, from key sets and metadata, and flag what is not normal.

The report is derived from the plan ``convert`` would execute (``planner``) and from the checks it runs before
writing (``settle``: the adapter tensors against the adapter folder's, lm_head against the embeddings); when no plan
can be made (a base config missing, say), from the key analysis the planner starts with. The checkpoint is read
memory-mapped: optimizer states are sized, never read. ``inspect_render`` prints it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .accounting import MERGED, SUPERSEDED
from .discover import find_inputs
from .errors import ConvertError
from .hashing import path_bytes
from .hparams import abbreviated
from .inspect_render import render
from .layout import Component
from .options import ConvertOptions
from .peft import (
    ComponentKeys,
    GivenConfig,
    SourceComparison,
    adapter_config,
    classify_adapter_keys,
    component_keys,
    is_saved_copy,
    parameters,
    tuner,
)
from .plan import PartPlan, Plan, dtype_name
from .planner import Opened, build_plan, open_run
from .settle import settle
from .vocab import NO_TOKENIZER

log = logging.getLogger(__name__)

__all__ = ["inspect_run", "render"]


def inspect_run(path: Path, config: str = "auto", bases: dict[str, Path] | None = None, **given: Any) -> dict[str, Any]:
    """Explain ``path`` (a run folder or a checkpoint file) as a JSON-ready dict; see the README for the keys.
    ``given``: what the command line says of the adapter's config (``adapter_config``, ``lora_r``, ``lora_alpha``)."""
    path = Path(path)
    opts = ConvertOptions(
        run=path, config=config, bases=dict(bases or {}), lora_from="checkpoint", progress=False, **given
    )
    with open_run(opts) as opened:
        return _report(path, opened, opts)


def _report(path: Path, opened: Opened, opts: ConvertOptions) -> dict[str, Any]:
    warnings: list[str] = []
    plan: Plan | None = None
    try:
        plan = settle(build_plan(opened, opts))
    except ConvertError as exc:
        warnings.append(f"convert would stop: {exc}")
    split, inputs = opened.split, opened.inputs
    components: dict[str, Any] = {}
    peft: list[dict[str, Any]] = []
    expected: set[str] = set()  # what the plain (un-PEFT'd) model's state_dict holds
    reasons: list[dict[str, Any]] = []
    comparisons: dict[str, SourceComparison | None] = {}
    for comp in opened.layout.components:
        keys = split.keys[comp.name]
        prefix = split.outer.prefix + comp.prefix
        components[comp.name] = {"kind": comp.kind, "prefix": prefix, "keys": len(keys)}
        if not keys:
            continue
        try:
            analysis = component_keys(keys, str(inputs.checkpoint))
        except ConvertError as exc:
            warnings.append(str(exc))
            continue
        expected.update(split.outer.plain_prefix + comp.prefix + k for k in analysis.plain)
        if analysis.peft is None:
            continue
        reasons.extend(_plain_load_reasons(comp, analysis))
        if comp.kind == "state_dict":  # modules_to_save only: nothing to merge, its copies show in the accounting
            continue
        part = next((p for p in plan.parts if p.name == comp.name), None) if plan else None
        peft.append(_peft_section(comp, prefix, analysis, part, opened, warnings, opts.given_config))
        if opened.adapter is not None:
            comparisons[comp.name] = part.adapter.comparison if part is not None and part.adapter else None
    adapter_section: dict[str, Any] | None = {"path": None, "keys": 0, "matches_checkpoint": None}
    if opened.adapter is not None:
        adapter_section = _adapter_section(opened.adapter, comparisons, warnings)
    elif inputs.adapter_root is not None:
        adapter_section = None

    present = set(opened.checkpoint.source.keys())
    loaded, missing, unexpected = present & expected, expected - present, present - expected
    if split.unclaimed:
        reasons.append(_reason("unexpected", len(split.unclaimed), "keys that no component of the config claims"))
        warnings.append(
            f"{len(split.unclaimed)} keys belong to no component of {opened.layout.path.name} "
            f"(e.g. {sorted(split.unclaimed)[0]}); convert stops on them: add a component or a drop rule"
        )
    for reason, dropped in split.dropped.items():
        reasons.append(_reason("unexpected", len(dropped), f"dropped by the config: {reason}"))
    if plan is not None:
        warnings.extend(_plan_warnings(plan))
    return {
        "checkpoint": _checkpoint_section(path, opened),
        "layout": {"name": opened.layout.name, "found_by": opened.layout_evidence},
        "wrappers": {
            "prefix": split.outer.prefix,
            "wrappers": list(split.outer.wrappers),
            "removed_anywhere": list(split.outer.removed),
            "attribute": split.outer.attribute,
        },
        "peft": peft,
        "components": {**components, "unclaimed": sorted(split.unclaimed)},
        "plain_load": {
            "loaded": len(loaded),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "reasons": reasons,
        },
        "adapter_folder": adapter_section,
        "hyper_parameters": {
            "values": abbreviated(opened.checkpoint.hparams),
            "used": _hparams_used(plan) if plan is not None else {},
        },
        "vocabulary": _vocabulary(plan) if plan is not None else [],
        "plan": [p.summary() for p in plan.parts] if plan is not None else None,
        "warnings": warnings,
    }


def _checkpoint_section(path: Path, opened: Opened) -> dict[str, Any]:
    ckpt, inputs = opened.checkpoint, opened.inputs
    by_dtype: dict[str, dict[str, int]] = {}
    origins: dict[str, int] = {}
    for key in ckpt.source.keys():
        info = ckpt.source.info(key)
        entry = by_dtype.setdefault(dtype_name(info.dtype), {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += info.nbytes
        origin = ckpt.source.origin(key)
        origins[origin] = origins.get(origin, 0) + 1
    chosen = inputs
    if path.resolve() == inputs.checkpoint.resolve():  # a checkpoint was named: which one would the run give?
        try:
            chosen = find_inputs(inputs.run)
        except ConvertError:
            chosen = inputs
    return {
        "path": str(inputs.checkpoint),
        "format": ckpt.format,
        "lightning_version": ckpt.lightning_version,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
        "file_bytes": path_bytes(inputs.checkpoint),
        "tensors": sum(d["tensors"] for d in by_dtype.values()),
        "weight_bytes": sum(d["bytes"] for d in by_dtype.values()),
        "by_dtype": by_dtype,
        "layout": ckpt.layout,
        "tensors_from": origins,
        "non_weight_bytes": sum(ckpt.extras.values()),
        "non_weight": ckpt.extras,
        "others": [p.name for p in inputs.checkpoints if p != inputs.checkpoint],
        "convert_would_choose": {"path": str(chosen.checkpoint), "because": chosen.reason},
    }


def _reason(kind: str, count: int, text: str) -> dict[str, Any]:
    return {"kind": kind, "count": count, "reason": f"{count} {kind}: {text}"}


def _plain_load_reasons(comp: Component, analysis: ComponentKeys) -> list[dict[str, Any]]:
    """Why a plain model's load_state_dict misses this PEFT sub-model's keys, grouped by cause."""
    layout, keys, fates = analysis.peft, analysis.keys, analysis.fates
    base = "(and .base_layer for adapted modules)" if not layout.legacy else "(PEFT before 0.7: no .base_layer)"
    reasons = [
        _reason(
            "missing",
            len(analysis.plain),
            f"every {comp.name} key of the plain model; the checkpoint holds them under PEFT's base_model.model. "
            f"prefix {base}",
        )
    ]
    merged = fates.get(MERGED, ())
    base_layers = layout.base_layers
    parts = [f"{base_layers} base layers", f"{len(merged) - base_layers} adapter tensors"]
    saved = sum(1 for k in keys if is_saved_copy(k, layout.adapter_name))
    if saved:
        parts.append(f"{saved} modules_to_save copies")
    superseded = len(fates.get(SUPERSEDED, ()))
    if superseded:
        parts.append(f"{superseded} original_module copies")
    parts.append(f"{len(keys) - len(merged) - superseded - saved} other weights")
    text = f"every {comp.name} key of the checkpoint, named by PEFT ({', '.join(parts)})"
    reasons.append(_reason("unexpected", len(keys), text))
    return reasons


def _adapter_section(
    adapter: Any, comparisons: dict[str, SourceComparison | None], warnings: list[str]
) -> dict[str, Any]:
    keys = adapter.source.keys()
    classified = classify_adapter_keys(keys)
    found = [c for c in comparisons.values() if c is not None]
    section = {
        "path": str(adapter.path),
        "weights": adapter.weights_path.name,
        "peft_type": adapter.config.get("peft_type"),
        "keys": len(keys),
        "adapted_modules": len(classified.adapted),
        "modules_to_save": sorted({m.rsplit(".", 1)[-1] for m in classified.modules_to_save}),
        "trainable_token_modules": list(classified.token_modules),
        "base_layers_saved": list(classified.base_layers),
        "shared": list(classified.shared),
        "matches_checkpoint": all(c.equal for c in found) if found else None,
        "max_abs_diff": max((c.max_abs_diff for c in found if not c.equal), default=0.0),
        "comparison": (
            found[0].as_dict()
            if len(comparisons) == 1 and found
            else {n: c.as_dict() for n, c in comparisons.items() if c}
        ),
    }
    for comparison in found:
        if not comparison.equal:
            unpaired = len(comparison.only_checkpoint) + len(comparison.only_adapter)
            warnings.append(
                f"the adapter folder {adapter.weights_path} differs from the checkpoint ({len(comparison.differing)} "
                f"tensors differ, max abs diff {comparison.max_abs_diff:.3g}; {unpaired} keys in one only): it was "
                "probably saved at another step; convert needs --lora-from"
            )
    return section


def _peft_section(
    comp: Component,
    prefix: str,
    analysis: ComponentKeys,
    part: PartPlan | None,
    opened: Opened,
    warnings: list[str],
    given: GivenConfig,
) -> dict[str, Any]:
    layout = analysis.peft
    section: dict[str, Any] = {
        "component": comp.name,
        "prefix": prefix,
        "adapters": [layout.adapter_name],
        "tuner": tuner(layout.tuner).title if layout.tuner else None,
        "peft_type": layout.tuner,
        "adapted_modules": len(layout.merged_modules),
        "target_modules": layout.target_names,
        "modules_to_save": layout.saved_names,
        "trainable_token_modules": list(layout.token_modules),
        "base_layers": layout.base_layers,
        "legacy_peft_names": layout.legacy,
    }
    if part is not None and part.adapter is not None:
        cfg, source = part.adapter.config, part.adapter.config_from
    else:
        try:
            cfg, source = adapter_config(
                layout, opened.adapter, opened.checkpoint.hparams, str(opened.inputs.checkpoint), given
            )
        except ConvertError as exc:
            section.update(parameters=None, config_from=None)
            warnings.append(str(exc))
            return section
    section.update(
        tuner=tuner(cfg.peft_type).title,
        peft_type=tuner(cfg.peft_type).peft_type,
        parameters=parameters(cfg),
        config_from=source,
    )
    return section


def _hparams_used(plan: Plan) -> dict[str, str]:
    """Which entries gave each base, the adapter's config and the tokenizer."""
    used = {}
    for part in plan.parts:
        if part.base is not None:
            used[f"{part.name} base"] = part.base.found_by
        if part.adapter is not None:
            used[f"{part.name} adapter config"] = part.adapter.config_from
        if part.tokenizer is not None:
            used[f"{part.name} tokenizer"] = part.tokenizer.found_by
    return used


def _vocabulary(plan: Plan) -> list[dict[str, Any]]:
    """Each language model's tokenizer and embeddings: where the tokenizer comes from, the tokens added in
    training, padding rows; and the adapter features that touch the vocabulary."""
    found = []
    for part in plan.parts:
        if part.ships_no_tokenizer:
            found.append({"component": part.name, "tokenizer": NO_TOKENIZER})
        if part.tokenizer is None:
            continue
        entry = {"component": part.name, **part.tokenizer.record()}
        if part.adapter is not None:
            layout = part.adapter.layout
            head, embed = (part.tie.head, part.tie.embed) if part.tie is not None else (None, None)
            adapted = [m for m in layout.merged_modules if m not in layout.token_modules]
            entry["embedding_adapter"] = sorted(m for m in adapted if f"{m}.weight" in (head, embed))
            entry["trainable_token_modules"] = list(layout.token_modules)
            indices = getattr(part.adapter.config, "trainable_token_indices", None)
            entry["trainable_token_indices"] = dict(indices) if isinstance(indices, dict) else indices
        found.append(entry)
    return found


def _plan_warnings(plan: Plan) -> list[str]:
    found = []
    for part in plan.parts:
        if part.tie is not None and part.tie.configured and not part.tied:
            found.append(
                f"{part.name}: the trained lm_head differs from embed_tokens under tie_word_embeddings: true; a plain "
                "reload would drop it; convert writes tie_word_embeddings: false and keeps both"
            )
        if part.vocab_resized is not None:
            found.append(
                f"{part.name}: the checkpoint's vocabulary has {part.vocab_resized} rows, the base config another "
                "vocab_size; convert writes the checkpoint's"
            )
    return found
