"""``inspect``: explain a run or checkpoint exactly, from key sets and metadata, and flag what is not normal.

The report is derived from the plan ``convert`` would execute (``planner``) and from the checks it runs before
writing (``checks.settle``: the LoRA tensors against the adapter folder's, lm_head against the embeddings); when
no plan can be made (a base config missing, say), from the key analysis the planner starts with. The checkpoint
is read memory-mapped: optimizer states are sized, never read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checks import settle
from .discover import find_inputs
from .errors import ConvertError
from .hashing import path_bytes
from .hparams import abbreviated
from .keymap import (
    MERGED,
    SUPERSEDED,
    ComponentKeys,
    classify_adapter_keys,
    component_adapter_keys,
    component_keys,
    is_saved_copy,
)
from .layout import Component
from .lora import SourceComparison, compare_sources, lora_config_from, pair_sources
from .options import ConvertOptions
from .plan import Plan, dtype_name
from .planner import Opened, build_plan, open_run
from .sources import AdapterFolder, find_adapter_folder, open_adapter_folder

log = logging.getLogger(__name__)


def inspect_run(path: Path, config: str = "panorama_vlm", bases: dict[str, Path] | None = None) -> dict[str, Any]:
    """Explain ``path`` (a run folder or a checkpoint file) as a JSON-ready dict; see the README for the keys."""
    path = Path(path)
    opts = ConvertOptions(run=path, config=config, bases=dict(bases or {}), lora_from="checkpoint", progress=False)
    opened = open_run(opts)
    with opened.sources:
        return _report(path, opened, opts)


def _report(path: Path, opened: Opened, opts: ConvertOptions) -> dict[str, Any]:
    warnings: list[str] = []
    plan: Plan | None = None
    try:
        plan = settle(build_plan(opened, opts), opened.sources)
    except ConvertError as exc:
        warnings.append(f"convert would stop: {exc}")
    split, inputs = opened.split, opened.inputs
    components: dict[str, Any] = {}
    peft: list[dict[str, Any]] = []
    expected: set[str] = set()  # what the plain (un-PEFT'd) model's state_dict holds
    reasons: list[dict[str, Any]] = []
    adapter: AdapterFolder | None = None
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
        if comp.kind == "state_dict":  # modules_to_save only: no LoRA to merge, its copies show in the accounting
            continue
        part = next((p for p in plan.parts if p.name == comp.name), None) if plan else None
        adapter = adapter or _adapter(opened, analysis, warnings)
        peft.append(_peft_section(comp, prefix, analysis, adapter, part, opened, warnings))
        if adapter is not None:
            comparisons[comp.name] = (
                part.lora.comparison
                if part is not None and part.lora is not None
                else _compare(opened, comp, analysis, adapter)
            )
    adapter_section: dict[str, Any] | None = {"path": None, "keys": 0, "matches_checkpoint": None}
    if adapter is not None:
        adapter_section = _adapter_section(adapter, comparisons, warnings)
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
        "wrappers": {
            "prefix": split.outer.prefix,
            "wrappers": list(split.outer.wrappers),
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
    reasons = [
        _reason(
            "missing",
            len(analysis.plain),
            f"every {comp.name} key of the plain model; the checkpoint holds "
            "them under PEFT's base_model.model. prefix (and .base_layer for adapted modules)",
        )
    ]
    merged = fates.get(MERGED, ())
    base_layers = sum(1 for k in merged if k.split(".")[-2] == "base_layer")
    parts = [f"{base_layers} base layers", f"{len(merged) - base_layers} LoRA tensors"]
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


def _adapter(opened: Opened, analysis: ComponentKeys, warnings: list[str]) -> AdapterFolder | None:
    root = opened.inputs.adapter_root
    if root is None:
        return None
    try:
        folder = find_adapter_folder(root, analysis.peft.adapter_name)
        return open_adapter_folder(folder, opened.sources.reader) if folder else None
    except ConvertError as exc:
        warnings.append(str(exc))
        return None


def _compare(opened: Opened, comp: Component, analysis: ComponentKeys, adapter: AdapterFolder) -> SourceComparison:
    """The comparison ``settle`` makes, for a run that cannot be planned."""
    from .names import ADAPTER

    if ADAPTER not in opened.sources:
        opened.sources.add(ADAPTER, adapter.source)
    infos = {rel: opened.checkpoint.source.info(src) for rel, src in analysis.keys.items()}
    folder_keys = component_adapter_keys(adapter.source.keys(), comp, opened.split.outer)
    pairing = pair_sources(analysis.keys, infos, adapter, analysis.peft.adapter_name, folder_keys)
    return compare_sources(pairing, analysis.keys, opened.sources)


def _adapter_section(
    adapter: AdapterFolder, comparisons: dict[str, SourceComparison | None], warnings: list[str]
) -> dict[str, Any]:
    keys = adapter.source.keys()
    classified = classify_adapter_keys(keys)
    found = [c for c in comparisons.values() if c is not None]
    section = {
        "path": str(adapter.path),
        "weights": adapter.weights_path.name,
        "keys": len(keys),
        "lora_pairs": len(classified.lora_modules),
        "modules_to_save": classified.saved_names,
        "trainable_token_modules": list(classified.token_modules),
        "base_layers_saved": list(classified.base_layers),
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


def _peft_section(comp, prefix, analysis, adapter, part, opened, warnings) -> dict[str, Any]:
    layout = analysis.peft
    section: dict[str, Any] = {
        "component": comp.name,
        "prefix": prefix,
        "adapters": [layout.adapter_name],
        "lora_pairs": len(layout.lora_modules),
        "target_modules": layout.target_names,
        "modules_to_save": layout.saved_names,
        "trainable_token_modules": list(layout.token_modules),
        "base_layers": layout.base_layers,
        "use_dora": layout.use_dora,
    }
    if part is not None and part.lora is not None:
        cfg, source = part.lora.config, part.lora.config_from
    else:
        try:
            cfg, source = lora_config_from(layout, adapter, opened.checkpoint.hparams, str(opened.inputs.checkpoint))
        except ConvertError as exc:
            section.update(r=None, alpha=None, scaling_from=None)
            warnings.append(str(exc))
            return section
    section.update(
        r=cfg.r,
        alpha=cfg.lora_alpha,
        scaling_from=source,
        use_rslora=bool(cfg.use_rslora),
        rank_pattern=dict(cfg.rank_pattern or {}),
        alpha_pattern=dict(cfg.alpha_pattern or {}),
    )
    return section


def _hparams_used(plan: Plan) -> dict[str, str]:
    """Which entries gave each base, the LoRA scaling and the tokenizer."""
    used = {}
    for part in plan.parts:
        if part.base is not None:
            used[f"{part.name} base"] = part.base.found_by
        if part.lora is not None:
            used[f"{part.name} LoRA r/alpha"] = part.lora.config_from
        if part.tokenizer is not None:
            used[f"{part.name} tokenizer"] = part.tokenizer.found_by
    return used


def _tree_lines(tree: Any, indent: str = "  ", limit: int = 40) -> list[str]:
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if len(lines) >= limit:
                return
            pad = indent * (depth + 1)
            if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
                lines.append(f"{pad}{key}: {value!r}")
            elif isinstance(value, (dict, list)) and value:
                lines.append(f"{pad}{key}:")
                walk(value, depth + 1)
            else:
                lines.append(f"{pad}{key}: {value!r}" if isinstance(value, str) else f"{pad}{key}: {value}")

    walk(tree, 0)
    return lines + ([f"{indent}... (see --json)"] if len(lines) >= limit else [])


def _vocabulary(plan: Plan) -> list[dict[str, Any]]:
    """Each language model's tokenizer and embeddings: where the tokenizer comes from, the tokens added in
    training, padding rows; and the PEFT features that touch the vocabulary."""
    found = []
    for part in plan.parts:
        if part.tokenizer is None:
            continue
        entry = {"component": part.name, **part.tokenizer.record()}
        if part.lora is not None:
            layout = part.lora.layout
            head, embed = (part.tie.head, part.tie.embed) if part.tie is not None else (None, None)
            entry["embedding_lora"] = sorted(m for m in layout.lora_modules if f"{m}.weight" in (head, embed))
            entry["trainable_token_modules"] = list(layout.token_modules)
            indices = getattr(part.lora.config, "trainable_token_indices", None)
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


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _rows(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


def render(report: dict[str, Any]) -> str:
    """The human-readable report: short sections with aligned tables."""
    c = report["checkpoint"]
    lines = ["checkpoint"]
    dtypes = ", ".join(f"{d} {v['tensors']} ({_mb(v['bytes'])})" for d, v in c["by_dtype"].items())
    non_weight = ", ".join(f"{k} {_mb(v)}" for k, v in c["non_weight"].items() if v) or "none"
    lines += _rows(
        [
            ("path", c["path"]),
            ("format", f"{c['format']}" + (f" (Lightning {c['lightning_version']})" if c["lightning_version"] else "")),
            ("epoch / step", f"{c['epoch']} / {c['global_step']}"),
            ("tensors", f"{c['tensors']}: {dtypes}"),
            *((k.replace("_", " "), _value(v)) for k, v in c["layout"].items() if k != "format"),
            ("tensors from", "; ".join(f"{n} {origin}" for origin, n in c["tensors_from"].items())),
            ("non-weight", f"{_mb(c['non_weight_bytes'])}: {non_weight}"),
            ("other ckpts", ", ".join(c["others"]) or "none"),
            ("convert uses", f"{c['convert_would_choose']['path']} ({c['convert_would_choose']['because']})"),
        ]
    )
    w = report["wrappers"]
    lines += ["", "wrappers"]
    lines += _rows(
        [
            ("prefix", repr(w["prefix"])),
            ("attribute", str(w["attribute"])),
            ("wrappers", ", ".join(w["wrappers"]) or "none"),
        ]
    )
    for p in report["peft"]:
        lines += ["", f"peft: {p['component']}"]
        lines += _rows(
            [
                ("prefix", p["prefix"]),
                ("adapter", ", ".join(p["adapters"])),
                ("lora pairs", str(p["lora_pairs"])),
                ("targets", ", ".join(p["target_modules"])),
                ("r / alpha", f"{p['r']} / {p['alpha']} (from {p['scaling_from']})"),
                ("rsLoRA / DoRA", f"{p.get('use_rslora')} / {p['use_dora']}"),
                ("modules_to_save", ", ".join(p["modules_to_save"]) or "none"),
                ("base layers", str(p["base_layers"])),
            ]
        )
    lines += ["", "components"]
    comps = {k: v for k, v in report["components"].items() if k != "unclaimed"}
    lines += _rows(
        [(name, v["kind"], v["prefix"] or "''", f"{v['keys']} keys") for name, v in comps.items()]
        + [("unclaimed", "", "", f"{len(report['components']['unclaimed'])} keys")]
    )
    pl = report["plain_load"]
    lines += ["", "plain load_state_dict(strict=False) into the un-PEFT'd model"]
    lines += _rows(
        [("loaded", str(pl["loaded"])), ("missing", str(pl["missing"])), ("unexpected", str(pl["unexpected"]))]
    )
    lines += [f"  - {r['reason']}" for r in pl["reasons"]]
    a = report["adapter_folder"]
    lines += ["", "adapter folder"]
    if a is None or a.get("path") is None:
        lines.append("  none")
    else:
        match = "yes" if a["matches_checkpoint"] else f"NO (max abs diff {a['max_abs_diff']:.3g})"
        lines += _rows(
            [
                ("path", a["path"]),
                ("keys", str(a["keys"])),
                ("lora pairs", str(a["lora_pairs"])),
                ("modules_to_save", ", ".join(a["modules_to_save"]) or "none"),
                ("matches ckpt", match),
            ]
        )
    hp = report["hyper_parameters"]
    lines += ["", "hyper-parameters (recovered as plain values, interpolations resolved)"]
    lines += _tree_lines(hp["values"]) or ["  none"]
    if hp["used"]:
        lines += _rows([(what, source) for what, source in hp["used"].items()])
    for v in report.get("vocabulary", []):
        lines += ["", f"vocabulary: {v['component']}"]
        added = ", ".join(f"{t} ({i})" for t, i in v["added_tokens"].items()) or "none"
        rows = [
            ("tokenizer", f"{v['found_by']}: {v['tokens']} tokens"),
            ("added", added),
            ("embeddings", f"{v['embedding_rows']} rows (base vocab_size {v['base_vocab_size']})"),
            ("padding rows", f"{v['padding_rows']} (rows beyond the tokenizer: normal with pad_to_multiple_of)"),
        ]
        if v.get("embedding_lora"):
            rows.append(("embedding LoRA", ", ".join(v["embedding_lora"])))
        if v.get("trainable_token_modules"):
            rows.append(
                ("trainable tokens", f"{', '.join(v['trainable_token_modules'])}: {v['trainable_token_indices']}")
            )
        lines += _rows(rows)
    lines += ["", "plan (convert --dry-run)"]
    if report["plan"] is None:
        lines.append("  unavailable (see warnings)")
    else:
        lines += _rows(
            [
                (p["component"], (p["out"] + "/"), f"{p['tensors']} tensors", _mb(p["bytes"]), ", ".join(p["dtypes"]))
                for p in report["plan"]
            ]
        )
    lines += ["", "warnings"]
    lines += [f"  - {w}" for w in report["warnings"]] or ["  none"]
    return "\n".join(lines)
