"""Verifying an export: clean reloads, logits against the unmerged model, exact copies of unmerged tensors."""

from __future__ import annotations

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

log = logging.getLogger(__name__)

# Max abs logit difference allowed, relative to max(1, max |reference logit|), by the export's dtype.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


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


def logit_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    return LOGIT_TOLERANCE.get(dtype, 1e-2) * max(1.0, float(reference.abs().max()))


def compare_logits(reference: torch.Tensor, exported: torch.Tensor, dtype: torch.dtype, where: str) -> dict[str, Any]:
    """Max abs difference between the unmerged model's logits and the export's; over tolerance is an error."""
    diff = float((reference.float() - exported.float()).abs().max())
    tol = logit_tolerance(dtype, reference)
    if not diff <= tol:  # also catches NaN
        raise ConvertError(
            f"{where}: the export's logits differ from the unmerged model's by {diff:.3g} (tolerance {tol:.3g} for "
            f"{str(dtype).removeprefix('torch.')}); the merge is wrong, report this with --debug output"
        )
    return {"max_abs_logit_diff": diff, "tolerance": tol, "max_abs_logit": float(reference.abs().max())}


def read_written(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export folder (single file or index + shards), keyed by name."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[key] = fh.get_tensor(key)
    return tensors


def exact_copies(written: Mapping[str, torch.Tensor], sources: Mapping[str, torch.Tensor], where: str) -> int:
    """Every written tensor named in ``sources`` must equal its source cast to the written dtype, bit for bit."""
    wrong = [k for k, src in sources.items() if not torch.equal(written[k], src.to(written[k].dtype))]
    if wrong:
        raise ConvertError(f"{where}: {len(wrong)} tensors were not copied exactly: {preview(sorted(wrong), 3)}")
    return len(sources)


@torch.no_grad()
def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def probe_input_ids(vocab_size: int, seed: int = 1234, batch: int = 2, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def _finite(tensor: torch.Tensor) -> bool:
    """All values finite, in one pass without a bool tensor. NaN and Inf propagate through a sum, so a finite sum
    proves it (the fastest reduction for float32/64); a sum that overflows, and the 16-bit dtypes (whose sums are
    slow or overflow), go to min/max, which any NaN reaches and where an Inf shows at an end."""
    if tensor.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(tensor.sum())):
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(key: str, before: torch.Tensor, after: torch.Tensor, source: Path) -> torch.Tensor:
    """A written tensor must be finite: name NaN/Inf from the checkpoint or merge, and overflow from the cast."""
    if not after.is_floating_point() or after.numel() == 0 or _finite(after):
        return after
    if bool(torch.isfinite(before).all()):
        peak = float(before.abs().max())
        raise ConvertError(
            f"{source}: {key} overflows {str(after.dtype).removeprefix('torch.')} (max abs {peak:.4g}); "
            "use --dtype bfloat16 or float32"
        )
    bad = int((~torch.isfinite(before)).sum())
    raise ConvertError(
        f"{source}: {key} holds {bad} NaN/Inf values after the merge; the trained weights are broken "
        "(check the checkpoint's LoRA tensors for this module)"
    )
