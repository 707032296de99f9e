"""Mixture-of-experts LMs (a tiny Qwen3-MoE; tests/tuners.py trains the runs): transformers fuses the experts in
memory (``mlp.experts.gate_up_proj``, one 3-D parameter) and writes one tensor per expert. LoRA on attention, on the
router and on the fused experts themselves (PEFT ``target_parameters``) convert in both engines; every export holds
exactly the names and shapes ``save_pretrained`` gives the base model (the base folder's), and its values are PEFT's
own merge of the live model written by ``save_pretrained`` (test_tuners)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from helpers import run_convert

MOE = ("moe-attention", "moe-router", "moe-experts")


def _names_and_shapes(folder) -> dict[str, tuple[int, ...]]:
    found = {}
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    for name in files:
        with safe_open(folder / name, framework="pt") as fh:
            found.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return found


@pytest.mark.parametrize("engine", ["full", "streaming"])
@pytest.mark.parametrize("name", MOE)
def test_moe_exports_are_written_in_the_hub_format(name, engine, tuner_runs, tmp_path):
    run = tuner_runs[name]
    config = json.loads((run / "lora_weights" / "adapter_config.json").read_text())
    if name == "moe-experts":
        assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    out = tmp_path / "out"
    manifest = run_convert(run, out, engine=engine, verify=True, max_shard_size="40KB")  # experts across shards too
    base = run.parents[1] / "bases" / "qwen3-moe"
    written = _names_and_shapes(out / "language_model")
    assert written == _names_and_shapes(base)  # what save_pretrained wrote for the base model
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in written
    assert not [k for k in written if k.endswith("gate_up_proj")]
    checks = manifest["verification"]["language_model"]
    assert checks["loads_clean"] is True
    if engine == "streaming" and name != "moe-attention":  # the router and fused experts have no forward of their own
        assert checks["layers_not_probed"] == 2
    assert manifest["components"]["language_model"]["tensors"] == len(written)
