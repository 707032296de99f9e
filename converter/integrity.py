"""``verify``: check an export against its manifest, byte for byte, and its safetensors files for consistency."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import untrusted
from .hashing import sha256_file
from .names import MANIFEST, WEIGHTS, WEIGHTS_INDEX


def verify_export(out: Path) -> tuple[list[str], int]:
    """Return (differences, files checked). An empty list means every byte is as the manifest says.

    Checks: each listed file exists with its bytes and sha256; no file is unlisted; each index names exactly the
    shards beside it and every tensor once, in the shard that holds it; each safetensors file has a valid header
    with ``format: pt``. An unreadable manifest is a ConvertError.
    """
    out = Path(out)
    path = out / MANIFEST
    with untrusted(path, "no readable manifest", f"is {out} a ckpt2hf export?"):
        listed = _listed(json.loads(path.read_text()))
    problems = []
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    problems += [f"missing: {p}" for p in sorted(set(listed) - present)]
    problems += [f"not in the manifest: {p}" for p in sorted(present - set(listed))]
    for rel in sorted(set(listed) & present):
        record, file = listed[rel], out / rel
        if file.stat().st_size != record["bytes"]:
            problems.append(f"changed: {rel} ({file.stat().st_size} bytes, manifest says {record['bytes']})")
        elif sha256_file(file) != record["sha256"]:
            problems.append(f"changed: {rel} (sha256 differs from the manifest)")
    tensors_by_file: dict[str, list[str]] = {}
    for rel in sorted(p for p in present if p.endswith(".safetensors")):
        try:
            with safe_open(out / rel, framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors_by_file[rel] = list(fh.keys())
        except Exception as exc:  # noqa: BLE001 - a damaged file is a difference to report, whatever the parser says
            problems.append(f"unreadable safetensors: {rel} ({str(exc)[:80]})")
            continue
        if meta.get("format") != "pt":
            problems.append(f"metadata: {rel} has format {meta.get('format')!r}, expected 'pt'")
    for index in sorted(p for p in present if p.endswith(WEIGHTS_INDEX)):
        problems += _check_index(out, index, tensors_by_file)
    return problems, len(present)


def _listed(manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's file records by path; a ValueError if they are not what ckpt2hf writes."""
    files = manifest["files"]
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("path"), str)
        and isinstance(f.get("bytes"), int)
        and isinstance(f.get("sha256"), str)
        for f in files
    ):
        raise ValueError("its file records are not {path, bytes, sha256}")
    return {f["path"]: f for f in files}


def _check_index(out: Path, index: str, tensors_by_file: dict[str, list[str]]) -> list[str]:
    folder = Path(index).parent.as_posix()
    prefix = "" if folder == "." else f"{folder}/"
    try:
        weight_map = json.loads((out / index).read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor to file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"index: {index} is unreadable ({type(exc).__name__})"]
    problems = []
    named = {prefix + shard for shard in weight_map.values()}
    beside = {f for f in tensors_by_file if f.startswith(prefix) and "/" not in f[len(prefix) :]}
    beside -= {prefix + WEIGHTS}
    problems += [f"index: {index} names {s}, which is not there" for s in sorted(named - set(tensors_by_file))]
    problems += [f"index: {index} does not name {s}" for s in sorted(beside - named)]
    counts = Counter(t for f in beside for t in tensors_by_file.get(f, []))
    problems += [f"index: tensor {t} is stored {n} times" for t, n in sorted(counts.items()) if n > 1]
    for tensor, shard in sorted(weight_map.items()):
        if tensor not in tensors_by_file.get(prefix + shard, []):
            problems.append(f"index: {index} puts {tensor} in {shard}, which does not hold it")
    problems += [f"index: {t} is in a shard but not in {index}" for t in sorted(set(counts) - set(weight_map))]
    return problems
