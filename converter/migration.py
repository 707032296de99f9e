"""Migrations of many runs: ``ckpt2hf convert RUN [RUN ...] --out-root DIR`` converts each run into
``DIR/<run name>/``, goes on past a run that fails, and ends with a table.

A migration is resumable: a run whose export is complete and whose manifest records the same source (the
checkpoint's and the adapter folder's identity) and the same options is skipped as up to date; a changed run is
converted again; an interrupted one left nothing at its export (conversions are staged and renamed) and converts on
the next start. It spreads: ``--jobs N`` processes on one host, ``--shard I/N`` for the tasks of an array job
(SLURM's variables read when set), ``--executor ray`` for a Ray cluster. Every process records its runs under
``DIR/.ckpt2hf/`` (``ledger``), where ``ckpt2hf status DIR`` reads the whole migration.

The run names are settled before anything is read: two runs that would write the same folder are an error then.
Importing this module does not import torch; `executors` runs the tasks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import ledger
from .discover import find_inputs, relative_to_run
from .errors import ConvertError
from .hashing import path_bytes
from .ledger import CONVERTED, CONVERTING, FAILED, UP_TO_DATE, RunResult
from .names import MANIFEST
from .options import ConvertOptions, options_record

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunTask:
    """One run of a migration as a worker (a process, a shard, a Ray task) is given it: picklable."""

    options: ConvertOptions  # run and out set
    out_root: Path
    force: bool = False
    shard: str = ""
    debug: bool = False
    because: str | None = None  # why the run converts, once checked (None: not checked yet)


def read_runs_file(path: Path) -> list[Path]:
    """The runs listed in ``path``, one per line (blank lines and ``#`` comments skipped); a relative path is relative
    to the current folder, as on the command line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read it ({exc.strerror or exc}) (given with --runs-from)") from exc
    runs = [Path(s) for s in (line.split("#", 1)[0].strip() for line in lines) if s]
    if not runs:
        raise ConvertError(f"{path}: lists no run (given with --runs-from); write one run folder per line")
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (I from 0 to N-1) as (I, N)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ConvertError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4 for the first of four")
    return i, n


def shard_from_env(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """An array job's shard from SLURM's variables (the task id counted from SLURM_ARRAY_TASK_MIN); None outside
    one."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    try:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        i, n = int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])
    except ValueError as exc:
        raise ConvertError(f"SLURM_ARRAY_TASK_ID/COUNT are not numbers ({exc}); pass --shard I/N") from exc
    return parse_shard(f"{i}/{n}")


def migration_outputs(runs: Sequence[Path], out_root: Path) -> list[tuple[Path, Path]]:
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


def select_shard(pairs: Sequence[tuple[Path, Path]], shard: tuple[int, int] | None) -> list[tuple[Path, Path]]:
    """The runs of shard I of N: every N-th by export name from the I-th, the same split for every shard that is
    given the same runs in any order."""
    if shard is None:
        return list(pairs)
    i, n = shard
    return sorted(pairs, key=lambda p: p[1].name)[i::n]


def stale_because(opts: ConvertOptions) -> str | None:
    """Why the run must be converted into ``opts.out``: None when its export is up to date (complete, with the same
    source identity and options in its manifest). ConvertError when ``out`` is there but is no ckpt2hf export."""
    out = Path(opts.out)
    if not out.exists():
        return "no export yet"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        recorded = manifest["source"]
        checkpoint = recorded["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvertError(
            f"{out}: there, but not a ckpt2hf export (no readable {MANIFEST}); move it away or pass --force"
        ) from exc
    if (manifest.get("options") or {}).get("digest") != options_record(opts)["digest"]:
        return "options changed"
    inputs = find_inputs(opts.run, opts.ckpt, opts.adapter_dir)
    if checkpoint.get("path") != relative_to_run(inputs.checkpoint, inputs.run):
        return f"another checkpoint ({inputs.checkpoint.name})"
    if (checkpoint.get("identity") or {}).get("digest") != _checkpoint_identity(inputs.checkpoint, opts):
        return "the checkpoint changed"
    adapter = None
    if inputs.adapter_root is not None:
        from .identity import source_identity

        adapter = source_identity(inputs.adapter_root).digest
    if (recorded.get("adapter_identity") or {}).get("digest") != adapter:
        return "the adapter folder changed"
    return None


def _checkpoint_identity(path: Path, opts: ConvertOptions) -> str:
    from .sources import SpanReader, open_checkpoint

    with SpanReader(opts.chunk_bytes, opts.pool_bytes) as reader:
        return open_checkpoint(path, reader).identity().digest


def check_task(task: RunTask) -> RunTask | RunResult:
    """The task with why its run converts (``because``), or its result when there is nothing to convert: up to date,
    or failed before converting (a folder at its export that is no export). Recorded under the out-root."""
    if task.because is not None:
        return task
    if task.force:
        return dataclasses.replace(task, because="forced")
    opts = task.options
    start = time.perf_counter()
    try:
        because = stale_because(opts)
    except Exception as exc:  # noqa: BLE001 - a failed run, reported; the others go on
        return _record(task, _failed(task, exc, start))
    if because is None:
        took = time.perf_counter() - start
        return _record(task, RunResult(Path(opts.run), Path(opts.out), UP_TO_DATE, "", took, path_bytes(opts.out)))
    return dataclasses.replace(task, because=because)


def convert_task(task: RunTask) -> RunResult:
    """Convert one run of a migration (or find it up to date), recording it under the out-root as it goes. A bad
    run is a ``failed`` result with its one-line reason (with ``debug``: raised)."""
    from .pipeline import convert

    checked = check_task(task)
    if isinstance(checked, RunResult):
        return checked
    opts = checked.options
    run, out = Path(opts.run), Path(opts.out)
    start = time.perf_counter()
    try:
        ledger.write(task.out_root, ledger.stamped(RunResult(run, out, CONVERTING, _where()), task.shard))
        log.info("%s -> %s (%s)", run, out, checked.because)
        convert(dataclasses.replace(opts, force=True))  # a stale export is replaced once the new one is complete
        result = RunResult(run, out, CONVERTED, checked.because or "", time.perf_counter() - start, path_bytes(out))
    except Exception as exc:  # noqa: BLE001 - a failed run, reported; the others go on
        result = _failed(task, exc, start)
    return _record(task, result)


def _failed(task: RunTask, exc: Exception, start: float) -> RunResult:
    """A run that failed: bad input (its one line) or a bug (said as such); with ``debug``, raised."""
    if task.debug:
        raise exc
    if isinstance(exc, ConvertError):
        message = str(exc)
    else:
        message = f"internal error ({type(exc).__name__}: {exc}); rerun this run with --debug"
    log.error("%s: %s", task.options.run, message)
    return RunResult(Path(task.options.run), Path(task.options.out), FAILED, message, time.perf_counter() - start)


def _where() -> str:
    import socket

    return f"on {socket.gethostname()}, pid {os.getpid()}"


def _record(task: RunTask, result: RunResult) -> RunResult:
    result = ledger.stamped(result, task.shard)
    ledger.write(task.out_root, result)
    return result


def absolute_paths(opts: ConvertOptions) -> ConvertOptions:
    """``opts`` with its paths made absolute from the current folder, as a worker elsewhere (a Ray task's folder is
    its own) must be given them; ``--ckpt`` relative to the run stays as it is."""
    fields = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name == "ckpt" and value is not None and not Path(value).exists():
            continue  # relative to each run (find_inputs)
        if isinstance(value, Path):
            fields[f.name] = value.absolute()
        elif f.name == "bases":
            fields[f.name] = {k: Path(v).absolute() for k, v in value.items()}
    return dataclasses.replace(opts, **fields)


def migration_tasks(
    runs: Sequence[Path],
    out_root: Path,
    template: ConvertOptions,
    force: bool = False,
    shard: tuple[int, int] | None = None,
    debug: bool = False,
) -> list[RunTask]:
    """The tasks of this process's part of a migration; records every run of the whole migration as pending where
    it has no record yet (so that ``status`` shows what no shard has started)."""
    pairs = migration_outputs(runs, Path(out_root))
    ledger.add_pending(out_root, pairs)
    label = f"{shard[0]}/{shard[1]}" if shard else ""
    template = absolute_paths(template)
    return [
        RunTask(
            dataclasses.replace(template, run=Path(run).resolve(), out=Path(out).resolve()),
            Path(out_root).resolve(),
            force,
            label,
            debug,
        )
        for run, out in select_shard(pairs, shard)
    ]
