"""Building the plan from metadata alone: key names, shapes, dtypes, stored checksums, hyper-parameters, the
layout config, the base configs and the adapter's config. No tensor data is read here.

``open_run`` opens everything the plan is made from (the checkpoint, the adapter folder) and is never changed
afterwards; ``build_plan`` plans each component (``part_planner``) and returns a plan that holds every source it
refers to, those it opened itself (base weights, dequantized 4-bit weights, state PEFT regenerates) included.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from .discover import RunInputs, find_inputs
from .errors import ConvertError, preview
from .keymap import Discovered, Split, discover_layout, split_components
from .layout import AUTO, LayoutConfig, builtin_layouts, load_layout
from .names import ADAPTER, CHECKPOINT
from .options import ConvertOptions
from .part_planner import AUTO_CLASS, PartPlanner
from .peft import component_keys
from .plan import PartPlan, Plan
from .sources import AdapterFolder, Checkpoint, Sources, SpanReader, find_adapter_folder, open_adapter_folder
from .sources import open_checkpoint as open_checkpoint_file

log = logging.getLogger(__name__)

STREAM_ABOVE = 1 << 30  # float32 bytes of a part above which auto streams even when memory would allow the full engine


@dataclasses.dataclass(frozen=True)
class Opened:
    """A run's inputs, opened for planning: metadata read and tensors located, nothing else."""

    inputs: RunInputs
    checkpoint: Checkpoint
    layout: LayoutConfig
    split: Split
    sources: Sources  # "checkpoint", and "adapter" when the run has an adapter folder
    adapter: AdapterFolder | None = None  # the run's adapter folder
    layout_evidence: str = ""  # how the layout was chosen (--config, or discovered from the keys)

    def close(self) -> None:
        self.sources.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _adapter_names(split: Split) -> set[str]:
    """The adapter names the checkpoint's PEFT components use (to choose lora_weights/<name>/)."""
    names = set()
    for comp, keys in split.keys.items():
        try:
            found = component_keys(keys, comp).peft
        except ConvertError:
            continue  # the planner reports it, with its context
        if found is not None:
            names.add(found.adapter_name)
    return names


def open_run(opts: ConvertOptions) -> Opened:
    """Find the inputs, open the checkpoint lazily, sort its keys by component and open the adapter folder."""
    inputs = find_inputs(opts.run, opts.ckpt, opts.adapter_dir)
    log.info("checkpoint: %s (%s)", inputs.checkpoint, inputs.reason)
    log.info("adapter folder: %s", inputs.adapter_root or "none")
    reader = SpanReader(opts.chunk_bytes, opts.pool_bytes)
    try:
        checkpoint = open_checkpoint_file(inputs.checkpoint, reader)
        keys = list(checkpoint.source.keys())
        if opts.config == AUTO:
            discovered = discover_layout(keys, builtin_layouts())
        else:
            layout = load_layout(opts.config)
            discovered = Discovered(layout, split_components(keys, layout), {}, given=True)
        layout, split = discovered.layout, discovered.split
        sources = {CHECKPOINT: checkpoint.source}
        adapter = None
        if inputs.adapter_root is not None:
            names = _adapter_names(split)
            folder = find_adapter_folder(inputs.adapter_root, next(iter(names)) if len(names) == 1 else None)
            if folder is not None and names:
                adapter = open_adapter_folder(folder, reader)
                sources[ADAPTER] = adapter.source
    except BaseException:
        reader.close()
        raise
    log.info("layout: %s (%s)", layout.name, discovered.evidence)
    log.info(
        "outer prefix %r (wrappers: %s; attribute: %s)",
        split.outer.prefix,
        ", ".join(split.outer.wrappers) or "none",
        split.outer.attribute or "none",
    )
    return Opened(inputs, checkpoint, layout, split, Sources(reader, sources), adapter, discovered.evidence)


def build_plan(opened: Opened, opts: ConvertOptions) -> Plan:
    """Plan every part of the export (see ``plan``); ConvertError for anything that cannot be converted as given.
    The plan's ``sources`` are ``opened.sources`` and the ones planning opened; closing them closes both."""
    split, layout = opened.split, opened.layout
    split.raise_for_unclaimed(layout)
    unknown = sorted(set(opts.bases) - {c.name for c in layout.components})
    if unknown:
        raise ConvertError(f"--base {unknown[0]}=...: no component named {unknown[0]} in {layout.path.name}")
    sources = opened.sources.extended()
    parts = []
    for comp in layout.components:
        keys = split.keys[comp.name]
        if not keys and AUTO_CLASS[comp.kind] is None:  # a module of the project's own: no base to fill it from
            raise ConvertError(
                f"{opened.inputs.checkpoint}: the checkpoint holds no tensor of {comp.name} (keys under "
                f"{split.outer.prefix}{comp.prefix}) and it has no base model to read them from; pass --config with a "
                f"layout that does not list {comp.name}, or a checkpoint that saved it"
            )
        parts.append(PartPlanner(comp, keys, opened, opts, sources).plan())
    ckpt = opened.checkpoint
    plan = Plan(
        inputs=opened.inputs,
        checkpoint_format=ckpt.format,
        epoch=ckpt.epoch,
        global_step=ckpt.global_step,
        lightning_version=ckpt.lightning_version,
        layout=layout.name,
        outer=split.outer,
        dropped={reason: tuple(keys) for reason, keys in split.dropped.items()},
        parts=tuple(parts),
        lora_from=opts.lora_from,
        checkpoint_layout=dict(ckpt.layout),
        frozen_excluded=ckpt.frozen_excluded,
        sources=sources,
    )
    engine = choose_engine(opts, plan.parts)
    refuse_streaming(plan.parts, engine)
    return dataclasses.replace(plan, engine=engine)


def choose_engine(opts: ConvertOptions, parts: tuple[PartPlan, ...]) -> str:
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
    largest = _largest_part(parts)
    if any(p.adapter is not None and p.adapter.base_dependent != () for p in parts) and 3 * largest <= limit:
        # The merge reads (or may read: untested) state PEFT computes from the base weights when it builds the model
        # (PSOFT): only the whole model, built as for training, has it as training had it.
        return "full"
    return "streaming" if largest > STREAM_ABOVE or 3 * largest > limit else "full"


def _largest_part(parts: tuple[PartPlan, ...]) -> int:
    """float32 bytes of the largest part."""
    return max((sum(t.numel for t in p.candidates) * 4 for p in parts), default=0)


PROCESS_BYTES = 1 << 30  # a conversion's process before any tensor: torch, transformers and PEFT imported


def peak_memory(plan: Plan, opts: ConvertOptions) -> int:
    """The memory a conversion of ``plan`` plans for, in bytes (what a Ray task of a migration reserves): the full
    engine about 3x the float32 bytes of the largest part, the streaming engine its buffer pool and a few copies of
    the largest tensor."""
    if plan.engine == "full":
        return PROCESS_BYTES + 3 * _largest_part(plan.parts)
    biggest = max((t.numel * 4 for p in plan.parts for t in p.candidates), default=0)
    return PROCESS_BYTES + opts.pool_bytes + 4 * biggest


def refuse_streaming(parts: tuple[PartPlan, ...], engine: str) -> None:
    """The streaming engine cannot rebuild state PEFT computes from the base weights of the whole model."""
    if engine != "streaming":
        return
    for part in parts:
        if part.adapter is not None and part.adapter.base_dependent:
            raise ConvertError(
                f"{part.name}: the {part.adapter.title} adapter's merge reads state PEFT computes from the base "
                f"weights when it builds the model ({preview(list(part.adapter.base_dependent), 2)}); the streaming "
                "engine builds one module at a time and cannot have it; use --engine full"
            )


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
