"""``make bench``: ckpt2hf against the floor (a durable copy of the export's bytes) and the usual PEFT path.

Builds once and caches (bench/cache/) real runs of Qwen3-shaped PanoramaVLMs trained one step by a Lightning
Trainer, then runs the contenders alternately, each in a fresh process, ``--reps`` times, and reports median wall
time and peak RSS (the child's ``ru_maxrss``), their ratios, a JSON file and a bar chart. Not part of CI.

sha256 speed decides much of a conversion's time (every written file is hashed for the manifest), and CPUs differ:
about 1.3-1.7 GB/s with SHA extensions, 0.38 GB/s without. ``--sha256 native generic`` (the default) runs every
contender twice: as the machine is, and with OpenSSL told to use none of its CPU-specific code
(``OPENSSL_ia32cap=0:0``, the generic sha256: about 0.36 GB/s), as on a CPU without SHA extensions. Each mode's
measured sha256 speed is in the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from converter.names import BUFFERED_WRITES, FILES_AT_ONCE  # noqa: E402 - torch-free

SHAPES = {
    "smoke": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 1000},
    # Qwen3-0.6B: 28 layers, hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128, vocab 151936, tied
    "qwen3-0.6b": {"layers": 28, "hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128},
    # Qwen3-1.7B: hidden 2048, intermediate 6144
    "qwen3-1.7b": {"layers": 28, "hidden": 2048, "intermediate": 6144, "heads": 16, "kv_heads": 8, "head_dim": 128},
    # Qwen3-8B (bf16, for the GPU machine): 36 layers, hidden 4096, intermediate 12288, 32 heads, untied
    "qwen3-8b": {"layers": 36, "hidden": 4096, "intermediate": 12288, "heads": 32, "kv_heads": 8, "head_dim": 128,
                 "tie_word_embeddings": False},
    # The 0.6B shape trained by DeepSpeed ZeRO-3 on two CPU ranks (a checkpoint folder of per-rank partitions)
    "qwen3-0.6b-zero3": {"layers": 28, "hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8,
                         "head_dim": 128},
    # The 0.6B shape with LoHa (r 32, alpha 64, the same targets and modules_to_save) instead of LoRA: a tuner
    # whose merge computes its delta from four factors, against the LoRA run of the same shape.
    "qwen3-0.6b-loha": {"layers": 28, "hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8,
                        "head_dim": 128},
}  # fmt: skip
ZERO3 = {"qwen3-0.6b-zero3"}
TUNER_SHAPES = {"qwen3-0.6b-loha": ("qwen3-0.6b", "LOHA", {"r": 32, "alpha": 64})}  # shape: (LoRA twin, type, settings)

FLOOR = """
import os, shutil, sys
src, dst = sys.argv[1:3]
shutil.copytree(src, dst)
for root, _, files in os.walk(dst):
    for name in files:
        with open(os.path.join(root, name), "rb+") as fh:
            os.fsync(fh.fileno())
"""

SOURCE_HASH = """
import sys
from converter.hashing import sha256_path
sha256_path(sys.argv[1])
"""

# The default source identity (zip records), timed inside the process: after the imports a conversion has anyway.
SOURCE_IDENTITY = """
import sys, time, torch
from converter.sources.checkpoint import open_checkpoint
from converter.sources.pread import SpanReader
with SpanReader() as reader:
    checkpoint = open_checkpoint(sys.argv[1], reader)
    started = time.perf_counter()
    checkpoint.identity()
    print(f"inner_s={time.perf_counter() - started}")
"""

SHA256_SPEED = """
import hashlib, os, time
data = os.urandom(256 << 20)
started = time.perf_counter()
hashlib.sha256(data).digest()
print(f"{(256 << 20) / (time.perf_counter() - started) / 1e6:.0f}")
"""

SHA256_MODES = {"native": {}, "generic": {"OPENSSL_ia32cap": "0:0"}}

# What a conversion imports before it reads a tensor (bitsandbytes marked unavailable, as the command line does).
IMPORTS = (
    "import sys; sys.modules['bitsandbytes'] = None; import converter.preload, transformers.models.qwen3.modeling_qwen3"
)

PEFT_PATH = """
import os, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, dst = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(dst)
for root, _, files in os.walk(dst):
    for name in files:
        with open(os.path.join(root, name), "rb+") as fh:
            os.fsync(fh.fileno())
"""


def build(shape: str, cache: Path, accelerator: str, dtype: str) -> Path:
    """The cached run for ``shape`` (built on first use)."""
    from converter.example import RunSpec, TinyShape, build_bases, build_run

    root = cache / shape
    run = root / "runs" / shape
    if (run / "checkpoints" / "last.ckpt").exists():
        return run
    shutil.rmtree(root, ignore_errors=True)
    dims = {"vocab": 151936, **SHAPES[shape]}
    tiny = TinyShape(vision_hidden=64, vision_layers=2, image_size=32, patch_size=16, **dims)
    print(f"building {shape} in {root} ...", flush=True)
    started = time.perf_counter()
    weights = accelerator == "cpu"  # the PEFT path needs base weights; the GPU run starts from a random init
    bases = build_bases(root, tiny, weights=weights, dtype=dtype)
    # AdamW's state for the 1.7B shape's trainable embeddings does not fit in 24 GB next to the model: SGD there.
    optimizer = "adamw" if shape in ("qwen3-0.6b", "qwen3-8b", "smoke") else "sgd"
    spec = RunSpec(
        name=shape,
        steps=1,
        save_top_k=0,
        accelerator=accelerator,
        lm_dtype=dtype,
        save_adapter=weights,
        optimizer=optimizer,
    )
    if shape in ZERO3:
        sys.path.insert(0, str(REPO / "tests"))
        from distributed import DistSpec, train

        # LoRA only: with trainable embedding copies, two ranks' AdamW states outgrow 24 GB.
        train(root, bases, specs=(DistSpec(shape, "deepspeed", stage=3, modules_to_save=None),))
    elif shape in TUNER_SHAPES:
        sys.path.insert(0, str(REPO / "tests"))
        from converter.example import PANORAMA_TARGETS

        from tuners import TunerRun, peft_config, tuner_module_class

        _, peft_type, settings = TUNER_SHAPES[shape]
        tuner = TunerRun(shape, peft_type, {**settings, "target_modules": PANORAMA_TARGETS},
                         modules_to_save=spec.modules_to_save)  # fmt: skip
        module = tuner_module_class()

        def make_module(vision_dir: Path, lm_dir: Path):
            return module(str(vision_dir), str(lm_dir), peft_config=peft_config(tuner))

        build_run(root, spec, bases=bases, make_module=make_module)
    else:
        build_run(root, spec, bases=bases)
    print(f"built {shape} in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, float | None, dict[str, float]]:
    """Wall seconds, peak RSS bytes, the time the child reports itself (``inner_s=`` on stdout, else None) and the
    seconds per stage a conversion reports (``convert --json``'s ``timings``, else empty) of one child process; a
    failure stops the benchmark."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"benchmark command failed ({status}): {' '.join(cmd)}")
    inner = next((float(line[8:]) for line in out.splitlines() if line.startswith("inner_s=")), None)
    stages = json.loads(out).get("timings", {}) if out.lstrip().startswith("{") else {}
    return wall, usage.ru_maxrss * 1024, inner, stages


def read_into_cache(folder: Path) -> None:
    """Read every file of ``folder`` once, so that the floor copies it from the page cache: ckpt2hf writes its
    exports with O_DIRECT, which leaves nothing of them cached, and a floor read from the disk would be slower than
    the copy floor it stands for."""
    buffer = bytearray(16 << 20)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_shape(shape: str, args: argparse.Namespace, env: dict[str, str], sha256: str) -> dict:
    py = sys.executable
    env = {**env, **SHA256_MODES[sha256]}
    speed = subprocess.run([py, "-c", SHA256_SPEED], env=env, capture_output=True, text=True, check=True)
    # Built in a child so that this process stays small: a forked child starts with its parent's RSS.
    subprocess.run(
        [
            py,
            __file__,
            "--build",
            shape,
            "--cache",
            str(args.cache),
            "--build-accelerator",
            args.build_accelerator,
            "--dtype",
            args.dtype,
        ],
        env=env,
        cwd=REPO,
        check=True,
    )
    run = args.cache / shape / "runs" / shape
    ref = args.cache / shape / "export-ref"

    def convert_to(out: Path, device: str, *flags: str) -> list[str]:
        return [py, "-m", "converter", "convert", str(run), "--out", str(out), "--quiet", "--device", device, *flags]

    if not (ref / "manifest.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        subprocess.run(convert_to(ref, args.device, "--engine", "streaming"), env=env, cwd=REPO, check=True)
    dest = args.cache / shape / "dest"
    convert = convert_to(dest, args.device, "--json")
    contenders = {
        "floor (durable copy of the export)": [py, "-c", FLOOR, str(ref), str(dest)],
        # --source-sha256 records the checkpoint's sha256: one sequential pass over every byte, on one core.
        "sha256 of the checkpoint alone": [py, "-c", SOURCE_HASH, str(run / "checkpoints" / "last.ckpt")],
        # The default identity: the zip records (timed in the process, after its imports).
        "source identity alone (zip records)": [py, "-c", SOURCE_IDENTITY, str(run / "checkpoints" / "last.ckpt")],
        # What any PEFT-based tool imports before it touches a byte.
        "imports alone (torch, transformers, PEFT)": [py, "-c", IMPORTS],
        "convert --no-verify, streaming": [*convert, "--no-verify", "--engine", "streaming"],
        "convert --no-verify, full": [*convert, "--no-verify", "--engine", "full"],
        "convert with verification, streaming": [*convert, "--engine", "streaming"],
        "convert --no-verify --source-sha256, streaming": [*convert, "--no-verify", "--source-sha256", "--engine",
                                                           "streaming"],
    }  # fmt: skip
    if args.also_buffered:  # the same conversion writing through the page cache instead of O_DIRECT
        contenders["convert --no-verify, streaming, buffered writes"] = [
            "env", f"{BUFFERED_WRITES}=1", *convert, "--no-verify", "--engine", "streaming"
        ]  # fmt: skip
    if args.also_one_file:  # a sharded export written one file at a time, as before files were written at once
        contenders["convert --no-verify, streaming, one file at a time"] = [
            "env", f"{FILES_AT_ONCE}=1", *convert, "--no-verify", "--engine", "streaming"
        ]  # fmt: skip
    if args.also_cpu and args.device != "cpu":
        cpu = convert_to(dest, "cpu", "--json", "--no-verify", "--engine", "streaming")
        contenders["convert --no-verify, streaming, merge on the CPU"] = cpu
    if args.peft and (args.cache / shape / "bases" / "language_model" / "config.json").is_file():
        base = args.cache / shape / "bases" / "language_model"
        contenders["PEFT path (from_pretrained, merge_and_unload, save_pretrained)"] = [
            py,
            "-c",
            PEFT_PATH,
            str(base),
            str(run / "lora_weights"),
            str(dest),
        ]
    skip = set(args.skip or [])
    contenders = {k: v for k, v in contenders.items() if not any(s in k for s in skip)}
    results: dict[str, dict] = {
        name: {"wall_s": [], "peak_rss_bytes": [], "inner_s": [], "stages": []} for name in contenders
    }
    floor_name = next(iter(contenders))
    for rep in range(args.reps):
        for name, cmd in contenders.items():
            shutil.rmtree(dest, ignore_errors=True)
            if name == floor_name:
                read_into_cache(ref)
            subprocess.run(["sync"], check=False)
            wall, rss, inner, stages = measure(cmd, env)
            if stages:
                results[name]["stages"].append(stages)
            results[name]["wall_s"].append(wall)
            results[name]["peak_rss_bytes"].append(rss)
            if inner is not None:
                results[name]["inner_s"].append(inner)
            said = f", {inner:.3f} s inside" if inner is not None else ""
            print(
                f"{shape} ({sha256}) rep {rep + 1}: {name}: {wall:.2f} s{said}, peak RSS {rss / 1e9:.2f} GB", flush=True
            )
    shutil.rmtree(dest, ignore_errors=True)
    export_bytes = folder_bytes(ref)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt_bytes = folder_bytes(ckpt) if ckpt.is_dir() else ckpt.stat().st_size
    summary = {}
    floor = statistics.median(results[floor_name]["wall_s"])
    peft_name = next((n for n in contenders if n.startswith("PEFT")), None)
    peft = statistics.median(results[peft_name]["wall_s"]) if peft_name else None
    convert = statistics.median(results["convert --no-verify, streaming"]["wall_s"])
    for name, r in results.items():
        wall, rss = statistics.median(r["wall_s"]), statistics.median(r["peak_rss_bytes"])
        inner = statistics.median(r["inner_s"]) if r["inner_s"] else None
        summary[name] = {
            "median_wall_s": wall,
            "median_inner_s": inner,
            "inner_vs_convert": inner / convert if inner is not None else None,
            "median_peak_rss_bytes": rss,
            "vs_floor": wall / floor,
            "vs_peft_path": wall / peft if peft else None,
            "rss_vs_export_bytes": rss / export_bytes,
            "median_stage_s": {k: statistics.median(s[k] for s in r["stages"]) for k in r["stages"][0]}
            if r["stages"]
            else None,
            "runs": r,
        }
    return {
        "shape": shape,
        "sha256_mode": sha256,
        "sha256_mb_per_s": int(speed.stdout.strip()),
        "dims": SHAPES[shape],
        "checkpoint_bytes": ckpt_bytes,
        "export_bytes": export_bytes,
        "contenders": summary,
    }


def machine(device: str) -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def label(shape: dict) -> str:
    return f"{shape['shape']}, sha256 {shape['sha256_mb_per_s'] / 1000:.2f} GB/s ({shape['sha256_mode']})"


def table(results: list[dict]) -> str:
    lines = [
        "| shape, sha256 speed | contender | median wall | x floor | x PEFT path | peak RSS | RSS / export |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for shape in results:
        for name, c in shape["contenders"].items():
            peft = f"{c['vs_peft_path']:.2f}" if c["vs_peft_path"] else "-"
            wall = f"{c['median_wall_s']:.1f} s"
            if c["median_inner_s"] is not None:
                wall += f" ({c['median_inner_s'] * 1000:.0f} ms inside: {c['inner_vs_convert']:.1%} of convert)"
            lines.append(
                f"| {label(shape)} | {name} | {wall} | {c['vs_floor']:.2f} | {peft} "
                f"| {c['median_peak_rss_bytes'] / 1e9:.2f} GB | {c['rss_vs_export_bytes']:.2f} |"
            )
    return "\n".join(lines)


def stage_table(results: list[dict]) -> str:
    """Where a conversion's time went: the median seconds per stage that ``convert --json`` reports, per contender.

    The stages run on several threads at once (reading ahead, merging, writing, hashing behind the writer), so they
    add up to more than the wall time; ``waiting for ...`` is the converting thread's time blocked on a neighbour.
    """
    from converter.timings import STAGES, WAITS

    keys = (*STAGES, *WAITS)
    lines = [
        "| shape (sha256 mode) | contender | wall | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|---|" + "---:|" * (len(keys) + 1),
    ]
    for shape in results:
        for name, c in shape["contenders"].items():
            stages = c.get("median_stage_s")
            if stages:
                cells = " | ".join(f"{stages.get(k, 0.0):.1f}" for k in keys)
                lines.append(
                    f"| {shape['shape']} ({shape['sha256_mode']}) | {name} | {c['median_wall_s']:.1f} | {cells} |"
                )
    return "\n".join(lines) if len(lines) > 2 else ""


def cost_growth(results: list[dict]) -> str:
    """Seconds per GB of export of ``convert --no-verify, streaming`` across the shapes measured."""
    lines = [
        "| shape (sha256 mode) | export | convert --no-verify | s per GB | floor s per GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape in results:
        c = shape["contenders"].get("convert --no-verify, streaming")
        floor = shape["contenders"].get("floor (durable copy of the export)")
        if c is None:
            continue
        gb = shape["export_bytes"] / 1e9
        per_floor = f"{floor['median_wall_s'] / gb:.2f}" if floor else "-"
        lines.append(
            f"| {shape['shape']} ({shape['sha256_mode']}) | {gb:.2f} GB | {c['median_wall_s']:.1f} s "
            f"| {c['median_wall_s'] / gb:.2f} | {per_floor} |"
        )
    return "\n".join(lines) if len(results) > 1 else ""


TUNER_CONTENDERS = (
    "convert --no-verify, streaming",
    "convert --no-verify, full",
    "convert with verification, streaming",
)


def tuner_ratios(results: list[dict]) -> list[dict]:
    """Each tuner shape against its LoRA twin measured in the same run and sha256 mode: wall and peak RSS ratios."""
    by_key = {(r["shape"], r["sha256_mode"]): r for r in results}
    ratios = []
    for r in results:
        twin = by_key.get((TUNER_SHAPES.get(r["shape"], (None,))[0], r["sha256_mode"]))
        for name in TUNER_CONTENDERS if twin else ():
            if name in r["contenders"] and name in twin["contenders"]:
                mine, lora = r["contenders"][name], twin["contenders"][name]
                ratios.append({
                    "shape": r["shape"], "lora_shape": twin["shape"], "sha256_mode": r["sha256_mode"],
                    "contender": name, "wall_s": mine["median_wall_s"], "lora_wall_s": lora["median_wall_s"],
                    "wall_vs_lora": mine["median_wall_s"] / lora["median_wall_s"],
                    "peak_rss_bytes": mine["median_peak_rss_bytes"],
                    "rss_vs_lora": mine["median_peak_rss_bytes"] / lora["median_peak_rss_bytes"],
                })  # fmt: skip
    return ratios


def tuner_table(ratios: list[dict]) -> str:
    lines = [
        "| tuner shape (sha256 mode) | contender | median wall | LoRA twin | x LoRA | peak RSS | RSS x LoRA |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in ratios:
        lines.append(
            f"| {r['shape']} ({r['sha256_mode']}) | {r['contender']} | {r['wall_s']:.1f} s | {r['lora_wall_s']:.1f} s "
            f"| {r['wall_vs_lora']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['rss_vs_lora']:.2f} |"
        )
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(dict.fromkeys(n for s in results for n in s["contenders"]))
    width = 0.8 / max(1, len(results))
    for i, shape in enumerate(results):
        xs = [j + i * width for j in range(len(names))]
        walls = [shape["contenders"].get(n, {}).get("median_wall_s", 0) for n in names]
        rss = [shape["contenders"].get(n, {}).get("median_peak_rss_bytes", 0) / 1e9 for n in names]
        axes[0].bar(xs, walls, width, label=label(shape))
        axes[1].bar(xs, rss, width, label=label(shape))
    labels = [n.split(" (")[0].replace("convert ", "convert\n") for n in names]
    for ax, title in zip(axes, ["median wall time (s)", "median peak RSS (GB)"], strict=True):
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))], labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-0.6b-loha"], choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--build-accelerator", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-peft", dest="peft", action="store_false")
    parser.add_argument("--sha256", nargs="+", default=["native", "generic"], choices=list(SHA256_MODES))
    parser.add_argument("--also-buffered", action="store_true", help="also time writes through the page cache")
    parser.add_argument("--also-one-file", action="store_true", help="also time writing one shard at a time")
    parser.add_argument("--also-cpu", action="store_true", help="with --device cuda: also time the merge on the CPU")
    parser.add_argument("--skip", nargs="*", help="skip contenders whose name contains this")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument(
        "--discard-runs", action="store_true", help="delete each shape's cached run once measured (disk space)"
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        build(args.build, args.cache, args.build_accelerator, args.dtype)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: list[dict] = []
    for shape in args.shapes:
        for mode in args.sha256:
            results.append(run_shape(shape, args, env, mode))
            report(results, args)  # after each shape: a run cut short keeps what it measured
        if args.discard_runs:
            shutil.rmtree(args.cache / shape, ignore_errors=True)
    print(report(results, args, chart_too=True))


def report(results: list[dict], args: argparse.Namespace, chart_too: bool = False) -> str:
    """Write results[-device].json and .md (and the chart) into ``args.out``; return the tables."""
    ratios = tuner_ratios(results)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "reps": args.reps,
        "shapes": results,
        "tuners_vs_lora": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "results" if args.device == "cpu" else f"results-{args.device}"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = "\n\n".join(
        t
        for t in (table(results), stage_table(results), cost_growth(results), tuner_table(ratios) if ratios else "")
        if t
    )
    (args.out / f"{name}.md").write_text(text + "\n")
    if chart_too:
        try:
            chart(results, args.out / f"{name}.png")
        except ModuleNotFoundError:  # the bench extra (matplotlib) is not installed: the tables are enough
            print("matplotlib is not installed (pip install '.[bench]'): no chart", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
