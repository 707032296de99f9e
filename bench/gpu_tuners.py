"""By hand on a GPU machine (CI has none): tuner runs converted with ``--device cuda`` by both engines.

``python bench/gpu_tuners.py ROOT [NAME ...]`` trains the named runs of ``tests/tuners.py`` (on the CPU, as the test
suite does), converts each with the merge on the GPU, by the full engine and (where the tuner allows) the streaming
engine, with verification on, and compares every tensor of the export with PEFT's own ``merge_and_unload`` of the
live model (made on the CPU). A GPU merge is not bit for bit the CPU's (other kernels, TF32 off or on), so the report
gives the largest difference and how many tensors are identical. Prints one JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

DEFAULT = ("loha", "lokr", "ia3", "oft", "boft", "vera-regenerated", "adalora", "fourierft", "hra", "miss",
           "psoft", "moe-experts", "moe-router")  # fmt: skip


def compare(out: Path, merged: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    expected = load_file(merged / "model.safetensors")
    got = {}
    for path in (out / "language_model").glob("*.safetensors"):
        got.update(load_file(path))
    diffs = {k: float((got[k].double() - v.double()).abs().max()) for k, v in expected.items() if k in got}
    return {
        "same_names": sorted(got) == sorted(expected),
        "identical": sum(torch.equal(got[k], v) for k, v in expected.items() if k in got),
        "tensors": len(expected),
        "max_abs_diff": max(diffs.values(), default=0.0),
    }


def main() -> None:
    from tuners import TUNERS, build_tuner_run

    root, names = Path(sys.argv[1]), sys.argv[2:] or DEFAULT
    report = {}
    for name in names:
        run = build_tuner_run(root, TUNERS[name])
        engines = ("full", "streaming") if TUNERS[name].streaming else ("full",)
        for engine in engines:
            out = root / "exports" / f"{name}-{engine}"
            cmd = [sys.executable, "-m", "converter", "convert", str(run), "--out", str(out), "--quiet", "--force",
                   "--device", "cuda", "--engine", engine]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            entry = {"rc": done.returncode, "seconds": round(time.perf_counter() - started, 2), "stderr": done.stderr}
            if done.returncode == 0:
                manifest = json.loads((out / "manifest.json").read_text())
                entry.update(
                    device=manifest["merged_on"]["device"],
                    engine=manifest["engine"],
                    verification=manifest["verification"],
                    **compare(out, run / "merged_lm"),
                )
            report[f"{name} {engine}"] = entry
            print(name, engine, {k: v for k, v in entry.items() if k != "verification"}, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
