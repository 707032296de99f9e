"""Checks that read data: before writing, what the plan left to the values (``settle``); after writing, that each
folder loads cleanly and matches its sources (``load_clean``, ``compare_logits``, ``exact_copies``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .errors import ConvertError, preview
from .lora import compare_sources
from .names import WEIGHTS, WEIGHTS_INDEX
from .plan import PartPlan, Plan
from .policy import settled_tie, tolerance
from .sources import Sources

log = logging.getLogger(__name__)


# --- before writing ----------------------------------------------------------------------------------------------
def settle(plan: Plan, sources: Sources) -> Plan:
    """The plan with what only data can tell filled in: the checkpoint's LoRA tensors compared with the adapter
    folder's (``LoraPlan.comparison``), and a tie that the stored checksums could not decide, decided by value."""
    return dataclasses.replace(plan, parts=tuple(_settle_part(part, sources) for part in plan.parts))


def _settle_part(part: PartPlan, sources: Sources) -> PartPlan:
    lora, tie = part.lora, part.tie
    if lora is not None and lora.pairing is not None:
        comparison = compare_sources(lora.pairing, part.keys, sources)
        log.info(
            "LoRA sources: checkpoint and %s %s",
            lora.adapter_folder,
            "agree" if comparison.equal else f"differ; using the {lora.tensors_from}",
        )
        lora = dataclasses.replace(lora, comparison=comparison)
    if tie is not None and not tie.settled and not tie.after_merge:
        head, embed = (part.inputs[part.plain[k]] for k in (tie.head, tie.embed))
        tie = settled_tie(tie, sources.equal(head, embed)[0], "compared by value")
    return dataclasses.replace(part, lora=lora, tie=tie)


# --- after writing -----------------------------------------------------------------------------------------------
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _capture_transformers_warnings():
    logger = logging.getLogger("transformers")
    handler = _Capture()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def load_clean(folder: Path, auto_class: str, device: torch.device, device_map: str | None = None) -> nn.Module:
    """``from_pretrained(output_loading_info=True)`` in float32; any missing, unexpected or mismatched key, or a
    printed load report, is a ConvertError. ``device_map="meta"`` checks names and shapes without reading data."""
    import transformers

    cls = getattr(transformers, auto_class)
    with _capture_transformers_warnings() as warned:
        model, info = cls.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, device_map=device_map, local_files_only=True
        )
    problems = {
        k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    reports = [m for m in warned if "LOAD REPORT" in m]
    if problems or reports:
        detail = "; ".join(f"{k}: {preview([str(x) for x in v], 3)}" for k, v in problems.items()) or "a load report"
        raise ConvertError(f"{folder}: {auto_class}.from_pretrained does not load the export cleanly ({detail})")
    return model.eval() if device_map == "meta" else model.to(device).eval()


def compare_logits(reference: torch.Tensor, exported: torch.Tensor, dtype: torch.dtype, where: str) -> dict[str, Any]:
    """Max abs difference between the unmerged model's logits and the export's, against the dtype's tolerance
    relative to max(1, max |reference logit|); over tolerance is an error."""
    diff = float((reference.float() - exported.float()).abs().max())
    tol = tolerance(dtype) * max(1.0, float(reference.abs().max()))
    if not diff <= tol:  # also catches NaN
        raise ConvertError(
            f"{where}: the export's logits differ from the unmerged model's by {diff:.3g} (tolerance {tol:.3g} for "
            f"{str(dtype).removeprefix('torch.')}); the merge is wrong, report this with --debug output"
        )
    return {"max_abs_logit_diff": diff, "tolerance": tol, "max_abs_logit": float(reference.abs().max())}


@torch.no_grad()
def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def probe_input_ids(vocab_size: int, seed: int = 1234, batch: int = 2, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def written_files(folder: Path) -> list[str]:
    """The safetensors files of an export folder: the shards its index names, else model.safetensors."""
    index = folder / WEIGHTS_INDEX
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]


def read_written(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export folder (single file or index + shards), keyed by name."""
    tensors = {}
    for name in written_files(folder):
        with safe_open(folder / name, framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


def exact_copies(written: Mapping[str, torch.Tensor], sources: Mapping[str, torch.Tensor], where: str) -> int:
    """Every written tensor named in ``sources`` must equal its source cast to the written dtype, bit for bit."""
    wrong = [k for k, src in sources.items() if not torch.equal(written[k], src.to(written[k].dtype))]
    if wrong:
        raise ConvertError(f"{where}: {len(wrong)} tensors were not copied exactly: {preview(sorted(wrong), 3)}")
    return len(sources)
