"""``convert``: a Lightning + PEFT run becomes a clean, verified Hugging Face export.

Pipeline: find inputs -> read lazily -> split keys by component -> prepare each part (plan) -> write into a
staging folder -> verify -> model card and manifest (last) -> rename into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .components import PART_KINDS, Context, Part
from .config import LayoutConfig, load_config
from .discover import RunInputs, find_inputs
from .errors import ConvertError
from .hashing import take as take_source_hash
from .keymap import Split, split_components
from .lazy import SpanReader
from .reader import Checkpoint, read_checkpoint
from .writer import file_records, staged_output

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ckpt2hf.manifest/1"
VERSIONED = ("ckpt2hf", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate")


@dataclasses.dataclass
class ConvertOptions:
    """Everything ``convert`` takes; the CLI maps its flags one to one onto these fields."""

    run: Path
    out: Path | None = None
    ckpt: Path | None = None
    config: str = "panorama_vlm"
    adapter_dir: Path | None = None
    lora_from: str = "auto"  # auto | checkpoint | adapter
    bases: dict[str, Path] = dataclasses.field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    max_shard_size: str = "5GB"
    progress: bool = True
    verify_crc: bool = True  # check the zip's CRC-32 of the weight records the conversion reads
    engine: str = "auto"  # auto | full | streaming
    max_memory: str | int | None = None  # the auto engine streams when the full engine would need more


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when one is present; ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConvertError(f"--device {name}: not a device; use auto, cpu or cuda") from exc


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


@dataclasses.dataclass
class Prepared:
    """A conversion planned but not run: inputs read, keys split, every part prepared."""

    inputs: RunInputs
    checkpoint: Checkpoint
    config: LayoutConfig
    split: Split
    parts: list[Part]
    summary: dict[str, Any]
    reader: SpanReader  # open file handles for chunked reads; close() when done


def prepare(opts: ConvertOptions) -> Prepared:
    """Find and read the inputs, split the keys and prepare every part; nothing is merged or written."""
    inputs = find_inputs(opts.run, opts.ckpt, opts.adapter_dir)
    log.info("checkpoint: %s (%s)", inputs.checkpoint, inputs.reason)
    log.info("adapter folder: %s", inputs.adapter_root or "none")
    checkpoint = read_checkpoint(inputs.checkpoint, verify_crc=False)  # the engines check what they read
    config = load_config(opts.config)
    split = split_components(checkpoint.tensors.keys(), config)
    split.raise_for_unclaimed(config)
    log.info(
        "outer prefix %r (wrappers: %s; attribute: %s)",
        split.outer.prefix,
        ", ".join(split.outer.wrappers) or "none",
        split.outer.attribute or "none",
    )
    ctx = Context(
        hparams=checkpoint.hparams,
        checkpoint_path=inputs.checkpoint,
        adapter_root=inputs.adapter_root,
        bases=dict(opts.bases),
        lora_from=opts.lora_from,
        dtype=opts.dtype,
        device=resolve_device(opts.device),
        max_shard_size=opts.max_shard_size,
        progress=opts.progress,
        run=inputs.run,
        spans=checkpoint.spans,
        reader=SpanReader(),  # pageable buffers: pinning each chunk costs more than the copies it speeds up
    )
    try:
        return _prepare_parts(opts, inputs, checkpoint, config, split, ctx)
    except BaseException:
        ctx.reader.close()
        raise


def _prepare_parts(opts, inputs, checkpoint, config, split, ctx) -> Prepared:
    unknown = sorted(set(opts.bases) - {c.name for c in config.components})
    if unknown:
        raise ConvertError(f"--base {unknown[0]}=...: no component named {unknown[0]} in {config.path.name}")
    parts: list[Part] = []
    for comp in config.components:
        keys = split.keys[comp.name]
        if not keys:
            log.warning("component %s: the checkpoint has no keys for it; skipped", comp.name)
            continue
        parts.append(PART_KINDS[comp.kind](comp, keys, checkpoint.tensors, ctx))

    source = {
        "run": str(inputs.run.resolve()),
        "checkpoint": {
            "path": _relative(inputs.checkpoint, inputs.run),
            "format": checkpoint.format,
            "bytes": inputs.checkpoint.stat().st_size,
            "epoch": checkpoint.epoch,
            "global_step": checkpoint.global_step,
            "lightning_version": checkpoint.lightning_version,
            "chosen_because": inputs.reason,
        },
        "adapter_folder": _relative(inputs.adapter_root, inputs.run) if inputs.adapter_root else None,
    }
    summary: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "config": config.name,
        "source": source,
        "wrappers": {
            "prefix": split.outer.prefix,
            "wrappers": list(split.outer.wrappers),
            "attribute": split.outer.attribute,
        },
        "plan": [p.plan() for p in parts],
    }
    return Prepared(inputs, checkpoint, config, split, parts, summary, ctx.reader)


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Convert ``opts.run`` into ``opts.out`` (default RUN/export) and return the manifest.

    With ``dry_run`` nothing is written and the returned dict holds the plan. Bad input raises ConvertError;
    on any failure nothing is left at ``out`` (or the previous export stays, with ``force``).
    """
    prepared = prepare(opts)
    with prepared.reader:
        return _convert(opts, prepared)


STREAM_ABOVE = 1 << 30  # float32 bytes of a part above which auto streams even when memory would allow the full engine


def choose_engine(opts: ConvertOptions, parts: list[Part]) -> str:
    """``streaming`` for a part over 1 GiB in float32 or when the whole-model engine would need more than
    ``max_memory`` (default: half the RAM); ``full`` otherwise (small models: it also compares logits end to end)."""
    if opts.engine in ("full", "streaming"):
        return opts.engine
    if opts.engine != "auto":
        raise ConvertError(f"--engine {opts.engine}: use auto, full or streaming")
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        limit = parse_size_to_int(opts.max_memory) if opts.max_memory else _ram() // 2
    except ValueError as exc:
        raise ConvertError(f"--max-memory {opts.max_memory}: not a size; use e.g. 8GB") from exc
    # The full engine holds the float32 model, the merged copy being cast and the output: about 3x float32.
    largest = max((sum(t.numel() for t in p.planned().values()) * 4 for p in parts), default=0)
    return "streaming" if largest > STREAM_ABOVE or 3 * largest > limit else "full"


def _ram() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _convert(opts: ConvertOptions, prepared: Prepared) -> dict[str, Any]:
    inputs, split, parts, summary = prepared.inputs, prepared.split, prepared.parts, prepared.summary
    source = summary["source"]
    out = Path(opts.out) if opts.out else inputs.run / "export"
    engine = choose_engine(opts, parts)
    summary["engine"] = engine
    if opts.dry_run:
        summary["dry_run"] = True
        summary["out"] = str(out)
        return summary
    reader = prepared.reader
    hasher = take_source_hash(inputs.checkpoint)  # usually started by the CLI before the heavy imports
    try:
        if opts.verify_crc and engine == "full":
            for span in prepared.checkpoint.spans.values():
                reader.check_record(span)
        with staged_output(out, opts.force) as stage:
            known: dict[str, str] = {}
            for part in parts:
                folder = stage / part.comp.out if part.comp.out else stage
                log.info("writing %s (%s engine)", part.comp.name, engine)
                part.write(folder, reference=opts.verify, engine=engine)
                for name, digest in getattr(part, "written_hashes", {}).items():
                    known[f"{part.comp.out}/{name}" if part.comp.out else name] = digest
                if opts.verify:
                    log.info("verifying %s", part.comp.name)
                    part.verify(folder)
            reader.wait_crc()  # every CRC-32 of what was read must hold before anything is committed
            source["checkpoint"]["sha256"] = hasher.result()
            manifest = _manifest(summary, parts, split, opts)
            _write_model_card(stage, manifest, parts)
            manifest["files"] = file_records(stage, known)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        hasher.cancel()
        raise
    manifest["out"] = str(out)
    return manifest


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _manifest(summary: dict[str, Any], parts: list[Part], split: Any, opts: ConvertOptions) -> dict[str, Any]:
    adapter = next((dataclasses.asdict(p.adapter_facts) for p in parts if getattr(p, "adapter_facts", None)), None)
    accounting: dict[str, Any] = {
        "source_keys": sum(len(p.keys) for p in parts) + sum(len(v) for v in split.dropped.values())
    }
    for p in parts:
        accounting[p.comp.name] = p.accounting()
    if split.dropped:
        accounting["dropped_by_config"] = {reason: len(keys) for reason, keys in split.dropped.items()}
    summary = {k: v for k, v in summary.items() if k != "plan"}  # the components below carry it
    return {
        **summary,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "adapter": adapter,
        "components": {
            p.comp.name: {
                "path": p.comp.out or ".",
                **_without(p.plan(), "component", "out"),
                **p.info,
                **({"base_config_from": p.base_from} if hasattr(p, "base_from") else {}),
            }
            for p in parts
        },
        "keys": accounting,
        "verification": {p.comp.name: p.verification for p in parts} if opts.verify else None,
        "versions": versions(),
    }


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _write_model_card(stage: Path, manifest: dict[str, Any], parts: list[Part]) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    lm = next((p for p in parts if p.comp.kind == "hf_causal_lm"), None)
    from_hub = lm is not None and lm.base_from.endswith("(Hugging Face cache)")
    base_id = _hub_id(lm) if from_hub else None  # a local folder is no valid base_model
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        tags=["ckpt2hf", "lora-merged", "peft", "lightning"],
    )
    src = manifest["source"]["checkpoint"]
    adapter = manifest.get("adapter") or {}
    rows = "\n".join(
        f"| `{name}` | `{c['path']}` | {c['kind']} | {c['tensors']} | {', '.join(c['dtypes'])} |"
        for name, c in manifest["components"].items()
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
    content = f"""---
{data.to_yaml()}
---

# Export of a Lightning run

Converted by ckpt2hf from `{src["path"]}` (epoch {src["epoch"]}, global step {src["global_step"]},
sha256 `{src.get("sha256", "")}`). {lora}

| component | folder | kind | tensors | dtypes |
|---|---|---|---|---|
{rows}

`manifest.json` lists every file with its sha256, the key accounting and the verification figures.
"""
    ModelCard(content).save(stage / "README.md")


def _hub_id(part: Part) -> str | None:
    for hp in part.comp.base:
        value = part.ctx.hparams.get(hp)
        if isinstance(value, str):
            return value
    return None
