"""Every PEFT run converts by default: added tokens, embedding LoRA, trainable tokens, QLoRA, half precision, PEFT
around the whole VLM, other model families. Each run is a real Trainer run (tests/variants.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from converter.inspection import inspect_run

from helpers import (
    Started,
    assert_engines_agree,
    cli,
    export_tensors,
    load_report,
    refused,
    run_convert,
)
from variants import ADDED, VARIANTS, VLM, export_logits

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


@pytest.fixture(scope="module")
def exports(variant_runs, tmp_path_factory) -> dict:
    """Each run converted as a user would: the command line, no options, verification on."""
    root = tmp_path_factory.mktemp("variant-exports")
    return {name: root / name for name in variant_runs}


ADAPTER_OUT = ("added-tokens", "whole-vlm")  # converted with --adapter-out too


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in ("hydra-env", "tiny-delta")])  # see their tests
def test_converts_by_default_and_matches_the_trained_model(name, variant_runs, exports, capsys, tmp_path):
    """Converted with no options (the full engine, verification on): a clean load and the trained model's logits;
    the streaming engine writes the same."""
    run, out = variant_runs[name], exports[name]
    argv = ["convert", run, "--out", out, "--quiet"]
    if name == "qlora":  # the base weights as the trained model saw them: the run's own, dequantized
        argv += ["--qlora-base", "dequantized"]
    if name in ADAPTER_OUT:
        argv += ["--adapter-out", out.with_name(f"{name}-adapter")]
    code, _, stderr = cli(capsys, *argv)
    assert code == 0, stderr
    assert load_report(out / "language_model")[1] == CLEAN
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    got = export_logits(out, trained["pixel_values"], trained["input_ids"])
    scale = max(1.0, float(trained["logits"].abs().max()))
    # A half-precision run computed in half precision; the export holds its weights, merged in float32.
    tolerance = {"bf16-true": 5e-2, "fp16-true": 1e-2}.get(name, 1e-5)
    assert float((got - trained["logits"]).abs().max()) <= tolerance * scale
    qlora = {"qlora_base": "dequantized"} if name == "qlora" else {}
    assert_engines_agree(run, tmp_path, full=out, **qlora)


@pytest.mark.parametrize("name", ADAPTER_OUT)
def test_adapter_out_rebuilds_the_unmerged_model(name, variant_runs, exports):
    """PeftModel.from_pretrained(base, DIR) on the base as training prepared it (resized to the run's tokenizer)
    gives the trained model's logits; the run's tokenizer ships in DIR."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    run, out = variant_runs[name], exports[name]
    adapter = out.with_name(f"{name}-adapter")
    if name == "whole-vlm":  # LoRA in two parts: a PEFT folder each (the vision LoRA is merged in the export)
        assert sorted(p.name for p in adapter.iterdir()) == ["language_model", "vision_encoder"]
        adapter = adapter / "language_model"
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    base = AutoModelForCausalLM.from_pretrained(hparams["language_model_name"], dtype=torch.float32)
    if name == "added-tokens":
        assert (adapter / "tokenizer.json").is_file()
        base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)), pad_to_multiple_of=64)
    lm = PeftModel.from_pretrained(base, adapter).eval()
    vlm = VLM(AutoModel.from_pretrained(out / "vision_encoder").eval(), lm)
    vlm.resampler.load_state_dict(load_file(out / "resampler" / "model.safetensors"))
    vlm.projector.load_state_dict(load_file(out / "projector" / "model.safetensors"))
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    with torch.no_grad():
        got = vlm.eval()(trained["pixel_values"], trained["input_ids"])
    torch.testing.assert_close(got, trained["logits"], rtol=1e-5, atol=1e-5)


def test_a_delta_below_bfloat16_resolution_is_reported(variant_runs, tmp_path, caplog):
    """A run whose LoRA barely moved the weights, exported in bfloat16: the precision report says the delta is
    gone, a warning per tensor names it."""
    with caplog.at_level("WARNING", logger="converter.precision"):
        manifest = run_convert(variant_runs["tiny-delta"], tmp_path / "out", dtype="bfloat16")
    report = manifest["components"]["language_model"]["precision"]
    assert report["tensors"] == len(report["over_threshold"]) == 14
    assert report["median_delta_error"] > 0.9 and report["rounded_away"] > 0.9
    warned = [r.getMessage().split(" loses ")[0] for r in caplog.records if r.name == "converter.precision"]
    assert warned == [f"language_model: {key}" for key in report["over_threshold"]]


@pytest.mark.parametrize("name", ["added-tokens", "tokenizer-folder", "trainable-tokens"])
def test_the_run_tokenizer_ships_and_encodes_every_added_token(name, variant_runs, exports):
    out = exports[name] / "language_model"
    run = variant_runs[name]
    trained = AutoTokenizer.from_pretrained(run / ("tokenizer" if name == "tokenizer-folder" else "lora_weights"))
    shipped = AutoTokenizer.from_pretrained(out)
    ids = trained.convert_tokens_to_ids(list(ADDED))
    assert ids == [96, 97, 98] and shipped.convert_tokens_to_ids(list(ADDED)) == ids
    assert shipped("<image> w1 <|im_end|>")["input_ids"] == trained("<image> w1 <|im_end|>")["input_ids"]
    rows = load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    assert rows == 128 and len(shipped) == 99
    record = json.loads((exports[name] / "manifest.json").read_text())["components"]["language_model"]["tokenizer"]
    assert record == {
        "found_by": "the run's tokenizer/ folder"
        if name == "tokenizer-folder"
        else "saved beside the adapter (lora_weights/)",
        "tokens": 99,
        "added_tokens": {"<image>": 96, "<|im_start|>": 97, "<|im_end|>": 98},
        "embedding_rows": 128,
        "base_vocab_size": 96,
        "padding_rows": 29,
    }


def test_grown_embeddings_without_the_run_tokenizer_are_refused(variant_runs, tmp_path, capsys):
    """The run saved its tokenizer in RUN/tokenizer/, now gone, and its hyper-parameters do not name it."""
    run = tmp_path / "run"
    shutil.copytree(variant_runs["tokenizer-folder"], run)
    shutil.rmtree(run / "tokenizer")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["tokenizer_name"]
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    line = refused(capsys, run, tmp_path)
    assert line.endswith(
        "the embeddings grew from 96 to 128 rows in training, but the run's tokenizer was not found (looked for "
        "--tokenizer, the adapter folder, RUN/tokenizer/, hyper_parameters.tokenizer_name/tokenizer_name_or_path/"
        "tokenizer_path/tokenizer); the base's cannot produce the added tokens; pass --tokenizer PATH (the base's "
        "own, if no tokens were added)"
    )
    tokenizer = tmp_path / "tok"
    shutil.copytree(variant_runs["tokenizer-folder"] / "tokenizer", tokenizer)
    code, _, stderr = cli(
        capsys, "convert", run, "--out", tmp_path / "out", "--tokenizer", tokenizer, "--quiet", "--no-verify"
    )
    assert code == 0, stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "language_model").convert_tokens_to_ids("<image>") == 96


def test_a_stale_adapter_folder_is_still_caught_beside_saved_embedding_layers(variant_runs, tmp_path, capsys):
    """PEFT saved the resized embedding layers into the adapter folder: expected. A changed LoRA factor is not."""
    run = tmp_path / "run"
    shutil.copytree(variant_runs["added-tokens"], run)
    path = run / "lora_weights" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    line = refused(capsys, run, tmp_path)
    assert " hold different adapter weights (1 of 30 tensors differ, max abs diff 0.5" in line


def test_an_adapter_that_changes_nothing_is_refused_and_idle_modules_are_reported(
    variant_runs, tmp_path, capsys, caplog
):
    run = tmp_path / "run"
    shutil.copytree(variant_runs["embedding-lora-untied"], run)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    b_keys = [k for k in state["state_dict"] if {"lora_B", "lora_embedding_B"} & set(k.split("."))]
    for key in b_keys[:2]:
        state["state_dict"][key].zero_()
    torch.save(state, ckpt)
    with caplog.at_level("WARNING", logger="converter"):
        run_convert(run, tmp_path / "some", lora_from="checkpoint")
    assert "language_model: 2 of 6 adapted modules are unchanged by the merge" in caplog.text
    for key in b_keys:
        state["state_dict"][key].zero_()
    torch.save(state, ckpt)
    line = refused(capsys, run, tmp_path, "--lora-from", "checkpoint")
    assert "the adapter changes nothing in language_model: all 6 adapted modules are unchanged by the merge" in line


@pytest.fixture(scope="module", autouse=True)
def qlora_process(variant_runs, tmp_path_factory):
    """The QLoRA run converted with no options in a process of its own, started at the module's first test."""
    out = tmp_path_factory.mktemp("qlora-process") / "out"
    return out, Started("convert", variant_runs["qlora"], "--out", out, "--json")


def test_qlora_base_weights_come_from_the_base_by_default(qlora_process, exports):
    """In a process of its own, as users run it: without --qlora-base dequantized, bitsandbytes is not even
    imported (tests/test_distributed.py checks that), and the 4-bit run still converts and verifies."""
    out, started = qlora_process
    done = started.result()
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads(done.stdout)
    lm = manifest["components"]["language_model"]
    assert lm["qlora"] == {"quantized_weights": 14, "base_weights_from": "the base model's weights (full precision)"}
    assert manifest["keys"]["language_model"]["4-bit quantization state of a base weight (bitsandbytes)"] == 14 * 5
    dequantized = json.loads((exports["qlora"] / "manifest.json").read_text())["components"]["language_model"]
    assert dequantized["qlora"]["base_weights_from"].startswith("the checkpoint's 4-bit weights, dequantized")
    a, b = export_tensors(out), export_tensors(exports["qlora"])
    assert a.keys() == b.keys()
    q = "language_model/model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # full-precision base + the same delta, against the 4-bit base + delta
    assert torch.equal(a["language_model/model.norm.weight"], b["language_model/model.norm.weight"])


def test_whole_vlm_peft_merges_every_component(variant_runs, exports):
    manifest = json.loads((exports["whole-vlm"] / "manifest.json").read_text())
    assert manifest["wrappers"] == {
        "prefix": "model.base_model.model.", "wrappers": [], "attribute": "model", "removed_anywhere": []
    }  # fmt: skip
    keys = manifest["keys"]
    assert keys["projector"] == {"written": 4, "original_module superseded by modules_to_save": 4}
    assert keys["vision_encoder"]["merged into its base layer"] == 4 * 4  # q/v of two layers: weight, bias, A, B
    assert manifest["verification"]["vision_encoder"]["max_abs_hidden_state_diff"] < 1e-4


def test_inspect_explains_each(variant_runs):
    report = inspect_run(variant_runs["trainable-tokens"])
    (vocab,) = report["vocabulary"]
    assert vocab["added_tokens"] == {"<image>": 96, "<|im_start|>": 97, "<|im_end|>": 98}
    assert (vocab["embedding_rows"], vocab["padding_rows"], vocab["base_vocab_size"]) == (128, 29, 96)
    assert vocab["trainable_token_indices"] == {"embed_tokens": [96, 97, 98]}
    assert vocab["found_by"] == "saved beside the adapter (lora_weights/)"
    lora = inspect_run(variant_runs["embedding-lora"])
    assert lora["vocabulary"][0]["embedding_adapter"] == ["lm_head", "model.embed_tokens"]
    assert lora["adapter_folder"]["matches_checkpoint"] is True
    assert lora["adapter_folder"]["base_layers_saved"] == ["lm_head", "model.embed_tokens"]
    whole = inspect_run(variant_runs["whole-vlm"])
    assert [p["component"] for p in whole["peft"]] == ["vision_encoder", "language_model"]
    assert whole["warnings"] == [] or all("lm_head" in w for w in whole["warnings"])


def test_an_adapter_config_whose_targets_match_nothing(variant_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(variant_runs["llama-clip"], run)
    config_path = run / "lora_weights" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["query_key_value"]
    config_path.write_text(json.dumps(config))
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'} (language_model): PEFT cannot apply ")
    assert "query_key_value" in line
    assert line.endswith(
        "the adapter_config.json is damaged or belongs to another model: pass --adapter-dir with the run's own"
    )
