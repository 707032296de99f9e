"""Benchmark of a migration (``make bench`` runs it after bench.py): 8 small runs converted with ``--out-root``,
one after another, with ``--jobs 2`` and as Ray tasks on 2 workers (a local Ray head started here), as ratios
measured side by side in one run; and a restarted migration where 7 of the 8 are done, against converting one run.

Each contender is a fresh ``ckpt2hf convert`` process into an empty out-root (the restart: into a copy of a finished
migration with one export removed). The 8 runs are copies of one real Lightning run under 8 names (each its own
export). Writes bench/results-migration.{json,md}.

    python bench/migration.py [--reps 3] [--hidden 512 --layers 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 8


EXTRA: list[str] = []  # --convert-args


def convert(*argv: object) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "converter", "convert", *map(str, argv), "--quiet", "--no-verify", *EXTRA],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"bench: ckpt2hf convert {argv} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def build_runs(where: Path, hidden: int, layers: int) -> list[Path]:
    from converter.example import RunSpec, TinyShape, build_bases, build_run

    shape = TinyShape(
        layers=layers, hidden=hidden, intermediate=hidden * 3, heads=8, kv_heads=4, head_dim=hidden // 8, vocab=4096
    )
    bases = build_bases(where, shape)
    run = build_run(where, RunSpec(name="seed", steps=2, lora_r=16, save_top_k=0, optimizer="sgd"), bases)
    runs = []
    for i in range(RUNS):
        runs.append(where / "runs" / f"run-{i}")
        shutil.copytree(run, runs[-1])
    return runs


def ray_head() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    while subprocess.run([ray, "status", f"--address={address}"], capture_output=True).returncode != 0:
        if head.poll() is not None:
            sys.exit("bench: the Ray head did not start")
        time.sleep(1)
    return head, address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--convert-args", default="", help="more flags for every convert, e.g. '--device cpu'")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="where results-migration.* go")
    args = parser.parse_args()
    EXTRA.extend(args.convert_args.split())
    has_ray = importlib.util.find_spec("ray") is not None
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="ckpt2hf-bench-migration-"))
    head = None
    try:
        runs = build_runs(work, args.hidden, args.layers)
        ckpt_mb = (runs[0] / "checkpoints" / "last.ckpt").stat().st_size / 1e6
        head, address = ray_head() if has_ray else (None, "")
        contenders = {
            "one run": lambda out: convert(runs[0], "--out", out / "one"),
            "8 runs, sequential": lambda out: convert(*runs, "--out-root", out),
            "8 runs, --jobs 2": lambda out: convert(*runs, "--out-root", out, "--jobs", "2"),
            "8 runs, Ray (2 workers)": lambda out: convert(
                *runs, "--out-root", out, "--executor", "ray", "--ray-address", address
            ),
        }
        if not has_ray:  # a machine without the extra: said in the table's title
            del contenders["8 runs, Ray (2 workers)"]
        finished = work / "finished"
        convert(*runs, "--out-root", finished)

        def restart(out: Path) -> float:
            shutil.copytree(finished, out)
            shutil.rmtree(out / runs[-1].name)  # 7 of 8 done
            return convert(*runs, "--out-root", out)

        contenders["8 runs restarted, 7 done"] = restart
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.reps):  # interleaved: each repetition measures every contender once
            for name, measure in contenders.items():
                out = work / f"out-{rep}-{len(times[name])}-{abs(hash(name))}"
                times[name].append(measure(out))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if head is not None:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    sequential = medians["8 runs, sequential"]
    rows = [
        {
            "contender": name,
            "median_s": round(m, 2),
            "x_sequential": round(m / sequential, 3),
            "x_one_run": round(m / medians["one run"], 3),
            "runs_s": [round(t, 2) for t in times[name]],
        }
        for name, m in medians.items()
    ]
    machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    result = {"machine": machine, "checkpoint_mb": round(ckpt_mb, 1), "reps": args.reps, "rows": rows}
    (args.out / "results-migration.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Migration of {RUNS} runs ({ckpt_mb:.0f} MB checkpoint each, hidden {args.hidden}, {args.layers} layers; "
        f"{machine}; median of {args.reps}; every contender a fresh `ckpt2hf convert --no-verify{' ' if EXTRA else ''}"
        f"{' '.join(EXTRA)}` process{'' if has_ray else '; Ray not installed'})",
        "",
        "| contender | median wall | x sequential | x one run |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['contender']} | {r['median_s']:.1f} s | {r['x_sequential']:.2f} | {r['x_one_run']:.2f} |"
            for r in rows
        ),
    ]
    (args.out / "results-migration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
