"""The speeds of the parts a conversion is made of, on this machine, one after the other in one run: reading a
file from the page cache (one thread and several), CRC-32 and sha256 on one core, and the copies between host and
GPU (from and to ordinary, pinned and page-locked ``mmap`` memory), so that a stage's figure in ``bench.py``'s
per-stage table can be told from the machine's own limit::

    python bench/parts.py --file bench/cache/qwen3-8b/runs/qwen3-8b/checkpoints/last.ckpt --gb 8

Prints one JSON object (GB/s per part). Not part of CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from bench import read_into_cache  # noqa: E402

PIECE = 100 << 20  # a Qwen3-8B MLP weight in bfloat16


def _rate(nbytes: int, fn, reps: int = 1) -> float:
    fn()  # warm
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return round(nbytes * reps / (time.perf_counter() - started) / 1e9, 2)


def _read_all(fd: int, view: memoryview, pieces: int, pool: ThreadPoolExecutor, threads: int) -> None:
    """``pieces`` pieces of the file into ``view``, each split over ``threads`` threads."""
    step = PIECE // threads
    for i in range(pieces):
        list(pool.map(lambda s, o=i * PIECE: os.preadv(fd, [view[s : s + step]], o + s), range(0, PIECE, step)))


def reads(path: Path, nbytes: int) -> dict[str, float]:
    """``nbytes`` of ``path`` (from the page cache) in pieces of ``PIECE`` into one reused buffer."""
    fd = os.open(path, os.O_RDONLY)
    buf = torch.empty(PIECE, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    pieces = nbytes // PIECE
    out = {}
    for threads in (1, 2, 4, 8):
        with ThreadPoolExecutor(threads) as pool:
            out[f"pread, {threads} thread(s)"] = _rate(
                pieces * PIECE, lambda p=pool, n=threads: _read_all(fd, view, pieces, p, n)
            )
    fresh = []

    def run_fresh() -> None:
        for i in range(pieces):
            b = torch.empty(PIECE, dtype=torch.uint8)
            os.preadv(fd, [memoryview(b.numpy())], i * PIECE)
            fresh.append(b)
            fresh.clear()

    out["pread into fresh buffers, 1 thread"] = _rate(pieces * PIECE, run_fresh)
    os.close(fd)
    return out


def hashes() -> dict[str, float]:
    data = os.urandom(PIECE)
    return {
        "crc32 (zlib), 1 thread": _rate(PIECE, lambda: zlib.crc32(data), 4),
        "sha256, 1 thread": _rate(PIECE, lambda: hashlib.sha256(data).digest(), 4),
    }


def copies() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    dev = torch.device("cuda")
    pageable = torch.empty(PIECE, dtype=torch.uint8)
    pageable.fill_(1)
    pinned = torch.empty(PIECE, dtype=torch.uint8, pin_memory=True)
    stage = mmap.mmap(-1, PIECE)
    registered = torch.frombuffer(stage, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    assert cudart.cudaHostRegister(registered.data_ptr(), PIECE, 0) == cudart.cudaError.success
    gpu = torch.empty(PIECE, dtype=torch.uint8, device=dev)

    def sync(fn):
        def run() -> None:
            fn()
            torch.cuda.synchronize()

        return run

    out = {
        "to GPU from pageable": _rate(PIECE, sync(lambda: gpu.copy_(pageable, non_blocking=True)), 10),
        "to GPU from pinned": _rate(PIECE, sync(lambda: gpu.copy_(pinned, non_blocking=True)), 10),
        "to host, fresh pageable (.to('cpu'))": _rate(PIECE, lambda: gpu.to("cpu"), 10),
        "to host, reused pageable": _rate(PIECE, lambda: pageable.copy_(gpu), 10),
        "to host, pinned": _rate(PIECE, lambda: pinned.copy_(gpu), 10),
        "to host, page-locked mmap": _rate(PIECE, lambda: registered.copy_(gpu), 10),
    }
    cudart.cudaHostUnregister(registered.data_ptr())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, required=True, help="a large file to read (cached first)")
    parser.add_argument("--gb", type=float, default=8.0, help="how much of it to read per contender")
    args = parser.parse_args()
    nbytes = min(int(args.gb * 1e9), args.file.stat().st_size) // PIECE * PIECE
    read_into_cache(args.file.parent)  # the folder it is in
    result = {"file_bytes_read": nbytes, **reads(args.file, nbytes), **hashes(), **copies()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
