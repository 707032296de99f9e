"""``convert``: a Lightning + PEFT run becomes a clean, verified Hugging Face export.

Pipeline: open the run (metadata only) -> plan -> settle what only data can tell (compare the adapter sources,
confirm a tie) -> for each part: engine writes the weights, config and support files are written, the engine's
result is verified -> manifest and model card (last) -> the staging folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import precision, prefetch, timings
from .engines import ENGINES
from .errors import ConvertError
from .hashing import take as take_source_hash
from .identity import source_identity
from .manifest import PartResult, build_manifest, plan_summary, write_model_card
from .options import ConvertOptions, options_record
from .peft import require_agreement, write_adapters
from .plan import Plan
from .planner import Opened, build_plan, open_run
from .policy import refuse_unchanged
from .release import complete_part
from .settle import settle, trained_copies_differ
from .writer import file_records, out_lock, refuse_existing, staged_output, write_config

log = logging.getLogger(__name__)

__all__ = ["ConvertOptions", "convert", "plan_run", "resolve_device"]


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


_DEVICE_TURN: Any = None  # a lock of the processes that share one GPU (a migration's --jobs): they merge in turn


def share_device(lock: Any) -> None:
    """Make this process's conversions merge on the GPU only while they hold ``lock`` (a multiprocessing lock that
    the other processes on the same GPU hold in turn), and give its cached memory back after each turn."""
    global _DEVICE_TURN
    _DEVICE_TURN = lock


@contextlib.contextmanager
def _device_turn(device: torch.device) -> Iterator[None]:
    if device.type != "cuda" or _DEVICE_TURN is None:
        yield
        return
    with _DEVICE_TURN:
        try:
            yield
        finally:
            torch.cuda.empty_cache()


def plan_run(opts: ConvertOptions) -> tuple[Plan, Opened]:
    """Open the run and plan the conversion (no tensor data read); the caller closes ``plan.sources`` (which
    holds ``Opened``'s too)."""
    opened = open_run(opts)
    try:
        return build_plan(opened, opts), opened
    except BaseException:
        opened.close()
        raise


def convert(opts: ConvertOptions, started: float | None = None) -> dict[str, Any]:
    """Convert ``opts.run`` into ``opts.out`` (default RUN/export) and return the manifest as a dict, with ``out``
    and ``timings`` (seconds per stage, see ``timings``; from ``started``, a ``perf_counter`` reading, if given).

    With ``dry_run`` nothing is read beyond metadata and nothing is written: the returned dict holds the plan. Bad
    input raises ConvertError; on any failure nothing is left at ``out`` (or the previous export stays, with
    ``force``).
    """
    with timings.recording(started) as clock:
        import_heavy_modules()
        clock.add("importing", time.perf_counter() - clock.started, clock.started)
        result = _plan_and_convert(opts)
        return result if opts.dry_run else {**result, "timings": clock.record()}


def import_heavy_modules() -> None:
    """Import what every conversion needs (PEFT, and transformers with it) now rather than on first use, so that
    the time it takes is counted as importing, not as planning."""
    import peft  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def _plan_and_convert(opts: ConvertOptions) -> dict[str, Any]:
    device = resolve_device(opts.device)
    if opts.out is not None and not opts.dry_run:
        refuse_existing(Path(opts.out), opts.force)  # before anything is read (checked again when writing)
    if opts.adapter_out is not None and not opts.dry_run:
        refuse_existing(Path(opts.adapter_out), opts.force)
    with timings.timed("planning"):
        plan, opened = plan_run(opts)
    prefetch.stop_all(wait=False)  # planned: from here the engine's reads, in its order, take the disk
    out = Path(opts.out) if opts.out else plan.inputs.run / "export"
    with plan.sources:
        if opts.dry_run:
            return plan_summary(plan, out)
        with out_lock(out):
            refuse_existing(out, opts.force)  # again, under the lock: another convert may have written it meanwhile
            return _convert(opts, plan, opened, out, device)


def _convert(opts: ConvertOptions, plan: Plan, opened: Opened, out: Path, device: torch.device) -> dict[str, Any]:
    sources = plan.sources
    identity = opened.checkpoint.identity()  # the zip records: milliseconds
    adapter_root = plan.inputs.adapter_root
    adapter_identity = source_identity(adapter_root).record() if adapter_root is not None else None
    # The full sha256 only when asked for (usually started by the CLI before the heavy imports).
    hasher = take_source_hash(plan.inputs.checkpoint) if opts.source_sha256 else None
    try:
        with timings.timed("planning"):
            plan = settle(plan)
        for part in plan.parts:
            if part.adapter is not None and part.adapter.comparison is not None:
                require_agreement(
                    part.adapter.comparison,
                    plan.lora_from,
                    str(part.adapter.adapter_folder),
                    str(plan.inputs.checkpoint),
                )
        engine = ENGINES[plan.engine](sources, device, opts.progress)
        with staged_output(out, opts.force) as stage, contextlib.ExitStack() as held:
            results, known = [], {}
            held.enter_context(_device_turn(device))
            for part in plan.parts:
                folder = stage / part.out if part.out else stage
                log.info("writing %s (%s engine)", part.name, engine.name)
                try:
                    written = engine.write(part, folder, opts.verify)
                except ConvertError:
                    # Checksums are checked on other threads while the data is used: a corrupt source explains
                    # what failed after it was read (a merge gone to NaN, say), and is what is reported.
                    sources.wait()
                    raise
                refuse_unchanged(
                    written.part,
                    lambda p=written.part: trained_copies_differ(p, sources),
                    written.part.adapter.adapter_folder if written.part.adapter else plan.inputs.checkpoint,
                )
                if written.part.tie is not None and written.part.tie.configured and not written.part.tied:
                    log.warning(
                        "%s: the trained lm_head differs from embed_tokens (%s); writing tie_word_embeddings false "
                        "and keeping both",
                        part.name,
                        written.part.tie.because,
                    )
                copied = write_config(written.part, folder, written.part.tied)
                release = complete_part(written.part, folder)
                verification = None
                if opts.verify:
                    log.info("verifying %s", part.name)
                    with timings.timed("verifying"):
                        verification = written.verify(folder)
                if written.precision:
                    dtype = next(t.dtype for t in written.part.tensors if t.name in written.precision)
                    release["precision"] = precision.summarize(part.name, dtype, written.precision)
                results.append(PartResult(written.part, written.hashes, tuple(copied), verification, release))
                known.update({f"{part.out}/{n}" if part.out else n: h for n, h in written.hashes.items()})
            held.close()  # the GPU's turn ends with the last part
            sources.wait()  # every checksum of what was read must hold before anything is committed
            identity.check_unchanged()
            source = {"identity": identity.record(), **({"sha256": hasher.result()} if hasher else {})}
            manifest = build_manifest(
                plan, results, source, opts.verify, device, options_record(opts), adapter_identity
            )
            with contextlib.ExitStack() as adapter_stage:
                if opts.adapter_out is not None:  # committed just before the export, removed if it fails
                    folder = adapter_stage.enter_context(staged_output(Path(opts.adapter_out), opts.force))
                    adapters = write_adapters(plan, sources, folder)
                    manifest = dataclasses.replace(
                        manifest, adapter_out={"folder": Path(opts.adapter_out).name, "parts": adapters}
                    )
                write_model_card(stage, manifest, plan)
                manifest = dataclasses.replace(manifest, files=file_records(stage, known))
                manifest.write(stage)
    except BaseException:
        if hasher is not None:
            hasher.cancel()
        raise
    return {**manifest.as_json(), "out": str(out)}
