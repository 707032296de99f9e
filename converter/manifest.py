"""What an export records about itself: the manifest (provenance, files, key accounting, verification) and the
model card. Both are built from the executed plan and the engines' results, and written last."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

from .discover import relative_to_run
from .hashing import path_bytes
from .names import MANIFEST, MANIFEST_FORMAT, MODEL_CARD, PREPROCESSOR_CONFIG, TOKENIZER_CONFIG, WEIGHTS
from .plan import PartPlan, Plan

log = logging.getLogger(__name__)

VERSIONED = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate")


@dataclasses.dataclass(frozen=True)
class PartResult:
    """One part as written: its plan as executed, and what writing and verifying it found."""

    part: PartPlan
    hashes: dict[str, str]  # file (relative to the part's folder) -> sha256 computed while writing
    copied_from_base: tuple[str, ...]
    verification: dict[str, Any] | None
    release: dict[str, Any] = dataclasses.field(default_factory=dict)  # processor, chat template, EOS ids


def versions() -> dict[str, str]:
    """ckpt2hf's own version and those of the libraries that shaped the export."""
    from .version import __version__

    found = {"ckpt2hf": __version__}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def source_record(plan: Plan) -> dict[str, Any]:
    """Where the export comes from: the run (by name), the checkpoint chosen and why, the adapter folder (both
    relative to the run)."""
    inputs = plan.inputs
    return {
        "run": inputs.run.resolve().name,
        "checkpoint": {
            "path": relative_to_run(inputs.checkpoint, inputs.run),
            "format": plan.checkpoint_format,
            "bytes": path_bytes(inputs.checkpoint),
            "epoch": plan.epoch,
            "global_step": plan.global_step,
            "lightning_version": plan.lightning_version,
            "chosen_because": inputs.reason,
            "layout": plan.checkpoint_layout,
            "frozen_excluded": plan.frozen_excluded,
        },
        "adapter_folder": relative_to_run(inputs.adapter_root, inputs.run) if inputs.adapter_root else None,
    }


def wrappers_record(plan: Plan) -> dict[str, Any]:
    outer = plan.outer
    return {
        "prefix": outer.prefix,
        "wrappers": list(outer.wrappers),
        "attribute": outer.attribute,
        "removed_anywhere": list(outer.removed),
    }


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
    merged_on: dict[str, str]  # {"device": "cpu"} or {"device": "cuda", "gpu": "NVIDIA H100 ..."}
    created: str
    adapter: dict[str, Any] | None
    components: dict[str, Any]
    keys: dict[str, Any]
    verification: dict[str, Any] | None
    versions: dict[str, str]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # options_record: what shaped the export
    adapter_out: dict[str, Any] | None = None  # --adapter-out: the PEFT folder written beside the export
    files: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    format: str = MANIFEST_FORMAT

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format": data.pop("format"), **data}

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(self.as_json(), indent=2) + "\n")


def device_record(device: Any) -> dict[str, str]:
    """Where the merge ran: ``{"device": "cpu"}``, or the GPU's name with ``cuda``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return {"device": device.type}


def build_manifest(
    plan: Plan,
    results: list[PartResult],
    identity: dict[str, Any],
    verified: bool,
    device: Any = "cpu",
    options: dict[str, Any] | None = None,
    adapter_identity: dict[str, Any] | None = None,
) -> Manifest:
    """``identity``: the checkpoint's ``identity`` record, and its ``sha256`` where it was computed; ``device``:
    where the merge ran; ``options``: ``options_record`` of the conversion; ``adapter_identity``: the adapter
    folder's identity record (a migration converts a run again when either identity changes)."""
    source = source_record(plan)
    source["checkpoint"].update(identity)
    if adapter_identity is not None:
        source["adapter_identity"] = adapter_identity
    adapter = next((r.part.adapter.facts() for r in results if r.part.adapter is not None), None)
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
            if r.part.base.revision:
                entry["base_revision"] = r.part.base.revision
        entry.update(r.release)
        if r.part.vocab_resized is not None:
            entry["vocab_size_changed"] = r.part.vocab_resized
        components[r.part.name] = entry
    return Manifest(
        config=plan.layout,
        source=source,
        wrappers=wrappers_record(plan),
        engine=plan.engine,
        merged_on=device_record(device),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        adapter=adapter,
        components=components,
        keys=accounting,
        verification={r.part.name: r.verification for r in results} if verified else None,
        versions=versions(),
        options=options or {},
    )


def base_license(plan: Plan) -> str | None:
    """The license a base's own model card states (its README.md front matter), the language model's first."""
    from huggingface_hub import ModelCard

    parts = sorted((p for p in plan.parts if p.base is not None), key=lambda p: p.comp.kind != "hf_causal_lm")
    for part in parts:
        card = part.base.path / MODEL_CARD
        if not card.is_file():
            continue
        try:
            license_ = ModelCard.load(card).data.license
        except Exception as exc:  # a base's card that does not parse only costs the license line
            log.debug("%s: no license read (%s)", card, exc)
            continue
        if license_:
            return str(license_)
    return None


def how_to_load(plan: Plan) -> str:
    """Python that loads every part of the export from its folder: the Hugging Face parts with their Auto classes
    (tokenizer and image processor included), the others as state_dicts for the training project's modules."""
    classes: set[str] = set()
    body = ['root = Path("EXPORT")  # this folder, e.g. huggingface_hub.snapshot_download("<repo id>")']
    for part in plan.parts:
        folder = f'root / "{part.out}"' if part.out else "root"
        var = part.name if part.name.isidentifier() else "part"
        if part.auto_class is None:
            body.append(f'{var}_state = load_file({folder} / "{WEIGHTS}")  # {var}.load_state_dict(...) in the project')
            continue
        classes.add(part.auto_class)
        body.append(f"{var} = {part.auto_class}.from_pretrained({folder})")
        if part.tokenizer is not None or TOKENIZER_CONFIG in part.support_files:
            classes.add("AutoTokenizer")
            body.append(f"tokenizer = AutoTokenizer.from_pretrained({folder})")
        if PREPROCESSOR_CONFIG in part.support_files:
            classes.add("AutoImageProcessor")
            body.append(f"image_processor = AutoImageProcessor.from_pretrained({folder})")
    imports = ["from pathlib import Path", ""]
    if any(p.auto_class is None for p in plan.parts):
        imports.append("from safetensors.torch import load_file")
    if classes:
        imports.append(f"from transformers import {', '.join(sorted(classes))}")
    return "\n".join([*imports, "", *body])


def write_model_card(folder: Path, manifest: Manifest, plan: Plan) -> None:
    """README.md (huggingface_hub's ModelCard): front matter with the bases, the library, tags and the base's
    license; what the export holds, how to load it, and where it came from."""
    from huggingface_hub import ModelCard, ModelCardData

    parts = sorted(plan.parts, key=lambda p: p.comp.kind != "hf_causal_lm")
    bases = list(dict.fromkeys(p.base.name for p in parts if p.base is not None))
    merged_tag = f"{manifest.adapter['peft_type'].lower()}-merged" if manifest.adapter else "fine-tuned"
    tags = ["ckpt2hf", merged_tag, "peft", "lightning"]
    if len(plan.parts) > 1:
        vision = any(hasattr(p.config, "image_size") for p in plan.parts if p.config is not None)
        tags.append("vision-language" if vision else "multi-part")
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        library_name="transformers",
        license=base_license(plan),
        tags=tags,
    )
    src = manifest.source["checkpoint"]
    adapter = manifest.adapter or {}
    rows = "\n".join(
        f"| `{name}` | `{c['path']}/` | {c.get('base', '-')} | {c['tensors']} | {', '.join(c['dtypes'])} |"
        for name, c in manifest.components.items()
    )
    if adapter:
        settings = ", ".join(f"{k}={v}" for k, v in adapter["parameters"].items() if not isinstance(v, (dict, list)))
        how = (
            "PEFT's `merge_and_unload`"
            if manifest.engine == "full"
            else "PEFT's own per-module merge, the call `merge_and_unload` makes for each adapted module"
        )
        merged = (
            f"{adapter['tuner']} adapter `{adapter['name']}` ({adapter['peft_type']}; {settings or 'PEFT defaults'}) "
            "on "
            f"{adapter['adapted_modules']} modules; merged with {how} ({manifest.engine} engine, on "
            f"{manifest.merged_on.get('gpu') or manifest.merged_on['device']}); tensors from the "
            f"{adapter['tensors_from']}, config from {adapter['config_from']}."
        )
    else:
        merged = "No adapter was present; the weights are the checkpoint's."
    identified = (
        f"sha256 `{src['sha256']}`"
        if "sha256" in src
        else f"identity `{src['identity']['digest']}` ({src['identity']['method']})"
    )
    version = manifest.versions.get("ckpt2hf", "unknown")
    run = (
        f"Run `{manifest.source['run']}`, checkpoint `{src['path']}` ({src['format']}): epoch {src['epoch']}, "
        f"global step {src['global_step']}; {identified}."
    )
    bare = [p.name for p in plan.parts if p.ships_no_tokenizer]
    no_tokenizer = (
        f"\n- No tokenizer ships with {', '.join(f'`{n}`' for n in bare)}: neither the run nor its base model had "
        "one. Load the tokenizer the model was trained with from where it is kept."
        if bare
        else ""
    )
    listed = (
        f"`{MANIFEST}` lists every file with its sha256 (`ckpt2hf verify` checks them), the key accounting and the "
        "verification figures."
    )
    content = f"""---
{data.to_yaml()}
---

# {manifest.source["run"]}

A Lightning run's fine-tune, exported by ckpt2hf {version}: each part is a folder of its own, plain Hugging Face
weights with no PEFT needed to load them.

| part | folder | base | tensors | dtypes |
|---|---|---|---|---|
{rows}

## How to load

```python
{how_to_load(plan)}
```

## Provenance

- {run}
- {merged}
- {listed}{no_tokenizer}
"""
    ModelCard(content).save(folder / MODEL_CARD)
