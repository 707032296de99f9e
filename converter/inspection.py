"""``inspect``: explain a run or checkpoint exactly, from key sets and metadata, and flag what is not normal.

Reads the checkpoint memory-mapped (optimizer states are sized, never read) and touches only the tensors it
compares: the LoRA and modules_to_save tensors against the adapter folder, lm_head against the embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import Component, load_config
from .convert import ConvertOptions, prepare
from .discover import find_inputs
from .errors import ConvertError
from .keymap import MERGED, SUPERSEDED, PeftLayout, detect_peft_layout, is_peft_wrapped, plain_keys, split_components
from .merge import compare_sources, lora_config_from
from .reader import find_adapter_folder, read_adapter_folder, read_checkpoint

log = logging.getLogger(__name__)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def inspect_run(path: Path, config: str = "panorama_vlm", bases: dict[str, Path] | None = None) -> dict[str, Any]:
    """Explain ``path`` (a run folder or a checkpoint file) as a JSON-ready dict; see the README for the keys."""
    path = Path(path)
    inputs = find_inputs(path)
    ckpt = read_checkpoint(inputs.checkpoint, verify_crc=False)
    layout_config = load_config(config)
    split = split_components(ckpt.tensors.keys(), layout_config)
    warnings: list[str] = []

    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in ckpt.tensors.values():
        entry = by_dtype.setdefault(_dtype_name(tensor.dtype), {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.numel() * tensor.element_size()
    chosen = inputs
    if path.is_file():
        try:
            chosen = find_inputs(inputs.run)
        except ConvertError:
            chosen = inputs
    checkpoint = {
        "path": str(inputs.checkpoint),
        "format": ckpt.format,
        "lightning_version": ckpt.lightning_version,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
        "file_bytes": inputs.checkpoint.stat().st_size,
        "tensors": len(ckpt.tensors),
        "weight_bytes": sum(d["bytes"] for d in by_dtype.values()),
        "by_dtype": by_dtype,
        "non_weight_bytes": sum(ckpt.extras.values()),
        "non_weight": ckpt.extras,
        "others": [p.name for p in inputs.checkpoints if p != inputs.checkpoint],
        "convert_would_choose": {"path": str(chosen.checkpoint), "because": chosen.reason},
    }

    components: dict[str, Any] = {}
    peft: list[dict[str, Any]] = []
    expected: set[str] = set()  # what the plain (un-PEFT'd) model's state_dict holds
    reasons: list[dict[str, Any]] = []
    adapter_section: dict[str, Any] | None = None
    for comp in layout_config.components:
        keys = split.keys[comp.name]
        prefix = split.outer.prefix + comp.prefix
        components[comp.name] = {"kind": comp.kind, "prefix": prefix, "keys": len(keys)}
        if not keys:
            continue
        if not (comp.kind == "hf_causal_lm" and is_peft_wrapped(keys)):
            expected.update(prefix + k for k in keys)
            continue
        try:
            layout = detect_peft_layout(keys, str(inputs.checkpoint))
        except ConvertError as exc:
            warnings.append(str(exc))
            continue
        plain, fate = plain_keys(keys, layout.adapter_name)
        expected.update(prefix + k for k in plain)
        reasons.extend(_plain_load_reasons(comp, layout, plain, fate, keys))
        section, adapter_section = _peft_section(comp, prefix, layout, keys, ckpt, inputs, warnings)
        peft.append(section)

    present = set(ckpt.tensors)
    loaded, missing, unexpected = present & expected, expected - present, present - expected
    if split.unclaimed:
        reasons.append(_reason("unexpected", len(split.unclaimed), "keys that no component of the config claims"))
        warnings.append(
            f"{len(split.unclaimed)} keys belong to no component of {layout_config.path.name} "
            f"(e.g. {sorted(split.unclaimed)[0]}); convert stops on them: add a component or a drop rule"
        )
    for reason, dropped in split.dropped.items():
        reasons.append(_reason("unexpected", len(dropped), f"dropped by the config: {reason}"))

    plan = None
    try:
        opts = ConvertOptions(
            run=path,
            config=config,
            bases=dict(bases or {}),
            lora_from="checkpoint",
            dry_run=True,
            progress=False,
            device="cpu",
        )
        prepared = prepare(opts)
        prepared.reader.close()
        plan = prepared.summary["plan"]
        warnings.extend(_part_warnings(prepared.parts))
    except ConvertError as exc:
        warnings.append(f"convert would stop: {exc}")

    return {
        "checkpoint": checkpoint,
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
        "plan": plan,
        "warnings": warnings,
    }


def _reason(kind: str, count: int, text: str) -> dict[str, Any]:
    return {"kind": kind, "count": count, "reason": f"{count} {kind}: {text}"}


def _plain_load_reasons(
    comp: Component, layout: PeftLayout, plain: dict[str, str], fate: dict[str, list[str]], keys: dict[str, str]
) -> list[dict[str, Any]]:
    """Why a plain model's load_state_dict misses this PEFT sub-model's keys, grouped by cause."""
    reasons = [
        _reason(
            "missing",
            len(plain),
            f"every {comp.name} key of the plain model; the checkpoint holds "
            "them under PEFT's base_model.model. prefix (and .base_layer for adapted modules)",
        )
    ]
    merged = fate.get(MERGED, [])
    base_layers = sum(1 for k in merged if k.split(".")[-2] == "base_layer")
    parts = [f"{base_layers} base layers", f"{len(merged) - base_layers} LoRA tensors"]
    saved = sum(1 for k in keys if f".modules_to_save.{layout.adapter_name}." in f".{k}")
    if saved:
        parts.append(f"{saved} modules_to_save copies")
    superseded = len(fate.get(SUPERSEDED, []))
    if superseded:
        parts.append(f"{superseded} original_module copies")
    others = len(keys) - len(merged) - superseded - saved
    parts.append(f"{others} other weights")
    reasons.append(
        _reason("unexpected", len(keys), f"every {comp.name} key of the checkpoint, named by PEFT ({', '.join(parts)})")
    )
    return reasons


def _peft_section(comp, prefix, layout, keys, ckpt, inputs, warnings):
    rel_tensors = {rel: ckpt.tensors[src] for rel, src in keys.items()}
    adapter = None
    adapter_section = None
    if inputs.adapter_root is not None:
        try:
            folder = find_adapter_folder(inputs.adapter_root, layout.adapter_name)
            adapter = read_adapter_folder(folder) if folder else None
        except ConvertError as exc:
            warnings.append(str(exc))
    if adapter is not None:
        cmp = compare_sources(rel_tensors, adapter, layout.adapter_name)
        adapter_keys = list(adapter.tensors)
        adapter_section = {
            "path": str(adapter.path),
            "weights": adapter.weights_path.name,
            "keys": len(adapter_keys),
            "lora_pairs": sum(1 for k in adapter_keys if k.split(".")[-2] == "lora_A"),
            "modules_to_save": sorted(
                {
                    k.split(".")[-2]
                    for k in adapter_keys
                    if not any(f in k.split(".") for f in ("lora_A", "lora_B"))
                    and not k.endswith("lora_magnitude_vector")
                }
            ),
            "matches_checkpoint": cmp.equal,
            "max_abs_diff": cmp.max_abs_diff if not cmp.equal else 0.0,
            "comparison": cmp.as_dict(),
        }
        if not cmp.equal:
            warnings.append(
                f"the adapter folder {adapter.weights_path} differs from the checkpoint ({len(cmp.differing)} tensors "
                f"differ, max abs diff {cmp.max_abs_diff:.3g}; {len(cmp.only_checkpoint) + len(cmp.only_adapter)} "
                "keys in one only): it was probably saved at another step; convert needs --lora-from"
            )
    elif inputs.adapter_root is None:
        adapter_section = {"path": None, "keys": 0, "matches_checkpoint": None}
    section: dict[str, Any] = {
        "component": comp.name,
        "prefix": prefix,
        "adapters": [layout.adapter_name],
        "lora_pairs": len(layout.lora_modules),
        "target_modules": layout.target_names,
        "modules_to_save": layout.saved_names,
        "base_layers": layout.base_layers,
        "use_dora": layout.use_dora,
    }
    try:
        cfg, source = lora_config_from(layout, adapter, ckpt.hparams, str(inputs.checkpoint))
        section.update(
            r=cfg.r,
            alpha=cfg.lora_alpha,
            scaling_from=source,
            use_rslora=bool(cfg.use_rslora),
            rank_pattern=dict(cfg.rank_pattern or {}),
            alpha_pattern=dict(cfg.alpha_pattern or {}),
        )
    except ConvertError as exc:
        section.update(r=None, alpha=None, scaling_from=None)
        warnings.append(str(exc))
    return section, adapter_section


def _part_warnings(parts) -> list[str]:
    found = []
    for part in parts:
        tied = getattr(part, "_tied_config", lambda: False)()
        if tied and not part.tie:
            found.append(
                f"{part.comp.name}: the trained lm_head differs from embed_tokens under "
                "tie_word_embeddings: true; a plain reload would drop it; convert writes "
                "tie_word_embeddings: false and keeps both"
            )
        if "vocab_size_changed" in part.info:
            found.append(
                f"{part.comp.name}: the checkpoint's vocabulary has {part.info['vocab_size_changed']} rows, "
                "the base config another vocab_size; convert writes the checkpoint's"
            )
    return found


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
