"""The record a migration keeps under its out-root: one small JSON file per run, ``OUT_ROOT/.ckpt2hf/runs/NAME.json``.

Every process of a migration (a ``--jobs`` worker, an array job's shard, a Ray task on another node) writes the
records of the runs it converts there, each replaced atomically (written beside, then renamed), so that
``ckpt2hf status OUT_ROOT`` shows the whole migration at any time from whatever the processes left: converted, up to
date, failed with its one-line reason, converting (by which host and process), or pending. A record says
``converting`` from the start of a run's conversion to its end; one whose process is gone (killed, its node lost) is
shown as ``interrupted``, and the next start converts that run again. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConvertError

LEDGER = ".ckpt2hf"  # under the out-root, beside the exports

CONVERTED = "converted"
UP_TO_DATE = "up to date"
FAILED = "failed"
CONVERTING = "converting"
INTERRUPTED = "interrupted"
PENDING = "pending"
DONE = (CONVERTED, UP_TO_DATE)
STATUSES = (CONVERTED, UP_TO_DATE, FAILED, CONVERTING, INTERRUPTED, PENDING)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run of a migration: where it goes, its status, why (for a failure, the one-line error), how long its
    conversion took, the export's size and which process wrote the record."""

    run: Path
    out: Path
    status: str
    message: str = ""
    seconds: float = 0.0
    bytes: int = 0
    host: str = ""
    pid: int = 0
    shard: str = ""  # "I/N" for an array job's shard
    updated: str = ""

    @property
    def ok(self) -> bool:
        return self.status in DONE

    def record(self) -> dict[str, Any]:
        """The JSON of the record file (and of ``--json``)."""
        data = dataclasses.asdict(self)
        data.update(run=str(self.run), out=str(self.out), seconds=round(self.seconds, 2))
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> RunResult:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**fields, "run": Path(fields["run"]), "out": Path(fields["out"])})


def _folder(out_root: Path) -> Path:
    return Path(out_root) / LEDGER / "runs"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def stamped(result: RunResult, shard: str = "") -> RunResult:
    """``result`` as this process records it now."""
    return dataclasses.replace(result, host=socket.gethostname(), pid=os.getpid(), shard=shard, updated=_now())


def _place(folder: Path, result: RunResult, replace: bool) -> None:
    """Write the run's record beside its place, then move it in whole: replacing the one there, or only where there
    is none (``replace`` False)."""
    path = folder / f"{result.out.name}.json"
    partial = folder / f".{result.out.name}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(result.record(), indent=2) + "\n")
    try:
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # fails where a record is
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def write(out_root: Path, result: RunResult) -> None:
    """Replace the run's record atomically (a reader sees the old record or the new one, never a part)."""
    folder = _folder(out_root)
    folder.mkdir(parents=True, exist_ok=True)
    _place(folder, result, replace=True)


def add_pending(out_root: Path, pairs: Iterable[tuple[Path, Path]]) -> None:
    """A ``pending`` record for each run that has none yet (moved into place whole, and only where no record is: one
    another process has written stays as it is)."""
    folder = _folder(out_root)
    folder.mkdir(parents=True, exist_ok=True)
    for run, out in pairs:
        _place(folder, stamped(RunResult(Path(run).resolve(), Path(out).resolve(), PENDING)), replace=False)


def _alive(result: RunResult) -> bool:
    """Whether the process that wrote a ``converting`` record may still be at it (another host's: assumed so)."""
    if result.host != socket.gethostname():
        return True
    try:
        os.kill(result.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(out_root: Path) -> list[RunResult]:
    """Every run's record under ``out_root``, sorted by export name; a ``converting`` record whose process is gone
    reads as ``interrupted``. ConvertError when ``out_root`` holds no migration."""
    folder = _folder(out_root)
    if not folder.is_dir():
        raise ConvertError(
            f"{out_root}: no migration here (no {LEDGER}/runs/); convert runs with --out-root {out_root}"
        )
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            result = RunResult.from_record(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConvertError(f"{path}: not a ckpt2hf run record ({type(exc).__name__}); remove it") from exc
        if result.status == CONVERTING and not _alive(result):
            result = dataclasses.replace(result, status=INTERRUPTED, message=f"{result.host} pid {result.pid} is gone")
        results.append(result)
    return results


def counts(results: Sequence[RunResult]) -> dict[str, int]:
    """How many runs have each status (the statuses with none left out)."""
    found = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {s: n for s, n in found.items() if n}


def render(results: Sequence[RunResult], label: str = "run") -> str:
    """The table of a migration: run, status, time, export size, and under a failed run its reason."""
    width = max([len(label)] + [len(str(r.run)) for r in results])
    state = max([len("status")] + [len(r.status) for r in results])
    lines = [f"{label:<{width}}  {'status':<{state}}  {'time':>8}  {'export':>10}"]
    for r in results:
        size = f"{r.bytes / 1e6:.1f} MB" if r.ok and r.bytes else "-"
        took = f"{r.seconds:>7.1f}s" if r.seconds else f"{'-':>8}"
        lines.append(f"{str(r.run):<{width}}  {r.status:<{state}}  {took}  {size:>10}")
        if r.status in (FAILED, INTERRUPTED, CONVERTING) and r.message:
            lines.append(f"{'':<{width}}  {r.message}")
    done = sum(r.ok for r in results)
    said = ", ".join(f"{n} {s}" for s, n in counts(results).items())
    lines.append(f"{done} of {len(results)} runs done ({said})")
    return "\n".join(lines)
