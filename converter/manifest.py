"""What an export records about itself: the manifest (provenance, files, key accounting, verification) and the
model card. Both are built from the executed plan and the engines' results, and written last."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from .hashing import path_bytes
from .names import MANIFEST, MANIFEST_FORMAT, MODEL_CARD
from .plan import PartPlan, Plan

VERSIONED = ("ckpt2hf", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate")


@dataclasses.dataclass(frozen=True)
class PartResult:
    """One part as written: its plan as executed, and what writing and verifying it found."""

    part: PartPlan
    hashes: dict[str, str]  # file (relative to the part's folder) -> sha256 computed while writing
    copied_from_base: tuple[str, ...]
    verification: dict[str, Any] | None


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def source_record(plan: Plan) -> dict[str, Any]:
    """Where the export comes from: the run, the checkpoint chosen and why, the adapter folder."""
    inputs = plan.inputs
    return {
        "run": str(inputs.run.resolve()),
        "checkpoint": {
            "path": _relative(inputs.checkpoint, inputs.run),
            "format": plan.checkpoint_format,
            "bytes": path_bytes(inputs.checkpoint),
            "epoch": plan.epoch,
            "global_step": plan.global_step,
            "lightning_version": plan.lightning_version,
            "chosen_because": inputs.reason,
            "layout": plan.checkpoint_layout,
            "frozen_excluded": plan.frozen_excluded,
        },
        "adapter_folder": _relative(inputs.adapter_root, inputs.run) if inputs.adapter_root else None,
    }


def wrappers_record(plan: Plan) -> dict[str, Any]:
    outer = plan.outer
    return {"prefix": outer.prefix, "wrappers": list(outer.wrappers), "attribute": outer.attribute}


def plan_summary(plan: Plan, out: Path) -> dict[str, Any]:
    """What ``convert --dry-run`` prints (``--json``: this dict)."""
    return {
        "format": MANIFEST_FORMAT,
        "config": plan.layout,
        "source": source_record(plan),
        "wrappers": wrappers_record(plan),
        "plan": [p.summary() for p in plan.parts],
        "engine": plan.engine,
        "dry_run": True,
        "out": str(out),
    }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json``: every file with its bytes and sha256, where each came from, and how it was checked."""

    config: str
    source: dict[str, Any]
    wrappers: dict[str, Any]
    engine: str
    created: str
    adapter: dict[str, Any] | None
    components: dict[str, Any]
    keys: dict[str, Any]
    verification: dict[str, Any] | None
    versions: dict[str, str]
    files: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    format: str = MANIFEST_FORMAT

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format": data.pop("format"), **data}

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(self.as_json(), indent=2) + "\n")


def build_manifest(plan: Plan, results: list[PartResult], identity: dict[str, Any], verified: bool) -> Manifest:
    """``identity``: the checkpoint's ``identity`` record, and its ``sha256`` where it was computed."""
    source = source_record(plan)
    source["checkpoint"].update(identity)
    adapter = next((r.part.lora.facts() for r in results if r.part.lora is not None), None)
    accounting: dict[str, Any] = {
        "source_keys": sum(len(r.part.keys) for r in results) + sum(len(v) for v in plan.dropped.values())
    }
    for r in results:
        accounting[r.part.name] = r.part.accounting()
    if plan.dropped:
        accounting["dropped_by_config"] = {reason: len(keys) for reason, keys in plan.dropped.items()}
    components = {}
    for r in results:
        summary = r.part.summary()
        entry = {"path": summary.pop("out"), **{k: v for k, v in summary.items() if k != "component"}}
        if r.part.base is not None:
            entry["copied_from_base"] = list(r.copied_from_base)
            entry["base_config_from"] = r.part.base.found_by
        if r.part.vocab_resized is not None:
            entry["vocab_size_changed"] = r.part.vocab_resized
        components[r.part.name] = entry
    return Manifest(
        config=plan.layout,
        source=source,
        wrappers=wrappers_record(plan),
        engine=plan.engine,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        adapter=adapter,
        components=components,
        keys=accounting,
        verification={r.part.name: r.verification for r in results} if verified else None,
        versions=versions(),
    )


def write_model_card(folder: Path, manifest: Manifest, plan: Plan) -> None:
    """README.md with YAML front matter (huggingface_hub's ModelCard) and the provenance."""
    from huggingface_hub import ModelCard, ModelCardData

    lm = next((p for p in plan.parts if p.comp.kind == "hf_causal_lm"), None)
    # A hub id is a valid base_model; a local folder is not.
    base_id = lm.base.hub_id if lm is not None and lm.base is not None else None
    data = ModelCardData(
        base_model=base_id, library_name="transformers", tags=["ckpt2hf", "lora-merged", "peft", "lightning"]
    )
    src = manifest.source["checkpoint"]
    adapter = manifest.adapter or {}
    rows = "\n".join(
        f"| `{name}` | `{c['path']}` | {c['kind']} | {c['tensors']} | {', '.join(c['dtypes'])} |"
        for name, c in manifest.components.items()
    )
    lora = (
        (
            f"LoRA adapter `{adapter['name']}` (r={adapter['r']}, alpha={adapter['alpha']}, "
            f"rsLoRA={adapter['use_rslora']}, DoRA={adapter['use_dora']}) merged with PEFT's `merge_and_unload`; "
            f"tensors from the {adapter['tensors_from']}, config from {adapter['config_from']}."
        )
        if adapter
        else "No LoRA adapter was present."
    )
    identified = (
        f"sha256 `{src['sha256']}`"
        if "sha256" in src
        else f"identity `{src['identity']['digest']}`, the " + src["identity"]["method"]
    )
    content = f"""---
{data.to_yaml()}
---

# Export of a Lightning run

Converted by ckpt2hf from `{src["path"]}` (epoch {src["epoch"]}, global step {src["global_step"]},
{identified}). {lora}

| component | folder | kind | tensors | dtypes |
|---|---|---|---|---|
{rows}

`{MANIFEST}` lists every file with its sha256, the key accounting and the verification figures.
"""
    ModelCard(content).save(folder / MODEL_CARD)
