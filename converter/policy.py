"""Export policy, shared by the planner and both engines so that they cannot drift apart: output dtypes, the cast
with its finiteness check, the tie decision, whether the checkpoint fits the model a config builds, and whether
the adapter changes anything at all."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ConvertError, preview
from .plan import Tie
from .sources import TensorInfo

log = logging.getLogger(__name__)

# Max abs logit difference allowed, relative to max(1, max |reference logit|), by the export's dtype; the
# streaming engine holds each merged layer's output to the same figures.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance(dtype: torch.dtype | None) -> float:
    return TOLERANCE.get(dtype or torch.float32, 1e-2)


def parse_dtype(name: str) -> torch.dtype | None:
    """``auto`` (None) or a floating dtype name such as ``bfloat16``."""
    if name == "auto":
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConvertError(f"--dtype {name}: not a floating dtype; use auto, float32, bfloat16 or float16")
    return dtype


def part_dtype(requested: str, hf_config: Any = None) -> torch.dtype | None:
    """The dtype floating tensors are written in: ``--dtype``, else the base config's, else None (the source's)."""
    explicit = parse_dtype(requested)
    if explicit is not None or hf_config is None:
        return explicit
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def output_dtype(part: torch.dtype | None, source: torch.dtype) -> torch.dtype:
    """A floating tensor takes the part's dtype; integer tensors and parts without one keep the source's."""
    return part if part is not None and source.is_floating_point else source


def _finite(tensor: torch.Tensor) -> bool:
    """All values finite, in one pass without a bool tensor. NaN and Inf propagate through a sum, so a finite sum
    proves it (the fastest reduction for float32/64); a sum that overflows, and the 16-bit dtypes (whose sums are
    slow or overflow), go to min/max, which any NaN reaches and where an Inf shows at an end."""
    if tensor.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(tensor.sum())):
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def cast_checked(key: str, tensor: torch.Tensor, dtype: torch.dtype, where: Path | str) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` (no copy when it has it already); NaN/Inf in it, or an overflow from the cast,
    is a ConvertError naming ``key``."""
    after = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not after.is_floating_point() or after.numel() == 0 or _finite(after):
        return after
    if bool(torch.isfinite(tensor).all()):
        peak = float(tensor.abs().max())
        raise ConvertError(
            f"{where}: {key} overflows {str(after.dtype).removeprefix('torch.')} (max abs {peak:.4g}); "
            "use --dtype bfloat16 or float32"
        )
    bad = int((~torch.isfinite(tensor)).sum())
    raise ConvertError(
        f"{where}: {key} holds {bad} NaN/Inf values after the merge; the trained weights are broken "
        "(check the checkpoint's LoRA tensors for this module)"
    )


def configured_tie(hf_config: Any) -> bool:
    return bool(getattr(hf_config.get_text_config(decoder=True), "tie_word_embeddings", False))


def plan_tie(
    hf_config: Any,
    head: str | None,
    embed: str | None,
    plain: Mapping[str, Any],
    merged: set[str],
    info: Callable[[str], TensorInfo],
) -> Tie:
    """Decide from metadata whether lm_head stays tied to the embeddings. A trained head (other values) is kept.

    Settled here when the config does not tie, when the checkpoint has no lm_head, or when the stored CRC-32s of
    the two differ (different bytes). Otherwise the values decide (``settled`` False): before writing, or after the
    merge when LoRA changes either of them.
    """
    configured = configured_tie(hf_config)
    if head is None:  # a classifier, an encoder: nothing to tie, whatever the config says
        return Tie(False, False, True, "the model has no output embeddings", head, embed)
    if not configured:
        return Tie(configured, False, True, "the config does not tie them", head, embed)
    if head not in plain:
        return Tie(configured, True, True, "the checkpoint has no lm_head", head, embed)
    if head in merged or embed in merged:
        return Tie(configured, True, False, "LoRA on the embeddings: decided after the merge", head, embed, True)
    a, b = info(head), info(embed)
    if a.shape == b.shape and a.dtype == b.dtype and None not in (a.crc32, b.crc32) and a.crc32 != b.crc32:
        # (Only +0.0 against -0.0 could differ in bytes and not in value; keeping both then is merely redundant.)
        return Tie(configured, False, True, "their stored CRC-32s differ", head, embed)
    if a.shape != b.shape:
        return Tie(configured, False, True, "their shapes differ", head, embed)
    return Tie(configured, True, False, "to be compared by value", head, embed)


def settled_tie(tie: Tie, equal: bool, how: str) -> Tie:
    """The tie once the values are known (``how``: "compared by value", "after the merge"): tied only if lm_head
    equals the embeddings."""
    return Tie(tie.configured, equal, True, how, tie.head, tie.embed)


def _differences(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], optional: set[str]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, "key (given) vs (expected)" for other shapes), each sorted."""
    missing = sorted(set(expected) - set(given) - optional)
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k} {given[k]} vs {expected[k]}" for k in sorted(set(given) & set(expected)) if given[k] != expected[k]]
    return missing, unexpected, wrong


def check_fit(
    expected: Mapping[str, tuple[int, ...]],
    planned: Mapping[str, tuple[int, ...]],
    optional: set[str],
    where: str,
    config_path: Path,
    comp: str,
    auto_class: str | None = None,
) -> None:
    """The tensors to write must be exactly those of the model the config builds, with the same shapes
    (``optional``: keys the model may lack in the checkpoint, such as a tied lm_head; ``auto_class``: the class
    built, named in the advice when the checkpoint holds tensors it has no place for, such as another task's head)."""
    missing, unexpected, wrong = _differences(expected, planned, optional)
    if not (missing or unexpected or wrong):
        return
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors have other shapes than the config gives ({preview(wrong, 2)})")
    if missing:
        problems.append(f"{len(missing)} tensors of the model are not in the checkpoint ({preview(missing, 3)})")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors have no place in the model ({preview(unexpected, 3)})")
    other_task = f", or --auto-class CLASS if the run trained no {auto_class}" if unexpected and auto_class else ""
    raise ConvertError(
        f"{where} does not fit {config_path}: {'; '.join(problems)}; pass --base {comp}=PATH with the config the "
        f"model was trained with{other_task}"
    )


# --- does the merge change anything ----------------------------------------------------------------------------
SAMPLES = 256  # elements of each merged parameter compared before and after its merge


def sample(params: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A fixed sample of each parameter's elements, taken before the merge: (flat indices, values)."""
    found = {}
    for name, param in params.items():
        flat = param.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        generator = torch.Generator().manual_seed(flat.numel())
        idx = torch.randint(0, flat.numel(), (min(SAMPLES, flat.numel()),), generator=generator).to(flat.device)
        found[name] = (idx, flat[idx].clone())
    return found


def changed(params: Mapping[str, torch.Tensor], before: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the merge changed a sampled element (exact). False means "perhaps not": ``unchanged`` decides."""
    return any(
        not torch.equal(params[name].detach().reshape(-1)[idx], values) for name, (idx, values) in before.items()
    )


def unchanged(params: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor]) -> bool:
    """Whether every merged parameter equals its value before the merge, element for element."""
    return all(
        torch.equal(params[name].detach().float(), originals[name].to(params[name].device).float())
        for name in originals
    )


def refuse_unchanged(part: Any, trained_copies_differ: Callable[[], bool], where: object) -> None:
    """An adapter whose every unit changed nothing, with no trained copy or token rows either, would ship the base
    model under a fine-tune's name: refused. Units that changed nothing beside others that did are a warning."""
    adapter = part.adapter
    if adapter is None or not adapter.units:
        return
    idle = adapter.idle
    if len(idle) == len(adapter.units) and not adapter.layout.token_modules and not trained_copies_differ():
        raise ConvertError(
            f"{where}: the adapter changes nothing in {part.name}: all {len(idle)} adapted modules are unchanged by "
            "the merge (never trained, or saved from one rank of a sharded run) and no trained copy differs; the "
            "export would be the base model under a fine-tune's name; convert the checkpoint that holds the training"
        )
    if idle:
        log.warning(
            "%s: %d of %d adapted modules are unchanged by the merge (never trained, or saved from one rank of a "
            "sharded run): %s",
            part.name,
            len(idle),
            len(adapter.units),
            preview(list(idle), 3),
        )
