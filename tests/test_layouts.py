"""Any Lightning run converts with no options: the layout discovered from the keys, wrappers anywhere, weights the
checkpoint does not hold taken from the base (and counted), adapter settings given when nothing saved them, and the
advice of each refusal followed to a conversion. The runs are real Trainer runs (tests/layouts.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from converter.accounting import FROM_BASE
from converter.inspection import inspect_run

from helpers import assert_engines_agree, assert_same_tensors, cli, export_tensors, load_report, refused
from layouts import RUNS, TUTORIAL_ALPHA
from variants import export_logits

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
CONVERTS = [n for n in RUNS if n != "tutorial-no-alpha"]


@pytest.fixture(scope="module")
def exports(layout_runs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layout-exports")
    return {name: root / name for name in layout_runs}


def _lm_folder(name: str, out):
    return out / "language_model" if RUNS[name].module == "vlm" else out


def _lm_tensors(name: str, out) -> dict[str, torch.Tensor]:
    prefix = "language_model/" if RUNS[name].module == "vlm" else "./"
    tensors = export_tensors(out)
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))


def _check_export(name: str, run, out) -> None:
    """A clean reload, every language-model tensor bit for bit PEFT's merge_and_unload of the live model, the
    trained model's logits."""
    import transformers

    part = json.loads((out / "manifest.json").read_text())["components"]["language_model"]
    lm, report = load_report(_lm_folder(name, out), getattr(transformers, part["auto_class"]))  # the task's class
    assert report == CLEAN
    assert_same_tensors(_lm_tensors(name, out), load_file(run / "merged_lm" / "model.safetensors"))
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    inputs = {k: v for k, v in trained.items() if k in ("input_ids", "decoder_input_ids")}
    with torch.no_grad():
        assert _close(lm(**inputs).logits, trained["lm_logits"])
    if "logits" in trained:
        assert _close(export_logits(out, trained["pixel_values"], trained["input_ids"]), trained["logits"])


@pytest.mark.parametrize("name", CONVERTS)
def test_converts_with_no_options(name, layout_runs, exports, capsys, tmp_path):
    """``convert RUN`` and nothing else (verification on); the streaming engine writes the same."""
    run, out = layout_runs[name], exports[name]
    code, _, stderr = cli(capsys, "convert", run, "--out", out, "--quiet")
    assert code == 0, stderr
    _check_export(name, run, out)
    assert_engines_agree(run, tmp_path, full=out)


def test_the_tutorial_module_is_found_to_be_a_causal_lm(layout_runs, exports, capsys):
    """The PEFT model as ``self.model``, the base named ``model_name``, alpha saved as ``lora.alpha``: the causal LM
    layout is discovered from the keys, r and alpha read from ``lora.r`` and ``lora.alpha``, and inspect says so."""
    manifest = json.loads((exports["tutorial"] / "manifest.json").read_text())
    assert manifest["config"] == "causal_lm"
    assert manifest["adapter"]["config_from"] == "hyper_parameters (lora.r, lora.alpha)"
    assert manifest["adapter"]["parameters"]["lora_alpha"] == TUTORIAL_ALPHA
    report = inspect_run(layout_runs["tutorial"])
    assert report["layout"] == {
        "name": "causal_lm",
        "found_by": "discovered: its components claim 33 of the 33 keys (panorama_vlm 0)",
    }


def test_a_run_that_saved_no_alpha_is_refused_and_converts_with_the_flag_it_names(layout_runs, tmp_path, capsys):
    run = layout_runs["tutorial-no-alpha"]
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'} (language_model): the LoRA scaling is unknown: the run "
        "saved no adapter_config.json (lora_weights/) and no lora_alpha in its hyper-parameters, and the tensors do "
        "not record it; pass --lora-alpha N (the lora_alpha the run trained with), or --adapter-config FILE with its "
        "PEFT config"
    )
    out = tmp_path / "advised"
    code, _, stderr = cli(capsys, "convert", run, "--out", out, "--quiet", "--lora-alpha", str(TUTORIAL_ALPHA))
    assert code == 0, stderr
    _check_export("tutorial-no-alpha", run, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["config_from"] == "--lora-alpha, r from the tensors"


def test_the_other_advice_converts_too(layout_runs, tmp_path, capsys):
    """--adapter-config FILE, the refusal's other way: the PEFT config the run trained with, as PEFT writes it."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=TUTORIAL_ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path / "config")
    run, out = layout_runs["tutorial-no-alpha"], tmp_path / "out"
    argv = ["convert", run, "--out", out, "--quiet", "--adapter-config", tmp_path / "config" / "adapter_config.json"]
    code, _, stderr = cli(capsys, *argv)
    assert code == 0, stderr
    _check_export("tutorial-no-alpha", run, out)


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        # the language model's frozen weights: 14 base layers, 9 norms, the embeddings, lm_head's original copy
        ("trainable-only", {"vision_encoder": 48, "resampler": 0, "projector": 0, "language_model": 25}),
        ("vision-dropped", {"vision_encoder": 48, "resampler": 0, "projector": 0, "language_model": 0}),
    ],
)
def test_weights_the_checkpoint_does_not_hold_come_from_the_base_counted_once(name, counts, layout_runs, exports):
    manifest = json.loads((exports[name] / "manifest.json").read_text())
    keys = manifest["keys"]
    assert {part: keys[part].get(FROM_BASE, 0) for part in counts} == counts
    own = sum(n for part in counts for fate, n in keys[part].items() if fate != FROM_BASE)
    assert own == keys["source_keys"]  # the checkpoint's own keys, each counted once


def test_a_component_the_checkpoint_dropped_is_the_base_s_with_a_warning(
    layout_runs, exports, tmp_path, capsys, caplog
):
    """The frozen vision tower left out of the checkpoint: the export still holds it, the base's tensors exactly."""
    run, out = layout_runs["vision-dropped"], exports["vision-dropped"]
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    base = load_file(f"{hparams['vision_name']}/model.safetensors")
    written = load_file(out / "vision_encoder" / "model.safetensors")
    assert_same_tensors(written, base)
    with caplog.at_level("WARNING", logger="converter"):
        code, _, stderr = cli(capsys, "convert", run, "--out", tmp_path / "again", "--quiet", "--no-verify")
    assert code == 0, stderr
    assert (
        f"vision_encoder: the checkpoint holds none of its tensors (frozen and not saved): all 48 are the base "
        f"model's, read from {hparams['vision_name']}"
    ) in [r.getMessage() for r in caplog.records]


def test_strict_refuses_what_the_checkpoint_lacks(layout_runs, tmp_path, capsys):
    run = layout_runs["trainable-only"]
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    line = refused(capsys, run, tmp_path, "--strict")
    assert line == (
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'} (vision_encoder): 48 tensors of the model are not in "
        "the checkpoint (embeddings.patch_embedding.bias, embeddings.patch_embedding.weight, "
        "embeddings.position_embedding.weight (and 45 more)) and --strict forbids taking them from the base model; "
        f"convert without --strict to read them from {hparams['vision_name']}"
    )


def test_a_compiled_inner_module_is_unwrapped(layout_runs, exports):
    """``model.language_model._orig_mod.base_model.model...``: torch.compile's wrapper inside a component."""
    keys = torch.load(layout_runs["compiled-inner"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.language_model._orig_mod.base_model.model.") for k in keys)
    manifest = json.loads((exports["compiled-inner"] / "manifest.json").read_text())
    assert manifest["config"] == "panorama_vlm"
    assert manifest["keys"]["source_keys"] == len(keys)


def test_the_tutorial_module_of_an_older_stack_converts_with_no_options(old_tutorial_run, tmp_path, capsys):
    """pytorch_lightning 1.9 with PEFT 0.10 (tests/old_stack.py): the causal LM layout discovered, its lora_alpha
    hyper-parameter used, every tensor PEFT 0.10's own merge of the live model (the tied head left to the tie), the
    trained logits."""
    run, out = old_tutorial_run, tmp_path / "out"
    code, _, stderr = cli(capsys, "convert", run, "--out", out, "--quiet")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == "causal_lm"
    assert manifest["source"]["checkpoint"]["lightning_version"] == "1.9.5"
    assert manifest["adapter"]["config_from"] == "hyper_parameters (lora_r, lora_alpha)"
    lm, report = load_report(out)
    assert report == CLEAN
    merged = torch.load(run / "merged_lm.pt", weights_only=True)
    del merged["lm_head.weight"]  # tied to the embeddings: save_pretrained writes it once, as the embeddings
    assert_same_tensors(load_file(out / "model.safetensors"), merged)
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    with torch.no_grad():
        assert _close(lm(input_ids=trained["input_ids"]).logits, trained["lm_logits"])


def test_a_classifier_is_written_as_the_class_its_task_names(layout_runs, exports):
    """PEFT's task_type SEQ_CLS on a masked-LM base: the export is a RobertaForSequenceClassification with the run's
    labels and its trained head (the base has none); inspect and the manifest say which class and why."""
    out = exports["roberta-classifier"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    part = json.loads((out / "manifest.json").read_text())["components"]["language_model"]
    assert (part["auto_class"], part["architecture"], part["auto_class_from"]) == (
        "AutoModelForSequenceClassification", "RobertaForSequenceClassification", "the adapter's task_type SEQ_CLS"
    )  # fmt: skip
    report = inspect_run(layout_runs["roberta-classifier"])
    assert report["plan"][0]["auto_class_from"] == "the adapter's task_type SEQ_CLS"


@pytest.mark.parametrize(
    ("name", "architecture", "kept"),
    [
        ("phi3-fused", "Phi3ForCausalLM", {}),
        ("gemma2-trained-embeddings", "Gemma2ForCausalLM",
         {"sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
        ("t5-seq2seq", "T5ForConditionalGeneration", {}),
        ("roberta-token-classifier", "RobertaForTokenClassification", {"id2label": {"0": "O", "1": "B-X", "2": "I-X"}}),
    ],
)  # fmt: skip
def test_every_family_is_written_as_its_own_class(name, architecture, kept, exports, layout_runs):
    """No family is a special case: Phi-3's fused projections, Gemma2's scaled embeddings with softcapping (its
    trained lm_head differs from the trained embed_tokens copy: untied), T5's shared embeddings and LoRA in the
    encoder and the decoder (SEQ_2_SEQ_LM)."""
    out = exports[name]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert {k: config[k] for k in kept} == kept
    if name == "t5-seq2seq":  # encoder and decoder embed_tokens are the shared embeddings: written once
        from converter.accounting import ALIASED

        assert json.loads((out / "manifest.json").read_text())["keys"]["language_model"][ALIASED] == 2
        assert not {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} & set(
            load_file(out / "model.safetensors")
        )
    if name == "gemma2-trained-embeddings":
        assert config["tie_word_embeddings"] is False
        assert "lm_head.weight" in load_file(out / "model.safetensors")


def test_the_readme_lists_the_task_classes_of_the_table():
    from converter.tasks import TASK_CLASSES

    from helpers import REPO

    text = (REPO / "README.md").read_text()
    rows = dict(line.strip("|").replace("`", "").split("|")[:2] for line in text.splitlines()
                if line.startswith("| `") and "AutoModel" in line and line.count("|") == 3)  # fmt: skip
    listed = {k.split()[0].strip(): v.strip() for k, v in rows.items()}
    assert listed == TASK_CLASSES


def test_a_head_the_hyper_parameters_do_not_size_is_sized_by_its_tensors():
    """No num_labels saved: the label count is the first dimension of the checkpoint's head tensors that the
    config's default count does not fit (and nothing else decides it)."""
    from transformers import RobertaConfig

    from converter.tasks import head_config, head_size_from_tensors

    config = RobertaConfig()  # num_labels 2
    assert head_config(config, "AutoModelForSequenceClassification", {"lr": 1e-3}, "run") is None
    expected = {"classifier.out_proj.weight": (2, 768), "classifier.out_proj.bias": (2,), "x.weight": (2, 2)}
    held = {"classifier.out_proj.weight": (5, 768), "classifier.out_proj.bias": (5,), "x.weight": (2, 2)}
    assert head_size_from_tensors(config, expected, held.get) == 5
    assert head_size_from_tensors(config, expected, {**held, "classifier.out_proj.bias": (7,)}.get) is None
    hparams = {"data": {"num_labels": 4, "problem_type": "multi_label_classification"}}
    assert (
        head_config(config, "AutoModelForSequenceClassification", hparams, "run") == "hyper_parameters.data.num_labels"
    )
    assert (config.num_labels, config.problem_type) == (4, "multi_label_classification")


def test_without_a_task_type_the_base_s_architecture_decides():
    from transformers import LlamaConfig, RobertaConfig, T5Config

    from converter.errors import ConvertError
    from converter.tasks import task_class

    default = "AutoModelForCausalLM"
    t5 = T5Config(architectures=["T5ForConditionalGeneration"])
    assert task_class(default, None, None, t5) == (
        "AutoModelForSeq2SeqLM", "the base's architecture T5ForConditionalGeneration"
    )  # fmt: skip
    assert task_class(default, None, None, LlamaConfig(architectures=["LlamaForCausalLM"]))[0] == default
    masked = RobertaConfig(architectures=["RobertaForMaskedLM"])  # no class of the table: the layout's
    assert task_class(default, None, None, masked) == (default, "the layout (a causal LM)")
    assert task_class(default, "SEQ_CLS", None, masked)[0] == "AutoModelForSequenceClassification"
    assert task_class(default, "SEQ_CLS", "AutoModelForTokenClassification", masked) == (
        "AutoModelForTokenClassification", "--auto-class"
    )  # fmt: skip
    with pytest.raises(ConvertError, match=r"^--auto-class RobertaModel: not a transformers Auto class; use one of "):
        task_class(default, None, "RobertaModel", masked)


def test_a_classifier_whose_task_nothing_saved_follows_the_advice_to_auto_class(layout_runs, tmp_path, capsys):
    """No adapter folder (so no task_type) and a masked-LM base: nothing names the task; the refusal names
    --auto-class, and following it converts to the trained classifier."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(layout_runs["roberta-classifier"], run)
    shutil.rmtree(run / "lora_weights")
    line = refused(capsys, run, tmp_path, "--lora-alpha", "16")
    assert "(language_model): 1 tensors are neither in the checkpoint nor in the base model at " in line
    assert line.endswith(
        "the checkpoint is incomplete, or the base is not the one the run trained from; pass --auto-class CLASS if "
        "the run trained no AutoModelForCausalLM"
    )
    out = tmp_path / "advised"
    argv = ["--lora-alpha", "16", "--auto-class", "AutoModelForSequenceClassification"]
    code, _, stderr = cli(capsys, "convert", run, "--out", out, "--quiet", *argv)
    assert code == 0, stderr
    _check_export("roberta-classifier", run, out)
