"""A release-ready export: processor and chat files, generation config, model card, a manifest without machine
paths, the precision report, --adapter-out, bases named by hub id, migrations of many runs, one writer per OUT.
Consumers no one here wrote load it: transformers' pipeline and chat template here, llama.cpp's converter in
tests/test_consumers.py."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from filelock import FileLock
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, pipeline

from converter import precision
from converter.example import CHAT_TEMPLATE

from helpers import Started, cli, no_stage_left, refused, run_convert, tree_digest
from trainers import load_trained_module


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_the_manifest_names_no_path_of_this_machine(pano_run, pano_export):
    out, _ = pano_export
    manifest = json.loads((out / "manifest.json").read_text())
    machine = [s for s in _strings(manifest) if s.startswith("/") or str(pano_run.parent.parent) in s]
    assert machine == []
    assert manifest["source"]["run"] == pano_run.name
    assert manifest["source"]["checkpoint"]["path"] == "checkpoints/last.ckpt"
    assert manifest["source"]["adapter_folder"] == "lora_weights"
    assert {n: c.get("base") for n, c in manifest["components"].items()} == {
        "vision_encoder": "vision_encoder",
        "resampler": None,
        "projector": None,
        "language_model": "language_model",
    }
    assert manifest["merged_on"] == {"device": "cpu"} and manifest["engine"] == "full"


def test_processor_chat_template_and_generation_config_ship(pano_export):
    out, manifest = pano_export
    lm, vision = out / "language_model", out / "vision_encoder"
    assert manifest["components"]["vision_encoder"]["processor_files"] == ["preprocessor_config.json"]
    assert type(AutoImageProcessor.from_pretrained(vision)).__name__ == "SiglipImageProcessorPil"
    # the template in both places servers read it from, rendering what the run's tokenizer renders
    assert (lm / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((lm / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(lm)
    chat = [{"role": "user", "content": "w5 w6"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\n"
    assert manifest["components"]["language_model"]["chat_template"] == "renders"
    assert json.loads((lm / "generation_config.json").read_text())["eos_token_id"] == [2]
    assert manifest["components"]["language_model"]["eos_token_id"] == [2]


def test_transformers_pipeline_generates_from_the_export(pano_export):
    out, _ = pano_export
    generate = pipeline("text-generation", model=str(out / "language_model"), device="cpu")
    result = generate("w5 w6 w7", max_new_tokens=4, do_sample=False)
    text = result[0]["generated_text"]
    assert text.startswith("w5 w6 w7") and len(text.split()) > 3


def test_the_model_card_loads_and_its_snippet_runs(pano_export):
    out, _ = pano_export
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["language_model", "vision_encoder"]
    assert (card.data.library_name, card.data.license) == ("transformers", "apache-2.0")
    assert {"ckpt2hf", "lora-merged", "vision-language"} <= set(card.data.tags)
    assert "r=32, lora_alpha=64) on 14 modules" in card.text and "global step 3" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(snippet.replace('"EXPORT"', repr(str(out))), namespace)  # our own card's code, nothing from a checkpoint
    assert type(namespace["language_model"]).__name__ == "Qwen3ForCausalLM"
    assert type(namespace["vision_encoder"]).__name__ == "SiglipVisionModel"
    assert type(namespace["image_processor"]).__name__ == "SiglipImageProcessorPil"
    assert len(namespace["tokenizer"]) == 96
    assert sorted(namespace["projector_state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_adapter_out_rebuilds_the_unmerged_model(pano_run, tmp_path, capsys):
    out, adapter = tmp_path / "out", tmp_path / "adapter"
    code, _, stderr = cli(capsys, "convert", pano_run, "--out", out, "--adapter-out", adapter, "--quiet", "--no-verify")
    assert code == 0, stderr
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == ("language_model", 32, 64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter_out"]["folder"] == "adapter"
    base_dir = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"][
        "language_model_name"
    ]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    trained = load_trained_module(pano_run).model.language_model.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_precision_report_measures_what_a_16_bit_cast_keeps_of_the_delta(caplog):
    """The figures on real values: a delta far below bfloat16's resolution at the weights' scale rounds away."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator)
    small, large = 1e-5 * torch.randn(64, 64, generator=generator), 0.1 * torch.randn(64, 64, generator=generator)
    lost = precision.measure(weight, weight + small, torch.bfloat16)
    kept = precision.measure(weight, weight + large, torch.bfloat16)
    assert lost["rounded_away"] > 0.99 and lost["delta_error"] > 0.99
    assert kept["rounded_away"] < 0.05 and kept["delta_error"] < 0.05
    assert precision.measure(weight, weight.clone(), torch.bfloat16) is None
    with caplog.at_level("INFO", logger="converter.precision"):
        report = precision.summarize("language_model", torch.bfloat16, {"a.weight": lost, "b.weight": kept})
    assert report["over_threshold"] == ["a.weight"] and report["worst"] == "a.weight"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("language_model: a.weight loses much of its LoRA delta")


def test_precision_report_is_the_same_from_both_engines(pano_run, tmp_path):
    reports = {
        engine: run_convert(pano_run, tmp_path / engine, engine=engine, dtype="bfloat16")["components"][
            "language_model"
        ]["precision"]
        for engine in ("full", "streaming")
    }
    assert reports["full"] == reports["streaming"]
    figures = reports["full"]["per_tensor"]
    assert len(figures) == 14 and all(k.startswith("model.layers.") for k in figures)
    assert all(0 <= f["delta_error"] < 0.05 and 0 <= f["rounded_away"] < 0.05 for f in figures.values())
    assert run_convert(pano_run, tmp_path / "fp32")["components"]["language_model"].get("precision") is None


def test_release_problems_are_warnings_naming_what_to_fix(pano_run, tmp_path, capsys, caplog):
    """A vision base without processor files, a chat template that does not render and an EOS id the tokenizer
    lacks: the export is written, with a warning for each."""
    hparams = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    vision, lm = tmp_path / "vision", tmp_path / "lm"
    shutil.copytree(hparams["vision_name"], vision)
    shutil.copytree(hparams["language_model_name"], lm)
    (vision / "preprocessor_config.json").unlink()
    (lm / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    generation = json.loads((lm / "generation_config.json").read_text())
    (lm / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 500]}))
    out = tmp_path / "out"
    argv = ["convert", pano_run, "--out", out, "--base", f"vision_encoder={vision}", "--base", f"language_model={lm}"]
    with caplog.at_level("WARNING", logger="converter"):
        code, _, stderr = cli(capsys, *argv, "--no-verify", "--quiet")
    assert code == 0, stderr
    warnings = [r.getMessage() for r in caplog.records if r.name == "converter.release"]
    assert len(warnings) == 3, warnings
    assert "vision_encoder: the base (vision) has no preprocessor_config.json or processor_config.json" in warnings[0]
    assert "language_model: the chat template does not render (TemplateAssertionError: " in warnings[1]
    assert "nosuchfilter" in warnings[1]
    assert (
        "generation_config.json's eos_token_id 500 is not a token of the shipped tokenizer (96 tokens)" in (warnings[2])
    )
    manifest = json.loads((out / "manifest.json").read_text())["components"]
    assert manifest["vision_encoder"]["processor_files"] == []
    assert manifest["language_model"]["chat_template"] == "does not render"
    assert manifest["language_model"]["eos_token_id"] == [2, 500]


def test_a_hub_id_not_cached_is_fetched_online_and_a_failed_fetch_is_one_line(pano_run, tmp_path, capsys, monkeypatch):
    """Online (HF_HUB_OFFLINE unset), a base named by hub id is fetched; a hub that cannot be reached is one line
    naming the id and --base. (No hub is reachable here: the endpoint is a closed local port.)"""
    import huggingface_hub.constants

    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["language_model_name"] = "someorg/not-cached"
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    line = refused(capsys, run, tmp_path)
    assert line.startswith(
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'}: no config for language_model: "
        "hyper_parameters.language_model_name='someorg/not-cached' is not a local folder, and fetching it from the "
        "Hugging Face hub failed ("
    )
    assert line.endswith(
        "); pass --base language_model=PATH (a folder with config.json), or log in (hf auth login) for a gated model"
    )


def test_many_runs_convert_into_one_root_past_a_failure(pano_run, causal_lm_run, tmp_path, capsys):
    broken = tmp_path / "broken-run"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    root = tmp_path / "exports"
    code, stdout, stderr = cli(capsys, "convert", pano_run, broken, "--out-root", root, "--quiet", "--no-verify")
    assert code == 2
    assert stderr.strip().splitlines()[-1] == "ckpt2hf: error: 1 of 2 runs failed"
    rows = stdout.splitlines()
    assert rows[0].split() == ["run", "status", "time", "export"]
    assert rows[1].split()[:2] == [str(pano_run), "converted"] and rows[1].endswith("MB")
    assert rows[2].split()[:2] == [str(broken), "failed"]
    assert rows[3].strip().startswith(f"{broken / 'checkpoints' / 'last.ckpt'}: ")
    assert rows[-1] == "1 of 2 runs done (1 converted, 1 failed)"
    assert sorted(p.name for p in root.iterdir()) == [".ckpt2hf", pano_run.name]  # the migration's records
    assert cli(capsys, "verify", root / pano_run.name)[0] == 0


def test_runs_of_the_same_name_are_refused_before_anything_is_written(pano_run, tmp_path, capsys):
    twin = tmp_path / "elsewhere" / pano_run.name
    shutil.copytree(pano_run, twin)
    root = tmp_path / "exports"
    code, stdout, stderr = cli(capsys, "convert", pano_run, twin, "--out-root", root, "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"ckpt2hf: error: --out-root {root}: runs with the same name would write the same folder ({pano_run}, {twin} "
        f"-> {root / pano_run.name}); convert them with separate --out-root folders or --out\n"
    )
    assert not root.exists()


def test_a_convert_while_another_writes_the_same_out_stops_before_writing(pano_run, tmp_path, capsys):
    out = tmp_path / "out"
    before = tree_digest(pano_run)
    with FileLock(tmp_path / ".out.ckpt2hf-lock"):  # as another convert holds it (a lock of its own)
        code, stdout, stderr = cli(capsys, "convert", pano_run, "--out", out, "--quiet")
        assert [p.name for p in tmp_path.iterdir()] == [".out.ckpt2hf-lock"]  # the holder's lock, nothing else
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"ckpt2hf: error: {out}: another ckpt2hf convert is writing this export now; wait for it to finish or "
        "choose another --out\n"
    )
    assert tree_digest(pano_run) == before and [p.name for p in tmp_path.iterdir()] == [".out.ckpt2hf-lock"]


@pytest.fixture(scope="module", autouse=True)
def race(pano_run, tmp_path_factory):
    """Two conversions to the same OUT, started 0.2 s apart at the module's first test (they run beside the
    others)."""
    tmp_path = tmp_path_factory.mktemp("race")
    argv = ("convert", pano_run, "--out", tmp_path / "out", "--quiet", "--no-verify")
    first = Started(*argv)
    time.sleep(0.2)
    return tmp_path, [first, Started(*argv)]


def test_two_processes_with_the_same_out_exactly_one_wins(race, capsys):
    tmp_path, started = race
    out = tmp_path / "out"
    results = [(done.returncode, done.stdout, done.stderr) for done in (s.result() for s in started)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith(f"ckpt2hf: error: {out}: ")
    assert "another ckpt2hf convert is writing this export now" in loser[0] or "already exists" in loser[0]
    assert no_stage_left(tmp_path) and not list(tmp_path.glob(".out.*"))
    assert cli(capsys, "verify", out)[0] == 0


@pytest.mark.parametrize("flag", ["--out", "--adapter-out", "--dry-run"])
def test_one_run_flags_with_many_runs_are_one_line(pano_run, causal_lm_run, tmp_path, capsys, flag):
    extra = [flag, tmp_path / "x"] if flag != "--dry-run" else [flag]
    code, _, stderr = cli(capsys, "convert", pano_run, causal_lm_run, "--out-root", tmp_path / "r", *extra)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and flag in stderr


def test_a_base_without_a_tokenizer_converts_and_ships_none(pano_run, tmp_path, capsys, caplog):
    """A checkpoint-only base (no tokenizer files) and a run that saved no tokenizer: nothing to pass with
    --tokenizer, so the conversion goes on, warns once, ships no tokenizer and says so in the manifest and card."""
    from converter.names import TOKENIZER_FILES
    from converter.vocab import NO_TOKENIZER

    hparams = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    lm = tmp_path / "lm"
    shutil.copytree(hparams["language_model_name"], lm)
    removed = [n for n in TOKENIZER_FILES if (lm / n).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(removed)
    for name in removed:
        (lm / name).unlink()
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="converter"):
        code, _, stderr = cli(capsys, "convert", pano_run, "--out", out, "--base", f"language_model={lm}", "--quiet")
    assert code == 0, stderr
    said = [r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage()]
    assert said == [
        f"{pano_run / 'checkpoints' / 'last.ckpt'} (language_model): no tokenizer: neither the run (--tokenizer, "
        "the adapter folder, RUN/tokenizer/, hyper_parameters.tokenizer_name/tokenizer_name_or_path/tokenizer_path/"
        f"tokenizer) nor the base model ({lm}) "
        "has one; the export ships none: add the tokenizer the model was trained with before release"
    ]
    assert not [n for n in TOKENIZER_FILES if (out / "language_model" / n).exists()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["language_model"]["tokenizer"] == NO_TOKENIZER
    assert manifest["verification"]["language_model"]["loads_clean"] is True
    card = (out / "README.md").read_text()
    assert "No tokenizer ships with `language_model`: neither the run nor its base model had one." in card
    assert "AutoTokenizer" not in card
