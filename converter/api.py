"""The Python API: what the command line does, as functions with typed results, for pipelines that do not want a
subprocess.

Each result holds the data the command's ``--json`` output prints (``as_json()`` returns exactly that) with typed
accessors for what a release script reads. Bad input raises ``ConvertError`` (its text is the one line the command
prints); nothing is printed and logging is left as the caller configured it. Importing this module is cheap: torch,
transformers and PEFT are imported by the first call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .ledger import RunResult

__all__ = [
    "Conversion",
    "ConversionPlan",
    "Inspection",
    "Migration",
    "RunResult",
    "Verification",
    "convert",
    "inspect",
    "migrate",
    "plan_conversion",
    "status",
    "verify",
]

PathLike = str | Path


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A finished conversion: the export folder, its manifest (``manifest.json`` as written, plus ``out``) and the
    seconds each stage took (``timings``); ``as_json()`` is what ``ckpt2hf convert --json`` prints."""

    out: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)  # seconds per stage

    @property
    def components(self) -> dict[str, Path]:
        """Each part of the model and its folder in the export (``out`` itself for a single-part export)."""
        return {
            name: self.out / c["path"] if c["path"] else self.out for name, c in self.manifest["components"].items()
        }

    @property
    def verification(self) -> dict[str, Any] | None:
        """Each part's checks against the unmerged PEFT model (None with ``verify=False``)."""
        return self.manifest["verification"]

    @property
    def files(self) -> list[dict[str, Any]]:
        """Every file of the export with its bytes and sha256."""
        return self.manifest["files"]

    def as_json(self) -> dict[str, Any]:
        return {**self.manifest, "timings": self.timings}


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion would do, read from metadata alone (``convert --dry-run --json``)."""

    out: Path
    summary: dict[str, Any]

    @property
    def engine(self) -> str:
        return self.summary["engine"]

    @property
    def parts(self) -> list[dict[str, Any]]:
        """Each part: its folder, tensors, bytes and dtypes."""
        return self.summary["plan"]

    def as_json(self) -> dict[str, Any]:
        return self.summary


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What ``ckpt2hf inspect`` explains about a run (``--json``: ``report``; the README lists its keys)."""

    run: Path
    report: dict[str, Any]

    @property
    def layout(self) -> str:
        return self.report["layout"]["name"]

    @property
    def warnings(self) -> list[str]:
        return self.report["warnings"]

    def render(self) -> str:
        """The text ``ckpt2hf inspect`` prints."""
        from .inspection import render

        return render(self.report)

    def as_json(self) -> dict[str, Any]:
        return self.report


@dataclasses.dataclass(frozen=True)
class Verification:
    """An export checked against its manifest (``ckpt2hf verify --json``)."""

    out: Path
    files: int  # files checked
    problems: tuple[str, ...]  # one line per difference; empty when every byte is as the manifest says

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "files": self.files, "problems": list(self.problems)}


@dataclasses.dataclass(frozen=True)
class Migration:
    """The runs of a migration and each one's result (``convert --out-root ... --json``, ``status --json``)."""

    runs: tuple[RunResult, ...]

    @property
    def ok(self) -> bool:
        """Every run converted or up to date."""
        return all(r.ok for r in self.runs)

    @property
    def counts(self) -> dict[str, int]:
        """How many runs have each status."""
        from .ledger import counts

        return counts(self.runs)

    def render(self) -> str:
        """The table the command prints."""
        from .ledger import render

        return render(self.runs)

    def as_json(self) -> dict[str, Any]:
        return {"runs": [r.record() for r in self.runs], "counts": self.counts, "done": self.ok}


def _options(run: PathLike, out: PathLike | None, options: Mapping[str, Any]) -> Any:
    from .options import ConvertOptions

    fields = {f.name for f in dataclasses.fields(ConvertOptions)} - {"run", "out"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    given = dict(options)
    given.setdefault("progress", False)
    for name in ("ckpt", "adapter_dir", "tokenizer", "adapter_out", "adapter_config"):
        if given.get(name) is not None:
            given[name] = Path(given[name])
    given["bases"] = {k: Path(v) for k, v in (given.get("bases") or {}).items()}
    return ConvertOptions(run=Path(run), out=Path(out) if out is not None else None, **given)


def convert(run: PathLike, out: PathLike | None = None, **options: Any) -> Conversion:
    """Convert ``run`` (a run folder or a checkpoint file) into ``out`` (default ``RUN/export``).

    ``options`` are ``ConvertOptions``' fields, one per command-line flag (``dtype="bfloat16"``, ``force=True``,
    ``bases={"language_model": "/models/qwen3"}``, ``verify=False``, ...); progress bars are off unless
    ``progress=True``. Raises ``ConvertError`` on bad input, leaving nothing at ``out`` (or the previous export, with
    ``force``); raises ``TypeError`` for an option that does not exist.
    """
    from .pipeline import convert as run_conversion

    opts = _options(run, out, options)
    if opts.dry_run:
        raise TypeError("convert(dry_run=True): use plan_conversion() for the plan alone")
    manifest = run_conversion(opts)
    return Conversion(Path(manifest["out"]), manifest, manifest.pop("timings"))


def plan_conversion(run: PathLike, out: PathLike | None = None, **options: Any) -> ConversionPlan:
    """What ``convert`` would write, read from the run's metadata only (no tensor data read, nothing written)."""
    from .pipeline import convert as run_conversion

    summary = run_conversion(_options(run, out, {**options, "dry_run": True}))
    return ConversionPlan(Path(summary["out"]), summary)


def inspect(
    run: PathLike,
    *,
    config: str = "auto",
    bases: Mapping[str, PathLike] | None = None,
    adapter_config: PathLike | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
) -> Inspection:
    """Explain ``run`` (a run folder or checkpoint file): its keys, PEFT layout, what a plain load would report and
    the plan. Raises ``ConvertError`` when it cannot be read."""
    from .inspection import inspect_run

    report = inspect_run(
        Path(run),
        config=config,
        bases={k: Path(v) for k, v in (bases or {}).items()},
        adapter_config=Path(adapter_config) if adapter_config is not None else None,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
    )
    return Inspection(Path(run), report)


def verify(out: PathLike) -> Verification:
    """Check the export ``out`` against its ``manifest.json``: every file's bytes and sha256, no file unlisted,
    shards and index consistent. Differences are in the result; an unreadable manifest raises ``ConvertError``."""
    from .integrity import verify_export

    problems, checked = verify_export(Path(out))
    return Verification(Path(out), checked, tuple(problems))


def migrate(
    runs: Iterable[PathLike],
    out_root: PathLike,
    *,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    force: bool = False,
    **options: Any,
) -> Migration:
    """Convert each run into ``OUT_ROOT/<run name>/``: a run whose export is up to date is skipped (``force``:
    converted again), a run that fails is a ``failed`` result with its reason and the others go on. ``jobs``:
    processes at once; ``shard``: (I, N), this caller's part of the runs; ``executor``: ``"local"`` or ``"ray"``
    (at ``ray_address``). ``options``: as for ``convert``. Raises ``ConvertError`` before anything is converted when
    a run is not found or two runs share a name."""
    from .executors import check_spread
    from .executors import migrate as run_migration
    from .migration import migration_tasks

    check_spread(jobs, executor)
    template = _options(".", None, options)
    tasks = migration_tasks([Path(r) for r in runs], Path(out_root), template, force=force, shard=shard)
    return Migration(tuple(run_migration(tasks, jobs, executor, ray_address)))


def status(out_root: PathLike) -> Migration:
    """The whole migration under ``out_root`` as its processes (jobs, shards, Ray tasks) recorded it: each run
    converted, up to date, failed, converting, interrupted or pending. ``ConvertError`` if there is none."""
    from .ledger import read

    return Migration(tuple(read(Path(out_root))))
