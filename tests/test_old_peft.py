"""A run written by an older stack (PEFT 0.6.2, transformers 4.36.2; tests/old_stack.py) converts with no options:
PEFT 0.6's names (no ``.base_layer.``), its ``adapter_model.bin`` read without running its pickle, its adapter
config with the fields of that time, and CLIP's keys under ``vision_model.`` as transformers 4 named them. The export
holds PEFT 0.6's own merge of the live model, bit for bit, and gives the trained logits."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from converter.inspection import inspect_run

from helpers import assert_engines_agree, assert_same_tensors, cli, export_tensors, load_report
from old_stack import OldVLM

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def test_a_peft_0_6_run_converts_to_its_own_merge(old_peft_run, tmp_path, capsys):
    stack = json.loads((old_peft_run / "stack.json").read_text())
    assert (stack["peft"], stack["transformers"]) == ("0.6.2", "4.36.2")
    lm_keys = [k for k in stack["keys"] if ".q_proj." in k and "layers.0." in k and "language_model" in k]
    assert lm_keys == [  # PEFT 0.6: the adapted module's weight has no base_layer
        "model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
        "model.language_model.base_model.model.model.layers.0.self_attn.q_proj.weight",
    ]
    assert (old_peft_run / "lora_weights" / "adapter_model.bin").is_file()
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "convert", old_peft_run, "--out", out, "--quiet")
    assert code == 0, stderr
    assert load_report(out / "language_model")[1] == CLEAN
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["legacy_peft_names"] is True and manifest["adapter"]["sources_compared"]["equal"]
    written = {k.removeprefix("language_model/"): v for k, v in export_tensors(out).items() if "language_" in k}
    assert_same_tensors(written, torch.load(old_peft_run / "merged_lm.pt", weights_only=True))
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    vlm = OldVLM(CLIPVisionModel.from_pretrained(out / "vision_encoder"), AutoModelForCausalLM.from_pretrained(
        out / "language_model", dtype=torch.float32))  # fmt: skip
    vlm.resampler.load_state_dict(load_file(out / "resampler" / "model.safetensors"))
    vlm.projector.load_state_dict(load_file(out / "projector" / "model.safetensors"))
    trained = torch.load(old_peft_run / "trained_logits.pt", weights_only=True)
    with torch.no_grad():
        got = vlm.eval()(trained["pixel_values"], trained["input_ids"])
    torch.testing.assert_close(got, trained["logits"], rtol=1e-5, atol=1e-5)
    assert_engines_agree(old_peft_run, tmp_path, full=out)


def test_inspect_says_the_names_are_pre_0_7(old_peft_run):
    report = inspect_run(old_peft_run)
    (peft,) = report["peft"]
    assert peft["legacy_peft_names"] is True and peft["base_layers"] == 6
    assert peft["parameters"]["lora_alpha"] == 16 and peft["config_from"] == "adapter_config.json"
    assert report["adapter_folder"]["weights"] == "adapter_model.bin"
    assert report["adapter_folder"]["matches_checkpoint"] is True
    assert report["plain_load"]["reasons"][0]["reason"].endswith("(PEFT before 0.7: no .base_layer)")
    assert report["warnings"] == [] or all("preprocessor" in w for w in report["warnings"])
