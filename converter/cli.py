"""The ``ckpt2hf`` command line: parses arguments, calls one library function, prints the result.

Bad input (a ConvertError) is one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import api, timings
from .errors import ConvertError
from .names import DEFER_BITSANDBYTES
from .version import __version__

log = logging.getLogger("converter")


def _base_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH, e.g. language_model=/models/qwen3")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt2hf", description="Turn a Lightning + PEFT training run into a clean Hugging Face export."
    )
    parser.add_argument("--version", action="version", version=f"ckpt2hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a run (or one checkpoint) into Hugging Face folders")
    conv.add_argument(
        "run",
        type=Path,
        nargs="*",
        help="run folder (checkpoints/, lora_weights/) or a checkpoint file; several with --out-root",
    )
    conv.add_argument("--out", type=Path, help="export folder (default: RUN/export)")
    conv.add_argument(
        "--out-root",
        type=Path,
        help="a migration: each RUN into OUT_ROOT/<run name>/, going on past a run that fails, skipping a run whose "
        "export is up to date (--force: convert all again); ends with a table",
    )
    mig = conv.add_argument_group("migrations (with --out-root)")
    mig.add_argument("--runs-from", type=Path, metavar="FILE", help="more runs, one per line (# comments)")
    mig.add_argument("--jobs", type=int, default=1, metavar="N", help="conversions at once, in processes (default 1)")
    mig.add_argument(
        "--shard",
        metavar="I/N",
        help="convert shard I (0 to N-1) of N of the runs, for an array job (default: from SLURM_ARRAY_TASK_ID and "
        "SLURM_ARRAY_TASK_COUNT when set)",
    )
    mig.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: this host (--jobs); ray: each run a Ray task (pip install 'ckpt2hf[ray]')",
    )
    mig.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    conv.add_argument("--ckpt", type=Path, help="checkpoint to convert (default: last.ckpt, else newest by step)")
    conv.add_argument(
        "--config",
        default="auto",
        help="layout config: a name in configs/ or a YAML path (default: auto, the built-in layout the keys fit)",
    )
    conv.add_argument("--adapter-dir", type=Path, help="PEFT adapter folder (default: RUN/lora_weights)")
    conv.add_argument(
        "--lora-from",
        choices=["auto", "checkpoint", "adapter"],
        default="auto",
        help="LoRA tensors to merge; auto requires the checkpoint and adapter folder to agree",
    )
    conv.add_argument(
        "--base",
        type=_base_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="folder with config.json (and tokenizer) for a component, e.g. language_model=PATH",
    )
    conv.add_argument("--dtype", default="auto", help="output dtype: auto (base config's), float32, bfloat16, float16")
    conv.add_argument("--device", default="auto", help="where to merge: auto (GPU when present), cpu, cuda")
    conv.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    conv.add_argument(
        "--engine",
        choices=["auto", "full", "streaming"],
        default="auto",
        help="full: whole-model merge_and_unload; streaming: layer by layer in bounded memory; "
        "auto: streaming when the full engine would need more than --max-memory",
    )
    conv.add_argument("--max-memory", help="memory the auto engine may plan for (default: half the RAM), e.g. 8GB")
    conv.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder to ship with the language model (default: the run's -- beside the adapter, "
        "RUN/tokenizer/, a tokenizer_name hyper-parameter -- else the base's)",
    )
    conv.add_argument(
        "--qlora-base",
        choices=["base", "dequantized"],
        default="base",
        help="a QLoRA run's base weights: from the base model in full precision (default), or the run's 4-bit "
        "weights dequantized by bitsandbytes",
    )
    conv.add_argument(
        "--source-sha256",
        action="store_true",
        help="record the checkpoint's full sha256 in the manifest (reads every byte, optimizer states included; "
        "by default the checkpoint is identified by its zip records' CRC-32s)",
    )
    conv.add_argument(
        "--adapter-out",
        type=Path,
        metavar="DIR",
        help="also write the run's adapter as a clean PEFT folder (PeftModel.from_pretrained(base, DIR) loads it)",
    )
    conv.add_argument(
        "--auto-class",
        metavar="CLASS",
        help="the language model's transformers Auto class, e.g. AutoModelForSequenceClassification (default: "
        "from the adapter's task_type, else AutoModelForCausalLM)",
    )
    conv.add_argument(
        "--strict",
        action="store_true",
        help="refuse a checkpoint that lacks tensors of the model (by default they are read from the base model, "
        "as for frozen weights a run did not save)",
    )
    conv.add_argument("--no-verify", dest="verify", action="store_false", help="skip reloading and logit checks")
    conv.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    conv.add_argument("--force", action="store_true", help="replace an existing OUT (kept until the new one is done)")
    insp = sub.add_parser("inspect", help="explain a run or checkpoint: keys, PEFT layout, what a plain load reports")
    insp.add_argument("run", type=Path, help="run folder or checkpoint file")
    insp.add_argument(
        "--config", default="auto", help="layout config: a name in configs/ or a YAML path (default: auto)"
    )
    insp.add_argument(
        "--base",
        type=_base_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="folder with config.json for a component (for the plan)",
    )

    for p in (conv, insp):  # for runs that saved no adapter config
        p.add_argument("--adapter-config", type=Path, metavar="FILE", help="the run's PEFT adapter_config.json")
        p.add_argument("--lora-r", type=int, metavar="N", help="LoRA's rank (default: read from the tensors)")
        p.add_argument("--lora-alpha", type=_number, metavar="N", help="LoRA's alpha, when the run saved none")

    ver = sub.add_parser("verify", help="check an export against its manifest (sha256, shards, metadata)")
    ver.add_argument("out", type=Path, help="export folder (holding manifest.json)")

    stat = sub.add_parser(
        "status",
        help="the table of a migration: each run converted, up to date, failed (why), converting or pending",
    )
    stat.add_argument("out_root", type=Path, metavar="OUT_ROOT", help="the migration's --out-root")

    for p in (conv, insp, ver, stat):
        p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
        p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


CONFIG_HELP = "layout config: a name in configs/ or a YAML path (default: auto, the built-in layout the keys fit)"


def _number(text: str) -> int | float:
    """A number as the user wrote it: ``16`` stays an int (as PEFT's configs hold it), ``0.5`` a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error() if not debug else hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if debug else logging.WARNING)
    # bitsandbytes, imported by PEFT where installed, warns about optional CPU kernels on import: not ours to fix.
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        warnings.filterwarnings("ignore")


def _print_plan(summary: dict[str, Any]) -> None:
    src = summary["source"]["checkpoint"]
    print(f"checkpoint  {src['path']}  (epoch {src['epoch']}, step {src['global_step']}; {src['chosen_because']})")
    print(f"adapter     {summary['source']['adapter_folder'] or 'none'}")
    print(f"out         {summary['out']}")
    width = max(len(p["component"]) for p in summary["plan"])
    for p in summary["plan"]:
        dtypes = ", ".join(f"{d} x{n}" for d, n in p["dtypes"].items())
        print(
            f"  {p['component']:<{width}}  {p['out'] + '/':<18} {p['tensors']:>6} tensors  "
            f"{p['bytes'] / 1e6:>10.2f} MB  {dtypes}"
        )


def _print_result(manifest: dict[str, Any]) -> None:
    print(f"wrote {manifest['out']}")
    for name, comp in manifest["components"].items():
        check = (manifest.get("verification") or {}).get(name) or {}
        figures = []
        for what in ("logit", "hidden_state"):
            if f"max_abs_{what}_diff" in check:
                diff = check[f"max_abs_{what}_diff"]
                figures.append(f"max abs {what.replace('_', ' ')} diff {diff:.3g} (tol {check['tolerance']:.3g})")
        if check.get("layers_checked"):
            figures.append(
                f"{check['layers_checked']} merged layers checked, max rel diff "
                f"{check['max_rel_layer_output_diff']:.3g} (tol {check['layer_tolerance']:.3g})"
            )
        if "exact_tensors" in check:
            figures.append(f"{check['exact_tensors']} tensors exact")
        if comp.get("precision"):
            p = comp["precision"]
            figures.append(
                f"{p['dtype']} keeps the LoRA delta to {100 * p['median_delta_error']:.1f}% median error "
                f"(worst {100 * p['max_delta_error']:.1f}%)"
            )
        print(f"  {name:<16} {comp['path'] + '/':<18} {comp['tensors']:>6} tensors  {'; '.join(figures)}")


def _prefetch(args: argparse.Namespace) -> None:
    """Start reading the run's files into the page cache now, and hashing the checkpoint if asked: both run on other
    cores while torch, transformers and PEFT import (``prefetch``, ``hashing.prefetch``)."""
    from . import prefetch
    from .discover import find_inputs
    from .hashing import prefetch as prefetch_hash

    try:
        inputs = find_inputs(args.run[0], args.ckpt, args.adapter_dir)
    except ConvertError:
        return  # convert() reports it
    prefetch.start([inputs.checkpoint, *([inputs.adapter_root] if inputs.adapter_root else []),
                    *(Path(path) for _, path in args.base)])  # fmt: skip
    if args.source_sha256:
        prefetch_hash(inputs.checkpoint)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0, 1 for verify differences, 2 for bad input, 130 on Ctrl-C)."""
    # Buffers of 2 MB and more on transparent huge pages: a conversion fills gigabytes of fresh buffers, and a
    # fault per 4 KB page costs more than the copy into it. (torch reads this at its first allocation.)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # OpenMP threads that spin between torch's parallel regions take the cores the hash and writer threads need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    # Imports and model building allocate millions of long-lived objects; the cyclic collector would traverse
    # them again and again for nothing (seconds of a conversion). Tensors are freed by reference counting.
    gc.disable()
    try:
        return _main(args)
    finally:
        from . import prefetch
        from .hashing import cancel_prefetched

        cancel_prefetched()
        prefetch.stop_all()
        gc.enable()


def _defer_bitsandbytes(argv: list[str]) -> None:
    """PEFT imports bitsandbytes wherever it is installed (1.4 s of a conversion's start, and a warning about optional
    CPU kernels); only ``--qlora-base dequantized`` uses it. Elsewhere this process marks it unavailable before PEFT
    is imported, which PEFT and transformers treat as not installed. (Console entry point only: a program that calls
    ``main()`` keeps its own imports.)"""
    wanted = any(a.endswith("dequantized") for a in argv)
    if not wanted and "peft" not in sys.modules and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
        os.environ[DEFER_BITSANDBYTES] = "1"  # and in the --jobs workers (converter.preload)


def run() -> None:
    """The console entry point: ``main()``, then exit. The objects left are handed to the OS as they are
    (``gc.freeze``): the interpreter's final collection would walk every object the imports created, for nothing."""
    _defer_bitsandbytes(sys.argv[1:])
    code = main()
    gc.freeze()
    sys.exit(code)


def _main(args: argparse.Namespace) -> int:
    if args.command == "convert" and not args.dry_run and len(args.run) == 1:
        _prefetch(args)
    _setup_logging(args.quiet, args.debug)
    try:
        if args.command == "verify":
            checked = api.verify(args.out)
            if args.json:
                print(json.dumps(checked.as_json(), indent=2))
            else:
                print(
                    "\n".join(checked.problems)
                    if checked.problems
                    else f"{args.out}: {checked.files} files match manifest.json"
                )
            if checked.problems:
                print(
                    f"ckpt2hf: error: {args.out}: {len(checked.problems)} differences from manifest.json",
                    file=sys.stderr,
                )
                return 1
        elif args.command == "inspect":
            logging.getLogger("converter").setLevel(logging.DEBUG if args.debug else logging.ERROR)
            given = {"adapter_config": args.adapter_config, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha}
            found = api.inspect(args.run, config=args.config, bases=dict(args.base), **given)
            print(json.dumps(found.as_json(), indent=2) if args.json else found.render())
        elif args.command == "convert":
            return _convert(args)
        elif args.command == "status":
            found = api.status(args.out_root)
            print(json.dumps(found.as_json(), indent=2) if args.json else found.render())
            return 0 if found.ok else 1
    except ConvertError as exc:
        if args.debug:
            raise
        print(f"ckpt2hf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ckpt2hf: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _options(args: argparse.Namespace, run: Path, out: Path | None) -> Any:
    from .pipeline import ConvertOptions

    return ConvertOptions(
        run=run,
        out=out,
        ckpt=args.ckpt,
        config=args.config,
        adapter_dir=args.adapter_dir,
        lora_from=args.lora_from,
        bases=dict(args.base),
        dtype=args.dtype,
        device=args.device,
        verify=args.verify,
        dry_run=args.dry_run,
        force=args.force,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet and not args.json,
        engine=args.engine,
        max_memory=args.max_memory,
        qlora_base=args.qlora_base,
        tokenizer=args.tokenizer,
        source_sha256=args.source_sha256,
        adapter_out=args.adapter_out,
        strict=args.strict,
        auto_class=args.auto_class,
        adapter_config=args.adapter_config,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
    )


def _convert(args: argparse.Namespace) -> int:
    from .writer import out_lock, refuse_existing

    batch = args.out_root is not None or len(args.run) > 1 or args.runs_from is not None
    if not batch:
        spreading = [
            f
            for f, given in (
                ("--jobs", args.jobs != 1),
                ("--shard", args.shard),
                ("--executor", args.executor != "local"),
                ("--ray-address", args.ray_address),
            )
            if given
        ]
        if not args.run:
            raise ConvertError("no run given: name a run folder or checkpoint (several: --out-root DIR)")
        if spreading:
            raise ConvertError(f"{spreading[0]} spreads a migration: give the runs with --out-root DIR")
    if batch and args.out is not None:
        raise ConvertError("--out names one export; with several runs use --out-root DIR (each run into DIR/<name>)")
    if batch and args.adapter_out is not None:
        raise ConvertError("--adapter-out names one folder; convert runs with an adapter folder one at a time")
    if batch and args.dry_run:
        raise ConvertError("--dry-run plans one run; run it for each run on its own")
    if batch:
        return _convert_batch(args)
    started = time.perf_counter() - timings.since_process_start()
    with contextlib.ExitStack() as held:
        if args.out is not None and not args.dry_run:  # at once, before the heavy imports
            refuse_existing(args.out, args.force)
            held.enter_context(out_lock(args.out))
        from .pipeline import convert

        opts = _options(args, args.run[0], args.out)
        result = convert(opts, started=started)
    if args.json:
        print(json.dumps(result, indent=2))
    elif opts.dry_run:
        _print_plan(result)
    else:
        _print_result(result)
    return 0


def _convert_batch(args: argparse.Namespace) -> int:
    from .executors import check_spread, migrate
    from .migration import migration_tasks, parse_shard, read_runs_file, shard_from_env

    if args.out_root is None:
        raise ConvertError("several runs: give --out-root DIR (each run into DIR/<run name>)")
    runs = [*args.run, *(read_runs_file(args.runs_from) if args.runs_from is not None else [])]
    if not runs:
        raise ConvertError("no run given: name run folders or --runs-from FILE")
    check_spread(args.jobs, args.executor)  # before a run is read or recorded
    shard = parse_shard(args.shard) if args.shard else shard_from_env(os.environ)
    template = _options(args, Path(runs[0]), None)
    template.progress = template.progress and args.jobs == 1 and args.executor == "local"
    tasks = migration_tasks(runs, args.out_root, template, force=args.force, shard=shard, debug=args.debug)
    if shard is not None:
        log.info("shard %d/%d: %d of the %d runs", *shard, len(tasks), len(runs))

    found = api.Migration(tuple(migrate(tasks, args.jobs, args.executor, args.ray_address)))
    print(json.dumps(found.as_json(), indent=2) if args.json else found.render())
    failed = found.counts.get("failed", 0)
    if failed:
        print(f"ckpt2hf: error: {failed} of {len(found.runs)} runs failed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run()
