"""convert on real training runs: clean loads, equal logits, exact key sets, provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from helpers import (
    assert_engines_agree,
    assert_same_tensors,
    export_logits,
    export_tensors,
    load_report,
    probe,
    run_convert,
    trained_logits,
)
from trainers import load_trained_module

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def test_export_layout(pano_export):
    out, _ = pano_export
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "language_model/chat_template.jinja",
        "language_model/config.json",
        "language_model/generation_config.json",
        "language_model/model.safetensors",
        "language_model/tokenizer.json",
        "language_model/tokenizer_config.json",
        "manifest.json",
        "projector/model.safetensors",
        "resampler/model.safetensors",
        "vision_encoder/config.json",
        "vision_encoder/model.safetensors",
        "vision_encoder/preprocessor_config.json",
    ]
    assert not [p for p in out.parent.iterdir() if "ckpt2hf-tmp" in p.name]


def test_hf_folders_load_with_no_missing_or_unexpected_keys(pano_export, caplog):
    out, _ = pano_export
    with caplog.at_level("WARNING"):
        _, lm_info = load_report(out / "language_model")
        _, vision_info = load_report(out / "vision_encoder", AutoModel)
    assert lm_info == CLEAN
    assert vision_info == CLEAN
    assert "LOAD REPORT" not in caplog.text


def test_export_matches_the_model_that_trained(pano_run, pano_export):
    out, _ = pano_export
    pixel_values, input_ids = probe(pano_run)
    expected = trained_logits(pano_run, pixel_values, input_ids)
    got = export_logits(out, pixel_values, input_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_language_model_keys_are_exactly_the_plain_model_keys(pano_export):
    out, manifest = pano_export
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "language_model"))
    written = set(load_file(out / "language_model" / "model.safetensors"))
    assert written == set(plain.state_dict())
    assert manifest["keys"]["language_model"] == {
        "written": 11,  # 2 x (q/k norm, 2 layer norms) + norm + embed_tokens + lm_head (modules_to_save)
        "merged into its base layer": 42,  # 14 base layers + 14 lora_A + 14 lora_B
        "original_module superseded by modules_to_save": 2,
    }


def test_vision_resampler_projector_are_exact_copies(pano_run, pano_export):
    out, manifest = pano_export
    state = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["state_dict"]
    for name in ("vision_encoder", "resampler", "projector"):
        written = load_file(out / name / "model.safetensors")
        source = {k.removeprefix(f"model.{name}."): v for k, v in state.items() if k.startswith(f"model.{name}.")}
        assert written.keys() == source.keys()
        assert all(torch.equal(written[k], source[k]) for k in source)
        assert manifest["verification"][name]["exact_tensors"] == len(source)


def test_trained_lm_head_under_tied_embeddings_survives(pano_run, pano_export):
    out, _ = pano_export
    config = json.loads((out / "language_model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    state = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["state_dict"]
    prefix = "model.language_model.base_model.model."
    head = state[prefix + "lm_head.modules_to_save.default.weight"]
    embed = state[prefix + "model.embed_tokens.modules_to_save.default.weight"]
    assert not torch.equal(head, embed)
    written = load_file(out / "language_model" / "model.safetensors")
    assert torch.equal(written["lm_head.weight"], head)
    assert torch.equal(written["model.embed_tokens.weight"], embed)
    model = AutoModelForCausalLM.from_pretrained(out / "language_model")
    assert torch.equal(model.lm_head.weight, head)


def test_manifest_records_provenance_and_hashes(pano_run, pano_export):
    out, manifest = pano_export
    on_disk = json.loads((out / "manifest.json").read_text())
    ckpt = pano_run / "checkpoints" / "last.ckpt"
    assert on_disk["source"]["checkpoint"]["path"] == "checkpoints/last.ckpt"
    identity = on_disk["source"]["checkpoint"]["identity"]
    assert identity["method"] == "sha256 of the zip records (name, size, CRC-32)"
    assert identity["records"] == len(zipfile.ZipFile(ckpt).infolist())
    assert "sha256" not in on_disk["source"]["checkpoint"]  # only with --source-sha256 (test_identity)
    assert on_disk["source"]["checkpoint"]["global_step"] == 3
    listed = {f["path"]: f for f in on_disk["files"]}
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == present
    for path, record in listed.items():
        data = (out / path).read_bytes()
        assert record["bytes"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
    adapter = on_disk["adapter"]
    assert (adapter["peft_type"], adapter["adapted_modules"]) == ("LORA", 14)
    assert (adapter["parameters"]["r"], adapter["parameters"]["lora_alpha"]) == (32, 64)
    assert adapter["parameters"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert adapter["sources_compared"]["equal"] is True
    assert on_disk["verification"]["language_model"]["max_abs_logit_diff"] < 1e-4
    assert set(on_disk["versions"]) >= {"torch", "transformers", "peft", "safetensors"}


def test_safetensors_metadata_and_model_card(pano_export):
    out, _ = pano_export
    for name in ("language_model", "vision_encoder", "resampler", "projector"):
        with safe_open(out / name / "model.safetensors", framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "checkpoints/last.ckpt" in card


def test_28_layer_layout_gives_exactly_311_plain_lm_keys(deep_run, tmp_path):
    out = tmp_path / "deep"
    manifest = run_convert(deep_run, out, engine="full")
    written = set(load_file(out / "language_model" / "model.safetensors"))
    assert len(written) == 311
    per_layer = {
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    }
    expected = {f"model.layers.{i}.{k}" for i in range(28) for k in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert written == expected
    assert manifest["adapter"]["adapted_modules"] == 196
    assert manifest["adapter"]["sources_compared"]["keys"] == 394
    assert load_report(out / "language_model")[1] == CLEAN
    assert_engines_agree(deep_run, tmp_path, full=out)


def test_named_adapter_and_another_attribute(named_adapter_run, tmp_path):
    assert (named_adapter_run / "lora_weights" / "pano" / "adapter_config.json").is_file()
    out = tmp_path / "named"
    manifest = run_convert(named_adapter_run, out)
    assert manifest["adapter"]["name"] == "pano"
    assert manifest["adapter"]["sources_compared"]["equal"] is True
    assert manifest["wrappers"] == {"prefix": "net.", "wrappers": [], "attribute": "net", "removed_anywhere": []}
    pixel_values, input_ids = probe(named_adapter_run)
    torch.testing.assert_close(
        export_logits(out, pixel_values, input_ids),
        trained_logits(named_adapter_run, pixel_values, input_ids),
        rtol=1e-5,
        atol=1e-5,
    )


def test_dora_rslora_and_rank_patterns_follow_peft(dora_run, tmp_path):
    out = tmp_path / "dora"
    manifest = run_convert(dora_run, out)
    assert manifest["adapter"]["parameters"]["use_dora"] and manifest["adapter"]["parameters"]["use_rslora"]
    pixel_values, input_ids = probe(dora_run)
    torch.testing.assert_close(
        export_logits(out, pixel_values, input_ids),
        trained_logits(dora_run, pixel_values, input_ids),
        rtol=1e-5,
        atol=1e-5,
    )


def test_wrapper_prefixes_are_stripped(pano_run, pano_export, tmp_path):
    """Fabric, DDP and torch.compile prefixes around the same weights give the same export."""
    ckpt = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"] = {
        "_forward_module.module.model._orig_mod." + k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
    }
    run = tmp_path / "wrapped"
    shutil.copytree(pano_run, run)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    manifest = run_convert(run, tmp_path / "out")
    assert manifest["wrappers"]["wrappers"] == ["module"]  # DDP's, in front of the keys
    assert manifest["wrappers"]["removed_anywhere"] == ["_forward_module", "_orig_mod"]  # Fabric's, torch.compile's
    assert manifest["wrappers"]["attribute"] == "model"
    reference, _ = pano_export
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(reference))


def test_bfloat16_export_is_verified_within_its_tolerance(pano_run, tmp_path):
    out = tmp_path / "bf16"
    manifest = run_convert(pano_run, out, dtype="bfloat16", verify=True)
    written = load_file(out / "language_model" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "language_model" / "config.json").read_text())["dtype"] == "bfloat16"
    check = manifest["verification"]["language_model"]
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"]
    assert check["exact_tensors"] == 11


def test_causal_lm_config_keeps_an_untrained_tie(causal_lm_run, tmp_path):
    out = tmp_path / "causal"
    manifest = run_convert(causal_lm_run, out, config="causal_lm")
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
    written = set(load_file(out / "model.safetensors"))
    assert "lm_head.weight" not in written
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert manifest["keys"]["language_model"]["lm_head tied to the input embeddings (identical values)"] == 1
    model, info = load_report(out)
    assert info == CLEAN
    module = load_trained_module(causal_lm_run)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_lora_config_from_hyper_parameters_without_adapter_folder(pano_run, pano_export, tmp_path):
    run = tmp_path / "no-adapter"
    shutil.copytree(pano_run, run, ignore=shutil.ignore_patterns("lora_weights"))
    manifest = run_convert(run, tmp_path / "out")
    assert manifest["adapter"]["config_from"] == "hyper_parameters (lora_r, lora_alpha)"
    assert manifest["source"]["adapter_folder"] is None
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(pano_export[0]))


def test_newest_checkpoint_by_global_step(stale_adapter_run, tmp_path):
    run = tmp_path / "no-last"
    shutil.copytree(stale_adapter_run, run)
    (run / "checkpoints" / "last.ckpt").unlink()
    step1 = torch.load(run / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    step1["global_step"] = 1
    torch.save(step1, run / "checkpoints" / "epoch=0-step=1.ckpt")
    manifest = run_convert(run, tmp_path / "out", dry_run=True, lora_from="checkpoint")
    assert manifest["source"]["checkpoint"]["path"] == "checkpoints/epoch=0-step=3.ckpt"
    assert manifest["source"]["checkpoint"]["chosen_because"] == "newest by global_step (3) of 2"


def test_sharded_export_loads_clean(pano_run, tmp_path):
    out = tmp_path / "sharded"
    run_convert(pano_run, out, max_shard_size="40KB")
    index = json.loads((out / "language_model" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (out / "language_model").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert load_report(out / "language_model")[1] == CLEAN


def test_hub_id_resolved_from_the_local_cache(pano_run, tmp_path, monkeypatch):
    """A hub id in hyper_parameters is looked up in the Hugging Face cache, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    hparams = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    repo = cache / "models--someorg--tiny-qwen3"
    shutil.copytree(hparams["language_model_name"], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["language_model_name"] = "someorg/tiny-qwen3"
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    manifest = run_convert(run, tmp_path / "out")
    lm = manifest["components"]["language_model"]
    assert lm["base_config_from"] == "hyper_parameters.language_model_name (Hugging Face cache)"
    assert (lm["base"], lm["base_revision"]) == ("someorg/tiny-qwen3", "a" * 40)
    assert "base_model:\n- someorg/tiny-qwen3\n" in (tmp_path / "out" / "README.md").read_text()


def test_the_example_prints_only_its_run_folder(example_process):
    """make convert reads the example run's folder from ``python -m converter.example ROOT``'s stdout (a fresh
    process, run in the background): nothing the libraries print while it trains may land there (DeepSpeed,
    imported by Lightning where installed, logs to stdout)."""
    root, done = example_process
    assert done.returncode == 0
    assert done.stdout == f"{root / 'runs' / 'pano-tiny'}\n"
    assert (root / "runs" / "pano-tiny" / "checkpoints" / "last.ckpt").is_file()
