"""The write path alone: an export's worth of bytes through ckpt2hf's writer (``FileSet``: copy into staging
buffers, direct writes, sha256 of every file) against the floor (a durable copy of the same files) and against the
disk alone (the same staging buffers written, nothing copied or hashed).

Tells whether the writer can keep up with the disk, apart from reading, merging and start-up, in seconds and GB/s
measured side by side in one run::

    python bench/writes.py --out /tmp/writes --gb 16 --files 4 --at-once 1 2 4 --reps 2

The payload is one random bf16 tensor of 256 MB written again and again (sha256 costs the same whatever the bytes).
Not part of CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from bench import FLOOR, read_into_cache  # noqa: E402 - the floor of `make bench`, the same copy
from converter import timings  # noqa: E402
from converter.engines import shards, streams  # noqa: E402

PIECE = 256 << 20


def write_files(out: Path, files: int, pieces: int, payload: torch.Tensor, at_once: int) -> dict:
    """The writer: ``files`` files of ``pieces`` tensors each; returns the seconds per stage."""
    out.mkdir(parents=True)
    names = {f"model-{i + 1:05d}-of-{files:05d}.safetensors": [f"f{i}.t{j}" for j in range(pieces)] for i in
             range(files)}  # fmt: skip
    entries = {n: (payload.dtype, tuple(payload.shape)) for ns in names.values() for n in ns}
    with timings.recording() as clock:
        fileset = shards.FileSet(out, shards.FileLayout(names), entries, at_once=at_once)
        for filename, name in fileset.order:
            fileset.stream(filename).write(name, payload)
            fileset.done(filename)
        fileset.close()
        return clock.record()


def disk_alone(out: Path, files: int, pieces: int) -> None:
    """The same number of bytes, from one staging buffer written again and again: nothing copied or hashed."""
    out.mkdir(parents=True)
    stage = mmap.mmap(-1, streams.STAGE_BYTES)
    stage.write(os.urandom(streams.STAGE_BYTES))
    block = memoryview(stage)
    for i in range(files):
        disk = streams.DiskFile(out / f"{i}.bin")
        for _ in range(pieces * PIECE // streams.STAGE_BYTES):
            disk.write(block)
        disk.sync()
        disk.close()


def sha256_alone(payload: torch.Tensor, nbytes: int) -> None:
    view = memoryview(payload.view(torch.uint8).numpy())
    sha = hashlib.sha256()
    for _ in range(nbytes // len(view)):
        sha.update(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder on the disk to measure")
    parser.add_argument("--gb", type=float, default=16.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--at-once", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--also-stage-mb", type=int, nargs="*", default=[], help="the writer with other buffer sizes")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    pieces = max(1, round(args.gb * 1e9 / PIECE / args.files))
    nbytes = pieces * args.files * PIECE
    payload = torch.randn(PIECE // 2, dtype=torch.bfloat16)
    ref, dest = args.out / "ref", args.out / "dest"
    shutil.rmtree(args.out, ignore_errors=True)
    write_files(ref, args.files, pieces, payload, 1)

    def floor() -> None:
        subprocess.run([sys.executable, "-c", FLOOR, str(ref), str(dest)], check=True)

    contenders = {
        "floor (durable copy of the files)": floor,
        "disk alone (direct writes of one buffer)": lambda: disk_alone(dest, args.files, pieces),
        "sha256 alone (one core)": lambda: sha256_alone(payload, nbytes),
    }
    for n in args.at_once:
        contenders[f"writer, {n} file(s) at once"] = lambda n=n: write_files(dest, args.files, pieces, payload, n)
    for mb in args.also_stage_mb:

        def sized(n: int, mb: int) -> dict:
            size, streams.STAGE_BYTES = streams.STAGE_BYTES, mb << 20
            try:
                return write_files(dest, args.files, pieces, payload, n)
            finally:
                streams.STAGE_BYTES = size

        for n in args.at_once:
            contenders[f"writer, {n} file(s) at once, {mb} MB buffers"] = lambda n=n, mb=mb: sized(n, mb)
    results: dict[str, dict] = {name: {"wall_s": [], "stages": []} for name in contenders}
    for rep in range(args.reps):
        for name, fn in contenders.items():
            shutil.rmtree(dest, ignore_errors=True)
            if name.startswith("floor"):
                read_into_cache(ref)
            subprocess.run(["sync"], check=False)
            started = time.perf_counter()
            stages = fn()
            wall = time.perf_counter() - started
            results[name]["wall_s"].append(wall)
            if stages:
                results[name]["stages"].append(stages)
            print(f"rep {rep + 1}: {name}: {wall:.2f} s ({nbytes / wall / 1e9:.2f} GB/s)", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    floor_s = statistics.median(results["floor (durable copy of the files)"]["wall_s"])
    print(f"\n{nbytes / 1e9:.2f} GB in {args.files} files, {streams.STAGES} staging buffers of "
          f"{streams.STAGE_BYTES >> 20} MB per file\n")  # fmt: skip
    print("| contender | median wall | GB/s | x floor | copying | writing | hashing | waiting for disk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        wall = statistics.median(r["wall_s"])
        cells = ["", "", "", ""]
        if r["stages"]:
            last = r["stages"][-1]
            cells = [f"{last.get(k, 0):.1f}" for k in ("copying", "writing", "hashing", "waiting_for_disk")]
        figures = f"{wall:.2f} s | {nbytes / wall / 1e9:.2f} | {wall / floor_s:.2f}"
        print(f"| {name} | {figures} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"bytes": nbytes, "files": args.files, "results": results}, indent=2))


if __name__ == "__main__":
    main()
