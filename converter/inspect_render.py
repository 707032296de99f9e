"""The human-readable ``inspect`` report: short sections with aligned tables (``--json`` prints the dict)."""

from __future__ import annotations

from typing import Any


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
    lines += ["", "layout"]
    lines += _rows([("layout", report["layout"]["name"]), ("found by", report["layout"]["found_by"])])
    w = report["wrappers"]
    lines += ["", "wrappers"]
    lines += _rows(
        [
            ("prefix", repr(w["prefix"])),
            ("attribute", str(w["attribute"])),
            ("wrappers", ", ".join(w["wrappers"]) or "none"),
            ("removed anywhere", ", ".join(w["removed_anywhere"]) or "none"),
        ]
    )
    for p in report["peft"]:
        lines += ["", f"peft: {p['component']}"]
        settings = p.get("parameters")
        shown = (
            ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, (dict, list))) if settings else ""
        )
        lines += _rows(
            [
                ("prefix", p["prefix"]),
                ("adapter", ", ".join(p["adapters"])),
                ("tuner", f"{p['tuner']} ({p['peft_type']})" if p["tuner"] else "unknown"),
                ("adapted", f"{p['adapted_modules']} modules"),
                ("targets", ", ".join(p["target_modules"])),
                (
                    "parameters",
                    f"{shown or 'PEFT defaults'} (from {p['config_from']})" if settings is not None else "unknown",
                ),
                ("modules_to_save", ", ".join(p["modules_to_save"]) or "none"),
                ("base layers", str(p["base_layers"]) + (" (PEFT before 0.7 names)" if p["legacy_peft_names"] else "")),
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
                ("adapted", f"{a['adapted_modules']} modules ({a['peft_type']})"),
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
        if "found_by" not in v:
            lines += _rows([("tokenizer", v["tokenizer"])])
            continue
        added = ", ".join(f"{t} ({i})" for t, i in v["added_tokens"].items()) or "none"
        rows = [
            ("tokenizer", f"{v['found_by']}: {v['tokens']} tokens"),
            ("added", added),
            ("embeddings", f"{v['embedding_rows']} rows (base vocab_size {v['base_vocab_size']})"),
            ("padding rows", f"{v['padding_rows']} (rows beyond the tokenizer: normal with pad_to_multiple_of)"),
        ]
        if v.get("embedding_adapter"):
            rows.append(("embedding adapter", ", ".join(v["embedding_adapter"])))
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
        lines += [
            f"  {p['component']}: written as {p['architecture']} ({p['auto_class']}, from {p['auto_class_from']})"
            for p in report["plan"]
            if p.get("architecture")
        ]
    lines += ["", "warnings"]
    lines += [f"  - {w}" for w in report["warnings"]] or ["  none"]
    return "\n".join(lines)
