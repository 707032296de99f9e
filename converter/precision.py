"""How much of the LoRA delta survives the cast to a 16-bit export.

A merged weight is ``W + dW``; written in bfloat16 or float16 it becomes ``cast(W + dW)``, next to a base that a
consumer knows as ``cast(W)``. What the export carries of the fine-tune is the difference of those two, against
the ``dW`` that training produced. For each merged tensor:

- ``delta_error``: ``|(cast(W + dW) - cast(W)) - dW| / |dW|`` (L2 norms): 0 is the delta carried exactly, 1 is as
  much error as signal. With error orthogonal to the delta the shipped delta's cosine with the trained one is
  ``1 / sqrt(1 + e**2)``: 0.89 at 0.5.
- ``rounded_away``: the share of the elements the delta changes whose written value does not change at all.

A tensor above ``WARN_DELTA_ERROR`` is a warning (see the README: rounding noise is then more than a fifth of the
shipped delta's energy; export it in float32, or keep the adapter with ``--adapter-out``).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import torch

log = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
WARN_DELTA_ERROR = 0.5


def wanted(dtype: torch.dtype) -> bool:
    """Whether a merged tensor written in ``dtype`` is measured."""
    return dtype in LOW_PRECISION


# Elements measured at a time, in scratch buffers reused across chunks: on a CPU a few MB (cache-sized, and no fresh
# pages to fault), on a GPU larger (a kernel launch per step per chunk would bound it otherwise; about 0.6 GB).
CHUNK = {"cpu": 1 << 20, "cuda": 1 << 25}


def measure(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> dict[str, float] | None:
    """The figures of one merged tensor (``before``: the base weight, ``after``: merged, both float32 on one
    device); None when the merge changed nothing."""
    before, after = before.detach().reshape(-1), after.detach().reshape(-1)
    device = before.device
    chunk = CHUNK.get(device.type, CHUNK["cpu"])
    size = min(chunk, before.numel())
    delta, error, base = (torch.empty(size, device=device) for _ in range(3))
    cast, cast_base = (torch.empty(size, dtype=dtype, device=device) for _ in range(2))
    same, moved = (torch.empty(size, dtype=torch.bool, device=device) for _ in range(2))
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # changed, rounded away, |dW|^2, |error|^2
    for start in range(0, before.numel(), chunk):
        b, a = before[start : start + chunk], after[start : start + chunk]
        n = b.numel()
        d, e, f, c1, c0 = delta[:n], error[:n], base[:n], cast[:n], cast_base[:n]
        torch.sub(a, b, out=d)
        c1.copy_(a)
        c0.copy_(b)
        e.copy_(c1)
        f.copy_(c0)
        e.sub_(f).sub_(d)  # (cast(W + dW) - cast(W)) - dW
        torch.ne(d, 0, out=moved[:n])
        torch.eq(c1, c0, out=same[:n])
        same[:n].logical_and_(moved[:n])
        sums[0] += torch.count_nonzero(moved[:n])
        sums[1] += torch.count_nonzero(same[:n])
        sums[2] += torch.dot(d, d)
        sums[3] += torch.dot(e, e)
    changed, rounded, delta_sq, error_sq = sums.tolist()  # one synchronisation per tensor on a GPU
    n = int(changed)
    if n == 0:
        return None
    error = (error_sq / delta_sq) ** 0.5 if delta_sq > 0 else 0.0
    return {"delta_error": round(error, 6), "rounded_away": round(rounded / n, 6), "changed": n}


def summarize(part: str, dtype: torch.dtype, figures: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The manifest's record of a part (per-tensor figures included), with one log line and a warning per tensor
    over the threshold; None when nothing was measured."""
    if not figures:
        return None
    errors = {key: f["delta_error"] for key, f in figures.items()}
    worst = max(errors, key=errors.get)
    changed = sum(f["changed"] for f in figures.values())
    rounded = sum(f["rounded_away"] * f["changed"] for f in figures.values()) / changed
    over = sorted(k for k, e in errors.items() if e > WARN_DELTA_ERROR)
    name = str(dtype).removeprefix("torch.")
    log.info(
        "%s: precision: %d merged tensors cast to %s keep their LoRA delta with a median error of %.1f%% (worst "
        "%.1f%%, %s); %.1f%% of the changed elements round away",
        part,
        len(figures),
        name,
        100 * statistics.median(errors.values()),
        100 * errors[worst],
        worst,
        100 * rounded,
    )
    for key in over:
        log.warning(
            "%s: %s loses much of its LoRA delta in %s (delta error %.0f%%, %.0f%% of changed elements rounded "
            "away; threshold %.0f%%); export with --dtype float32 or keep the adapter with --adapter-out",
            part,
            key,
            name,
            100 * errors[key],
            100 * figures[key]["rounded_away"],
            100 * WARN_DELTA_ERROR,
        )
    return {
        "dtype": name,
        "tensors": len(figures),
        "median_delta_error": round(statistics.median(errors.values()), 6),
        "max_delta_error": errors[worst],
        "worst": worst,
        "rounded_away": round(rounded, 6),
        "warn_above": WARN_DELTA_ERROR,
        "over_threshold": over,
        "per_tensor": figures,
    }
