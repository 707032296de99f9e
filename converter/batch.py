"""Migrations of many runs: ``ckpt2hf convert RUN [RUN ...] --out-root DIR`` converts each run into
``DIR/<run name>/``, goes on past a run that fails, and ends with a table.

The run names are settled before anything is read: two runs that would write the same folder are an error then.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .discover import find_inputs
from .errors import ConvertError
from .hashing import path_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """One run of a batch: where it went, whether it converted, how long it took and what it wrote."""

    run: Path
    out: Path
    ok: bool
    message: str  # "converted", or the error
    seconds: float
    bytes: int  # the export's size (0 when it failed)

    def record(self) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "out": str(self.out),
            "status": "ok" if self.ok else "failed",
            "message": self.message,
            "seconds": round(self.seconds, 2),
            "bytes": self.bytes,
        }


def batch_outputs(runs: Sequence[Path], out_root: Path) -> list[tuple[Path, Path]]:
    """``(run, DIR/<run name>)`` for each run; ConvertError when a run is not found or two share a name."""
    targets: dict[str, list[Path]] = {}
    for run in runs:
        name = find_inputs(Path(run)).run.resolve().name
        targets.setdefault(name, []).append(Path(run))
    clashes = {name: found for name, found in targets.items() if len(found) > 1}
    if clashes:
        said = "; ".join(f"{', '.join(map(str, found))} -> {out_root / name}" for name, found in clashes.items())
        raise ConvertError(
            f"--out-root {out_root}: runs with the same name would write the same folder ({said}); convert them "
            "with separate --out-root folders or --out"
        )
    where = {str(run): out_root / name for name, found in targets.items() for run in found}
    return [(Path(run), where[str(run)]) for run in runs]


def convert_batch(
    runs: Sequence[Path], out_root: Path, convert_one: Callable[[Path, Path], Any], debug: bool = False
) -> list[BatchResult]:
    """Convert each run with ``convert_one(run, out)``; a run that fails is reported and the next one goes on
    (with ``debug`` the first failure raises)."""
    pairs = batch_outputs(runs, out_root)
    results = []
    for i, (run, out) in enumerate(pairs, 1):
        log.info("[%d/%d] %s -> %s", i, len(pairs), run, out)
        start = time.perf_counter()
        try:
            convert_one(run, out)
            ok, message = True, "converted"
        except ConvertError as exc:
            if debug:
                raise
            ok, message = False, str(exc)
            log.error("%s: %s", run, exc)
        except Exception as exc:  # a bug: reported as such, and the other runs still convert
            if debug:
                raise
            ok, message = False, f"internal error ({type(exc).__name__}: {exc}); rerun this run with --debug"
            log.error("%s: %s", run, message)
        seconds = time.perf_counter() - start
        results.append(BatchResult(run, out, ok, message, seconds, path_bytes(out) if ok else 0))
    return results


def render_batch(results: Sequence[BatchResult]) -> str:
    """The table printed at the end: run, status, time, export size."""
    width = max([len("run")] + [len(str(r.run)) for r in results])
    lines = [f"{'run':<{width}}  {'status':<6}  {'time':>8}  {'export':>10}"]
    for r in results:
        size = f"{r.bytes / 1e6:.1f} MB" if r.ok else "-"
        lines.append(f"{str(r.run):<{width}}  {'ok' if r.ok else 'failed':<6}  {r.seconds:>7.1f}s  {size:>10}")
        if not r.ok:
            lines.append(f"{'':<{width}}  {r.message}")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} runs converted" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)
