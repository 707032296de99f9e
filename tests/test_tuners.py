"""Every PEFT tuner that merges converts with no options: LoHa, LoKr, IA3, OFT, BOFT, VeRA, AdaLoRA, FourierFT, HRA,
MiSS and the rest (tests/tuners.py trains each with a real Trainer). The export reloads with no missing key, holds
exactly PEFT's own merge_and_unload of the live model, gives the trained logits, is written identically by both
engines and with or without the adapter folder; --adapter-out writes an adapter PEFT loads back. Tuners PEFT cannot
merge are refused in one line that names them and says why."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from converter.inspection import inspect_run
from converter.peft import registry

from helpers import assert_engines_agree, assert_same_tensors, cli, export_tensors, load_report, refused, run_convert
from tuners import MERGED, TUNERS, bases, tested
from variants import export_logits

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The training process merged on one thread; FFT and SVD round by the thread count (C3A, OSF): the same here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tuner_runs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tuner-exports")
    return {name: root / name for name in tuner_runs}


def _lm_tensors(out) -> dict[str, torch.Tensor]:
    return {k.removeprefix("language_model/"): v for k, v in export_tensors(out).items() if k.startswith("language_")}


@pytest.mark.parametrize("name", MERGED)
def test_converts_by_default_to_peft_own_merge(name, tuner_runs, exports, capsys, tmp_path):
    """Plain convert (verification on): a clean reload, every tensor bit for bit PEFT's merge_and_unload of the live
    model, the trained logits; the streaming engine writes the same."""
    run, out = tuner_runs[name], exports[name]
    argv = ["convert", run, "--out", out, "--quiet", "--adapter-out", out.with_name(name + "-a")]
    code, _, stderr = cli(capsys, *argv)
    assert code == 0, stderr
    assert load_report(out / "language_model")[1] == CLEAN
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["peft_type"] == TUNERS[name].peft_type
    assert manifest["adapter"]["config_from"] == "adapter_config.json"
    assert_same_tensors(_lm_tensors(out), load_file(run / "merged_lm" / "model.safetensors"))
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    got = export_logits(out, trained["pixel_values"], trained["input_ids"])
    assert float((got - trained["logits"]).abs().max()) <= 1e-5 * max(1.0, float(trained["logits"].abs().max()))
    if TUNERS[name].streaming:
        assert_engines_agree(run, tmp_path, full=out)
    else:  # state PEFT computes from the base weights when it builds the model: the whole model is needed
        assert manifest["engine"] == "full"
        line = refused(capsys, run, tmp_path, "--engine", "streaming")
        title = registry.tuner(TUNERS[name].peft_type).title
        assert line.startswith(
            f"ckpt2hf: error: language_model: the {title} adapter's merge reads state PEFT computes from the base "
            "weights when it builds the model (model.layers.0.self_attn.q_proj, "
        )
        assert line.endswith("the streaming engine builds one module at a time and cannot have it; use --engine full")


@pytest.mark.parametrize("name", MERGED)
def test_without_the_adapter_folder_the_config_comes_from_the_hyper_parameters(name, tuner_runs, exports, tmp_path):
    """The PEFT config object that save_hyperparameters saw rebuilds the adapter: the same export."""
    run = tmp_path / "run"
    shutil.copytree(tuner_runs[name], run, ignore=shutil.ignore_patterns("lora_weights"))
    manifest = run_convert(run, tmp_path / "out")
    assert manifest["adapter"]["config_from"] == "hyper_parameters.peft_config"
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(exports[name]))


@pytest.mark.parametrize("name", MERGED)
def test_adapter_out_is_a_peft_folder_of_the_same_type(name, tuner_runs, exports):
    """PeftModel.from_pretrained(base, DIR) gives the trained language model's logits."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    run, adapter = tuner_runs[name], exports[name].with_name(name + "-a")
    assert PeftConfig.from_pretrained(adapter).peft_type.value == TUNERS[name].peft_type
    _, lm_dir = bases(run.parents[1], TUNERS[name])  # built already: found
    base = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    lm = PeftModel.from_pretrained(base, adapter).eval()
    trained = torch.load(run / "trained_logits.pt", weights_only=True)
    with torch.no_grad():
        got = lm(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(got, trained["lm_logits"], rtol=1e-5, atol=1e-5)


def test_inspect_shows_the_tuner_and_its_parameters(tuner_runs):
    (peft,) = inspect_run(tuner_runs["loha"])["peft"]
    assert (peft["tuner"], peft["peft_type"], peft["config_from"]) == ("LoHa", "LOHA", "adapter_config.json")
    assert (peft["parameters"]["r"], peft["parameters"]["alpha"]) == (4, 16)
    assert peft["adapted_modules"] == 6 and peft["modules_to_save"] == ["embed_tokens", "lm_head"]
    vera = inspect_run(tuner_runs["vera"])
    assert vera["adapter_folder"]["shared"] == ["base_model.vera_A", "base_model.vera_B"]
    assert vera["adapter_folder"]["matches_checkpoint"] is True


def test_adalora_compares_through_peft_own_rank_allocation(tuner_runs):
    """The adapter folder holds only the ranks AdaLoRA kept; the checkpoint all of them: equal by PEFT's own save."""
    config = json.loads((tuner_runs["adalora"] / "lora_weights" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # the allocation ran: the folder's tensors are smaller than the checkpoint's
    report = inspect_run(tuner_runs["adalora"])
    assert report["adapter_folder"]["matches_checkpoint"] is True


def test_adalora_from_the_adapter_folder(tuner_runs, exports, tmp_path):
    """--lora-from adapter: the folder's reduced ranks, loaded as PEFT loads them, merge to the same weights."""
    run_convert(tuner_runs["adalora"], tmp_path / "out", lora_from="adapter")
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(exports["adalora"]))


def test_vera_projections_regenerated_from_the_prng_key(tuner_runs):
    """save_projection=False: neither the checkpoint nor the folder holds vera_A/vera_B; PEFT makes them again."""
    from converter.sources import SpanReader, open_checkpoint

    with SpanReader() as reader:  # (torch.load would refuse the VeraConfig object in the hyper-parameters)
        keys = open_checkpoint(tuner_runs["vera-regenerated"] / "checkpoints" / "last.ckpt", reader).source.keys()
    assert not [k for k in keys if k.split(".")[-2] in ("vera_A", "vera_B")] and len(keys) > 0
    assert not [k for k in load_file(tuner_runs["vera-regenerated"] / "lora_weights" / "adapter_model.safetensors")
                if "vera_A" in k.split(".")]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "prompt-tuning",
            "(language_model): the checkpoint holds a prompt-learning adapter (prompt_encoder.default.embedding"
            ".weight): prompt learning keeps learned virtual tokens that are prepended at run time; there are no "
            "weights to merge",
        ),
        (
            "alora",
            "(language_model): a Lora adapter (LORA) cannot be merged into plain weights: aLoRA activates only after "
            "its invocation tokens, so no merged weight reproduces it; serve it with PEFT instead",
        ),
    ],
)
def test_what_peft_cannot_merge_is_refused_saying_why(name, message, tuner_runs, tmp_path, capsys):
    line = refused(capsys, tuner_runs[name], tmp_path)
    assert message in line


def test_adalora_without_its_config_is_refused(tuner_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tuner_runs["adalora-bare"], run, ignore=shutil.ignore_patterns("lora_weights"))
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'} (language_model): the checkpoint holds an AdaLora "
        "adapter (lora_A, lora_B, lora_E (and 1 more)) but not its config: no adapter_config.json (lora_weights/) "
        "and no PEFT config in the hyper-parameters; its tensors do not record the settings its merge needs "
        "(scaling, rank allocation, ...); pass --adapter-dir with the run's adapter folder"
    )


def test_the_registry_refuses_what_merging_would_get_wrong():
    """XLoRA merges without an error in PEFT but ignores its classifier: refused before anything is read."""
    xlora = registry.tuner("XLORA")
    assert xlora.refusal.startswith("its classifier mixes the LoRA experts token by token")
    assert registry.tuner("PROMPT_TUNING").prompt_learning and registry.tuner("LORA").refusal is None
    merged = [t for t in registry.tuners().values() if t.refusal is None]
    assert {"LORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "ADALORA", "FOURIERFT", "HRA", "MISS"} <= {
        t.peft_type for t in merged
    }


def test_the_readme_table_is_the_registry(tuner_runs):
    """The README's table of PEFT types is generated from PEFT's registry (python -m converter.peft.registry)."""
    from helpers import REPO

    readme = (REPO / "README.md").read_text()
    assert registry.supported_table(tested()) in readme
