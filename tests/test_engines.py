"""The streaming engine writes exactly what the whole-model merge_and_unload engine writes, for every fixture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_convert

CASES = {
    "pano": ("pano_run", {}),
    "pano-bf16-sharded": ("pano_run", {"dtype": "bfloat16", "max_shard_size": "40KB"}),
    "named-adapter": ("named_adapter_run", {}),
    "dora-rslora-patterns": ("dora_run", {}),
    "causal-lm-tied": ("causal_lm_run", {"config": "causal_lm"}),
    "28-layers": ("deep_run", {}),
    "lora-from-adapter": ("stale_adapter_run", {"lora_from": "adapter"}),
}


def _tensors(out):
    found = {}
    for path in sorted(out.rglob("*.safetensors")):
        found.update({f"{path.relative_to(out).parent}/{k}": v for k, v in load_file(path).items()})
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_engines_write_identical_tensors(case, request, tmp_path):
    fixture, options = CASES[case]
    run = request.getfixturevalue(fixture)
    full = run_convert(run, tmp_path / "full", engine="full", **options)
    streaming = run_convert(run, tmp_path / "streaming", engine="streaming", **options)
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "streaming")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    files = sorted(p.relative_to(tmp_path / "full").as_posix() for p in (tmp_path / "full").rglob("*.json"))
    for rel in files:
        if rel != "manifest.json":
            assert json.loads((tmp_path / "full" / rel).read_text()) == json.loads(
                (tmp_path / "streaming" / rel).read_text()
            ), rel
    assert full["keys"] == streaming["keys"]
    assert (full["engine"], streaming["engine"]) == ("full", "streaming")
    for name, check in streaming["verification"].items():
        assert check["exact_tensors"] == full["verification"][name]["exact_tensors"]
        if check.get("merged_tensors"):
            assert check["layers_checked"] > 0
            assert check["max_rel_layer_output_diff"] <= check["layer_tolerance"]


def test_auto_engine_follows_max_memory(pano_run, tmp_path):
    assert run_convert(pano_run, tmp_path / "a", dry_run=True)["engine"] == "full"
    assert run_convert(pano_run, tmp_path / "b", dry_run=True, max_memory="100KB")["engine"] == "streaming"
