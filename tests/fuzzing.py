"""Seeded damage to the files of real runs, and the property every damaged case must hold.

Used by tests/test_fuzz.py (a fixed set of seeds in ``make test``) and by ``make fuzz`` (``python tests/fuzzing.py``:
fresh seeds for a given time; every input that breaks the property is written to a folder, as the damaged file and
the damage that made it, for a regression test).

Why hypothesis: the damage is drawn from strategies (bit flips, byte runs, truncations, insertions, random bytes
behind a format's header, damaged zip central directories, local headers and file names), so a failure shrinks to
the smallest damage that still breaks the property, and a seed replays it; it is pure Python and runs in the test
process (no interpreter start per case), where a coverage-guided fuzzer such as atheris needs an instrumented
build and owns the process.

The property: reading ends in success or in one ConvertError whose message is one line and names a file; nothing
is written beside the input, and the input is left as it was. At the command-line tier, ``inspect`` and
``convert`` exit 0 or 2 with one line on stderr, no traceback and no OUT; ``verify`` reports differences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import struct
import sys
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from converter.errors import ConvertError

# --- damage ------------------------------------------------------------------------------------------------------
OFFSET = st.integers(0, 2**31)
BYTES = st.binary(min_size=1, max_size=64)
HEADERS = {"pickle": 2, "zip": 4, "safetensors": 9, "json": 1}  # bytes of a format's header to keep

DAMAGE = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), OFFSET, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), OFFSET, BYTES),
        st.tuples(st.just("truncate"), OFFSET),
        st.tuples(st.just("insert"), OFFSET, BYTES),
        st.tuples(st.just("behind-header"), st.sampled_from(sorted(HEADERS)), st.binary(max_size=512)),
        st.tuples(st.just("zip-directory"), OFFSET, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("zip-local-header"), OFFSET, st.integers(4, 29), st.binary(min_size=1, max_size=4)),
        st.tuples(st.just("zip-name"), OFFSET),
    ),
    min_size=1,
    max_size=3,
)


def _zip_directory(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the zip central directory: from the first entry to the end-of-directory record."""
    end = data.rfind(b"PK\x05\x06")
    start = data.find(b"PK\x01\x02")
    return (start, end) if 0 <= start < end else None


def _overwrite(data: bytearray, at: int, new: bytes) -> None:
    data[at : at + len(new)] = new[: max(0, len(data) - at)]


def damage(original: bytes, plan: list[tuple]) -> bytes:
    """``original`` with each step of ``plan`` applied (offsets taken modulo the current length)."""
    data = bytearray(original)
    for step in plan:
        op, n = step[0], max(1, len(data))
        if op == "flip":
            if data:
                data[step[1] % n] ^= 1 << step[2]
        elif op == "overwrite":
            _overwrite(data, step[1] % n, step[2])
        elif op == "truncate":
            del data[step[1] % n :]
        elif op == "insert":
            data[step[1] % n : step[1] % n] = step[2]
        elif op == "behind-header":
            del data[HEADERS[step[1]] :]
            data += step[2]
        elif op == "zip-directory":
            found = _zip_directory(bytes(data))
            if found is None:
                _overwrite(data, step[1] % n, step[2])
            else:
                _overwrite(data, found[0] + step[1] % (found[1] - found[0]), step[2])
        elif op == "zip-local-header":
            headers = [i for i in range(len(data)) if data[i : i + 4] == b"PK\x03\x04"] if len(data) < 1 << 22 else []
            at = headers[step[1] % len(headers)] if headers else step[1] % n
            _overwrite(data, at + step[2], step[3])
        elif op == "zip-name":  # a file name that is not UTF-8, in an entry flagged as UTF-8
            found = _zip_directory(bytes(data))
            entries = [i for i in range(found[0], found[1]) if data[i : i + 4] == b"PK\x01\x02"] if found else []
            if entries:
                at = entries[step[1] % len(entries)]
                flags = struct.unpack_from("<H", data, at + 8)[0] | 0x800
                struct.pack_into("<H", data, at + 8, flags)
                _overwrite(data, at + 46, b"\xff\xfe")
        else:
            raise ValueError(op)
    return bytes(data)


# --- what reads each kind of input ----------------------------------------------------------------------------
def read_checkpoint(run: Path) -> None:
    """What convert and inspect read of a checkpoint first: its objects, every tensor (CRC-32 checked), identity."""
    from converter.discover import find_inputs
    from converter.sources.checkpoint import open_checkpoint
    from converter.sources.pread import SpanReader

    inputs = find_inputs(run)
    with SpanReader() as reader:
        checkpoint = open_checkpoint(inputs.checkpoint, reader)
        for key in checkpoint.source.keys():
            checkpoint.source.read(key)
        reader.wait_crc()
        checkpoint.identity()


def read_adapter(run: Path) -> None:
    """The adapter folder: its config and every tensor."""
    from converter.sources.adapter import find_adapter_folder, open_adapter_folder
    from converter.sources.pread import SpanReader

    folder = find_adapter_folder(run / "lora_weights")
    with SpanReader() as reader:
        adapter = open_adapter_folder(folder, reader)
        for key in adapter.source.keys():
            adapter.source.read(key)
        reader.wait_crc()


def plan(run: Path) -> None:
    """Everything convert does before it writes: open, plan (adapter config, tokenizer, bases), settle."""
    from converter.pipeline import ConvertOptions, plan_run
    from converter.settle import settle

    found, _ = plan_run(ConvertOptions(run=run, verify=False, progress=False))
    with found.sources:
        settle(found)


def verify(out: Path) -> None:
    from converter.integrity import verify_export

    verify_export(out)


@dataclasses.dataclass(frozen=True)
class Target:
    """One kind of input: the file damaged (relative to the folder), and what reads it."""

    name: str
    fixture: str  # "run", "legacy", "tokenizer", "zero3", "fsdp", "export"
    file: str
    read: Callable[[Path], None]


ZERO = "checkpoints/last.ckpt/checkpoint"  # a ZeRO-3 run's tag folder

TARGETS = {
    t.name: t
    for t in (
        Target("checkpoint zip", "run", "checkpoints/last.ckpt", read_checkpoint),
        Target("legacy checkpoint", "legacy", "checkpoints/last.ckpt", read_checkpoint),
        Target("adapter safetensors", "run", "lora_weights/adapter_model.safetensors", read_adapter),
        Target("adapter_config.json", "run", "lora_weights/adapter_config.json", plan),
        Target("tokenizer.json", "tokenizer", "lora_weights/tokenizer.json", plan),
        Target("tokenizer_config.json", "tokenizer", "lora_weights/tokenizer_config.json", plan),
        Target("DeepSpeed model states", "zero3", f"{ZERO}/zero_pp_rank_0_mp_rank_00_model_states.pt", read_checkpoint),
        Target(
            "DeepSpeed optimizer states", "zero3", f"{ZERO}/zero_pp_rank_1_mp_rank_00_optim_states.pt", read_checkpoint
        ),
        Target("DeepSpeed latest", "zero3", "checkpoints/last.ckpt/latest", read_checkpoint),
        Target("DCP .metadata", "fsdp", "checkpoints/last.ckpt/.metadata", read_checkpoint),
        Target("DCP rank file", "fsdp", "checkpoints/last.ckpt/__0_0.distcp", read_checkpoint),
        Target("DCP meta.pt", "fsdp", "checkpoints/last.ckpt/meta.pt", read_checkpoint),
        Target("export manifest.json", "export", "manifest.json", verify),
        Target("export weights", "export", "language_model/model.safetensors", verify),
    )
}


def prepare(fixture: str, source: Path, root: Path, tokenizer: Path | None = None) -> Path:
    """A working copy of a fixture to damage: ``run`` as it is; ``legacy`` with the checkpoint re-saved in
    torch's legacy (non-zip) format; ``tokenizer`` with the tokenizer of the base LM (folder ``tokenizer``) saved
    beside the adapter by transformers, as recipes that add tokens do."""
    work = root / fixture
    if work.exists():
        return work
    shutil.copytree(source, work)
    if fixture == "legacy":
        import torch

        path = work / "checkpoints" / "last.ckpt"
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    if fixture == "tokenizer":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(work / "lora_weights")
    return work


def digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the property -------------------------------------------------------------------------------------------------
class Broken(AssertionError):
    """A case that broke the property (a crash, a bad message, a changed input, something written)."""


def check(target: Target, folder: Path, original: bytes, plan_: list[tuple], cli: bool = False) -> str:
    """Damage ``target``'s file in ``folder`` by ``plan_``, read it, check the property, restore the file.
    Returns "ok" or the ConvertError's message; raises Broken otherwise."""
    path = folder / target.file
    path.write_bytes(damage(original, plan_))
    before = digest(folder)
    try:
        outcome = _cli(target, folder) if cli else _read(target, folder)
        if digest(folder) != before:
            raise Broken(f"{target.name}: the input folder changed")
        return outcome
    finally:
        path.write_bytes(original)


def _read(target: Target, folder: Path) -> str:
    try:
        target.read(folder)
    except ConvertError as exc:
        message = str(exc)
        if "\n" in message or not message:
            raise Broken(f"{target.name}: a ConvertError of more than one line: {message!r}") from exc
        if str(folder) not in message and not any(name in message for name in ("--", "hyper_parameters")):
            raise Broken(f"{target.name}: the message names no file: {message!r}") from exc
        return message
    except Exception as exc:
        raise Broken(f"{target.name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    return "ok"


def _cli(target: Target, folder: Path) -> str:
    """The command line in this process: inspect and convert (or verify, for an export)."""
    from converter.cli import main

    commands = [["verify", folder]] if target.fixture == "export" else [["inspect", folder], ["convert", folder]]
    said = []
    for argv in commands:
        out = folder.parent / f"{folder.name}-out"
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--out", out, "--no-verify"] if argv[0] == "convert" else []
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                code = main([str(a) for a in [*argv, *extra, "--quiet"]])
        except BaseException as exc:
            raise Broken(f"{target.name}: {argv[0]} raised {type(exc).__name__}: {exc}") from exc
        lines = [line for line in stderr.getvalue().splitlines() if not line.startswith("WARNING ")]
        expected = (0, 1) if argv[0] == "verify" else (0,)
        if code in expected:
            said.append("ok")
        elif code == 2 and len(lines) == 1 and lines[0].startswith("ckpt2hf: error: "):
            if argv[0] == "convert" and (out.exists() or list(folder.parent.glob(f".{out.name}.ckpt2hf-*"))):
                raise Broken(f"{target.name}: a failed convert left {out}")
            said.append(lines[0])
        else:
            raise Broken(f"{target.name}: {argv[0]} exited {code} with {stderr.getvalue()[-2000:]!r}")
        shutil.rmtree(out, ignore_errors=True)
    return " | ".join(said)


# --- make fuzz ----------------------------------------------------------------------------------------------------
def main() -> None:  # pragma: no cover - the long run, outside the test suite
    import argparse
    import random
    import tempfile
    import time

    from hypothesis import HealthCheck, given, seed, settings

    ROUND = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))  # noqa: N806

    parser = argparse.ArgumentParser(description="fuzz ckpt2hf's readers with seeded damage to real runs")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    parser.add_argument("--cli-every", type=int, default=5, help="every Nth case also runs the command line")
    args = parser.parse_args()
    start = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"make fuzz: seed {start}, {args.minutes} minutes, crashes to {args.crashes}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt2hf-fuzz-"))
    folders = _fixtures(root)
    deadline = time.monotonic() + args.minutes * 60
    counts: dict[str, int] = dict.fromkeys(TARGETS, 0)
    found = 0
    round_ = 0
    while time.monotonic() < deadline:
        for target in TARGETS.values():
            folder = folders[target.fixture]
            original = (folder / target.file).read_bytes()
            failing: list[tuple[list[tuple], str]] = []
            case = given(DAMAGE)(_case(target, folder, original, counts, args.cli_every, failing))
            case = seed(start + round_)(settings(ROUND)(case))
            try:
                case()
            except Exception as exc:  # Broken, or a group of them: hypothesis found several distinct failures
                if not isinstance(exc, Broken) and not hasattr(exc, "exceptions"):
                    raise
                shrunk = {}  # hypothesis replays each distinct failure, shrunk, last
                for plan_, why in failing:
                    shrunk[why.splitlines()[0]] = (plan_, why)
                distinct = getattr(exc, "exceptions", [exc])
                for failure in distinct:
                    plan_, why = shrunk[str(failure).splitlines()[0]]
                    found += 1
                    _save(args.crashes, target, original, plan_, why)
                    print(f"BROKEN {target.name}: {why.splitlines()[0]}", flush=True)
            if time.monotonic() >= deadline:
                break
        round_ += 1
        print(f"round {round_}: {sum(counts.values())} cases, {found} broken", flush=True)
    print(json.dumps({"seed": start, "cases": counts, "total": sum(counts.values()), "broken": found}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if found else 0)


def _case(target: Target, folder: Path, original: bytes, counts: dict, cli_every: int, failing: list) -> Callable:
    """One target's property as a function of the damage, recording each failure (the last one is the shrunk)."""

    def case(plan_: list[tuple]) -> None:
        counts[target.name] += 1
        try:
            check(target, folder, original, plan_, cli=counts[target.name] % cli_every == 0)
        except Broken as exc:
            failing.append((plan_, str(exc)))
            raise

    return case


def _save(folder: Path, target: Target, original: bytes, plan_: list[tuple], why: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = damage(original, plan_)
    name = f"{target.name.replace(' ', '-').replace('/', '-')}-{hashlib.sha256(data).hexdigest()[:12]}"
    (folder / f"{name}.bin").write_bytes(data)
    record = {"target": target.name, "damage": [list(map(_jsonable, step)) for step in plan_], "why": why}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    return {"hex": value.hex()} if isinstance(value, bytes) else value


def plan_from_json(steps: list[list[Any]]) -> list[tuple]:
    """A saved damage plan (``make fuzz``'s .json) back as the tuples ``damage`` applies."""
    return [tuple(bytes.fromhex(v["hex"]) if isinstance(v, dict) else v for v in step) for step in steps]


def _fixtures(root: Path) -> dict[str, Path]:  # pragma: no cover - make fuzz builds its own runs
    """Real runs for make fuzz: the seed run (Lightning Trainer), ZeRO-3 and FSDP runs (two gloo ranks), an export."""
    import torch.multiprocessing as mp

    from converter.example import build_bases, build_run
    from converter.pipeline import ConvertOptions, convert

    import distributed

    bases = build_bases(root / "seed")
    run = build_run(root / "seed", bases=bases)
    specs = tuple(s for s in distributed.SPECS if s.name in ("zero3", "fsdp"))
    mp.start_processes(
        distributed.worker,
        args=(distributed.WORLD, str(root / "dist"), [str(b) for b in bases], distributed.free_port(), specs),
        nprocs=distributed.WORLD,
        start_method="spawn",
    )
    dist = distributed.run_folders(root / "dist")
    convert(ConvertOptions(run=run, out=root / "export-src", verify=False, progress=False))
    work = root / "work"
    work.mkdir()
    sources = {"run": run, "legacy": run, "tokenizer": run, "zero3": dist["zero3"], "fsdp": dist["fsdp"]}
    folders = {name: prepare(name, source, work, bases[1]) for name, source in sources.items()}
    folders["export"] = prepare("export", root / "export-src", work)
    return folders


if __name__ == "__main__":  # pragma: no cover
    main()
