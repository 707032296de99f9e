"""inspect: the true numbers for a run, checked against a real plain load_state_dict."""

from __future__ import annotations

import json
import re

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from converter.example import Resampler, make_projector
from converter.inspection import inspect_run, render

from helpers import cli


def _plain_vlm(hparams) -> nn.Module:
    """The evaluation code's model: PanoramaVLM with a plain (un-PEFT'd) LM, under the attribute "model"."""
    vlm = nn.Module()
    vlm.vision_encoder = AutoModel.from_pretrained(hparams["vision_name"])
    dim = vlm.vision_encoder.config.hidden_size
    vlm.language_model = AutoModelForCausalLM.from_pretrained(hparams["language_model_name"])
    vlm.resampler = Resampler(dim, num_queries=4)
    vlm.projector = make_projector(dim, vlm.language_model.config.hidden_size)
    holder = nn.Module()
    holder.model = vlm
    return holder


def test_plain_load_numbers_equal_a_real_plain_load(pano_run):
    report = inspect_run(pano_run)
    ckpt = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    result = _plain_vlm(ckpt["hyper_parameters"]).load_state_dict(ckpt["state_dict"], strict=False)
    plain = report["plain_load"]
    assert plain["missing"] == len(result.missing_keys)
    assert plain["unexpected"] == len(result.unexpected_keys)
    assert plain["loaded"] == len(ckpt["state_dict"]) - len(result.unexpected_keys)


def test_seed_layout_numbers(deep_run):
    report = inspect_run(deep_run)
    keys = torch.load(deep_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["state_dict"].keys()
    lm_keys = [k for k in keys if k.startswith("model.language_model.")]
    other = [k for k in keys if k.split(".")[1] in ("vision_encoder", "resampler", "projector")]
    plain = report["plain_load"]
    assert (plain["missing"], plain["unexpected"], plain["loaded"]) == (311, len(lm_keys), len(other))
    assert len(lm_keys) == 705  # 28 x (7 base layers + 14 LoRA + 4 norms) + 2 embed + norm + 2 lm_head
    assert [r["reason"] for r in plain["reasons"]] == [
        "311 missing: every language_model key of the plain model; the checkpoint holds them under PEFT's "
        "base_model.model. prefix (and .base_layer for adapted modules)",
        "705 unexpected: every language_model key of the checkpoint, named by PEFT (196 base layers, 392 adapter "
        "tensors, 2 modules_to_save copies, 2 original_module copies, 113 other weights)",
    ]
    (peft,) = report["peft"]
    assert peft["prefix"] == "model.language_model."
    assert peft["adapters"] == ["default"]
    assert (peft["adapted_modules"], peft["base_layers"]) == (196, 196)
    assert (peft["tuner"], peft["parameters"]["r"], peft["parameters"]["lora_alpha"]) == ("Lora", 32, 64)
    assert peft["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert peft["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert peft["config_from"] == "adapter_config.json"
    adapter = report["adapter_folder"]
    assert (adapter["keys"], adapter["adapted_modules"], adapter["matches_checkpoint"]) == (394, 196, True)
    assert adapter["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert report["wrappers"] == {"prefix": "model.", "wrappers": [], "attribute": "model", "removed_anywhere": []}
    assert report["components"]["unclaimed"] == []
    assert {p["component"]: p["tensors"] for p in report["plan"]}["language_model"] == 311
    assert report["checkpoint"]["non_weight"]["optimizer_states"] > 0
    assert report["checkpoint"]["others"] == ["epoch=0-step=1.ckpt"]
    assert any("trained lm_head differs from embed_tokens" in w for w in report["warnings"])


def test_stale_adapter_folder_is_flagged(stale_adapter_run):
    report = inspect_run(stale_adapter_run)
    adapter = report["adapter_folder"]
    assert adapter["matches_checkpoint"] is False and adapter["max_abs_diff"] > 0
    assert any(w.startswith("the adapter folder ") and "convert needs --lora-from" in w for w in report["warnings"])
    assert report["plan"] is not None


def test_cli_json_and_text(pano_run, capsys):
    code, stdout, _ = cli(capsys, "inspect", pano_run, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert set(report) >= {
        "checkpoint",
        "layout",
        "wrappers",
        "peft",
        "components",
        "plain_load",
        "adapter_folder",
        "plan",
        "warnings",
    }
    code, stdout, _ = cli(capsys, "inspect", pano_run / "checkpoints" / "epoch=0-step=3.ckpt")
    assert code == 0
    sections = [line for line in stdout.splitlines() if line and not line.startswith(" ")]
    assert sections == [
        "checkpoint",
        "layout",
        "wrappers",
        "peft: language_model",
        "components",
        "plain load_state_dict(strict=False) into the un-PEFT'd model",
        "adapter folder",
        "hyper-parameters (recovered as plain values, interpolations resolved)",
        "vocabulary: language_model",
        "plan (convert --dry-run)",
        "warnings",
    ]
    rows = _rows(render(inspect_run(pano_run)))
    assert rows["layout"] == [
        ["layout", "panorama_vlm"],
        ["found by", "discovered: its components claim 114 of the 114 keys (causal_lm 0)"],
    ]
    assert rows["peft: language_model"][:4] == [
        ["prefix", "model.language_model."],
        ["adapter", "default"],
        ["tuner", "Lora (LORA)"],
        ["adapted", "14 modules"],
    ]
    params = dict(rows["peft: language_model"])["parameters"]
    assert params.startswith("r=32, target_modules=") is False and "lora_alpha=64" in params
    assert params.endswith("(from adapter_config.json)")
    assert ["matches ckpt", "yes"] in rows["adapter folder"]
    assert [r[:3] for r in rows["plan (convert --dry-run)"]] == [
        ["vision_encoder", "vision_encoder/", "48 tensors"],
        ["resampler", "resampler/", "7 tensors"],
        ["projector", "projector/", "4 tensors"],
        ["language_model", "language_model/", "25 tensors"],
        ["vision_encoder: written as SiglipVisionModel (AutoModel, from the layout)"],
        ["language_model: written as Qwen3ForCausalLM (AutoModelForCausalLM, from the adapter's task_type CAUSAL_LM)"],
    ]


def _rows(text: str) -> dict[str, list[list[str]]]:
    """The rendered report as section -> rows of cells (cells are separated by two or more spaces)."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line, [])
        elif line.strip():
            current.append(re.split(r"\s{2,}", line.strip()))
    return sections
