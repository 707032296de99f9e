"""Disagreeing inputs and bad input: one-line errors, exit code 2, nothing written, sources untouched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli, run_convert, tree_digest


def test_stale_adapter_folder_is_refused_with_numbers_and_a_choice(stale_adapter_run, tmp_path, capsys):
    before = tree_digest(stale_adapter_run)
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "convert", stale_adapter_run, "--out", out, "--quiet")
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"ckpt2hf: error: {stale_adapter_run}/lora_weights/adapter_model.safetensors and "
        f"{stale_adapter_run}/checkpoints/last.ckpt hold different adapter weights (30 of 30 tensors differ, "
        "max abs diff "
    )
    assert lines[0].endswith(
        "the adapter folder was probably saved at another step; choose one with --lora-from checkpoint or "
        "--lora-from adapter"
    )
    assert not out.exists() and tree_digest(stale_adapter_run) == before


def test_lora_from_picks_a_source(stale_adapter_run, tmp_path):
    from_ckpt = run_convert(stale_adapter_run, tmp_path / "ckpt", lora_from="checkpoint")
    from_adapter = run_convert(stale_adapter_run, tmp_path / "adapter", lora_from="adapter")
    assert from_ckpt["adapter"]["tensors_from"] == "checkpoint"
    assert from_adapter["adapter"]["tensors_from"] == "adapter"
    assert from_adapter["adapter"]["sources_compared"]["differing_tensors"] == 30
    a = load_file(tmp_path / "ckpt" / "language_model" / "model.safetensors")
    b = load_file(tmp_path / "adapter" / "language_model" / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    # lm_head comes from modules_to_save: with --lora-from adapter it is the adapter folder's tensor exactly
    adapter = load_file(stale_adapter_run / "lora_weights" / "adapter_model.safetensors")
    assert torch.equal(b["lm_head.weight"], adapter["base_model.model.lm_head.weight"])


def _one_line_error(capsys, *argv):
    code, stdout, stderr = cli(capsys, *argv, "--quiet")
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert stdout == ""
    return lines[0]


@pytest.fixture
def run_copy(pano_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    return run


def test_missing_run(tmp_path, capsys):
    line = _one_line_error(capsys, "convert", tmp_path / "nope")
    assert line == f"ckpt2hf: error: {tmp_path / 'nope'}: no such run folder or checkpoint file"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty; re-copy it or choose another with --ckpt"),
        (b"\x00\x01garbage" * 100, "not a readable PyTorch checkpoint"),
    ],
    ids=["empty", "random-bytes"],
)
def test_unreadable_checkpoint(run_copy, tmp_path, capsys, content, expected):
    ckpt = run_copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(content)
    before = tree_digest(run_copy)
    out = tmp_path / "out"
    line = _one_line_error(capsys, "convert", run_copy, "--out", out)
    assert line.startswith(f"ckpt2hf: error: {ckpt}: ")
    assert expected in line
    assert not out.exists() and tree_digest(run_copy) == before


def test_truncated_checkpoint(run_copy, tmp_path, capsys):
    ckpt = run_copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = _one_line_error(capsys, "convert", run_copy, "--out", tmp_path / "out")
    assert line.startswith(f"ckpt2hf: error: {ckpt}: not a readable PyTorch checkpoint (")
    assert line.endswith("the file may be truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_missing_base_config_names_the_option(run_copy, tmp_path, capsys):
    ckpt = torch.load(run_copy / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["language_model_name"] = "someorg/not-cached"
    torch.save(ckpt, run_copy / "checkpoints" / "last.ckpt")
    line = _one_line_error(capsys, "convert", run_copy, "--out", tmp_path / "out")
    assert line == (
        f"ckpt2hf: error: {run_copy / 'checkpoints' / 'last.ckpt'}: no config for language_model: hyper_parameters "
        "give language_model_name='someorg/not-cached', neither a local folder nor in the Hugging Face cache; "
        "pass --base language_model=PATH (a folder with config.json)"
    )
    # the option it names works
    lm = ckpt["hyper_parameters"]["vision_name"].replace("vision_encoder", "language_model")
    code, _, stderr = cli(
        capsys,
        "convert",
        run_copy,
        "--out",
        tmp_path / "out",
        "--base",
        f"language_model={lm}",
        "--quiet",
        "--no-verify",
    )
    assert code == 0, stderr


def test_unknown_scaling_is_refused(run_copy, tmp_path, capsys):
    shutil.rmtree(run_copy / "lora_weights")
    ckpt = torch.load(run_copy / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["hyper_parameters"]["lora_alpha"]
    torch.save(ckpt, run_copy / "checkpoints" / "last.ckpt")
    line = _one_line_error(capsys, "convert", run_copy, "--out", tmp_path / "out")
    assert line.endswith(
        "the LoRA scaling is unknown: the run saved no adapter_config.json (lora_weights/) and no lora_alpha in its "
        "hyper-parameters, and the tensors do not record it; pass --lora-alpha N (the lora_alpha the run trained "
        "with), or --adapter-config FILE with its PEFT config"
    )
    code, _, stderr = cli(capsys, "convert", run_copy, "--out", tmp_path / "out", "--quiet", "--lora-alpha", "64")
    assert code == 0, stderr  # the advice followed (verification on: the logits of the unmerged model)


def test_unclaimed_keys_are_listed_with_a_hint(run_copy, tmp_path, capsys):
    ckpt = torch.load(run_copy / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["model.text_head.weight"] = torch.zeros(2)
    torch.save(ckpt, run_copy / "checkpoints" / "last.ckpt")
    line = _one_line_error(capsys, "convert", run_copy, "--out", tmp_path / "out")
    assert line.startswith(
        "ckpt2hf: error: 1 checkpoint keys belong to no component of panorama_vlm.yaml: model.text_head.weight; "
        "add a component or a drop rule to "
    )
    # The advice followed: a copy of the layout with a drop rule for the key, passed with --config.
    from converter.layout import CONFIG_DIR

    config = tmp_path / "pano_with_text_head.yaml"
    text = (
        (CONFIG_DIR / "panorama_vlm.yaml")
        .read_text()
        .replace("drop: []", "drop:\n  - pattern: '^text_head[.]'\n    reason: an auxiliary head used only in training")
    )
    config.write_text(text)
    code, _, stderr = cli(capsys, "convert", run_copy, "--out", tmp_path / "out", "--quiet", "--config", config)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["keys"]["dropped_by_config"] == {"an auxiliary head used only in training": 1}


def test_existing_out_needs_force(pano_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    line = _one_line_error(capsys, "convert", pano_run, "--out", out)
    assert line == f"ckpt2hf: error: {out}: already exists; pass --force to replace it or choose another --out"
    assert (out / "keep.txt").read_text() == "previous export"
    code, _, _ = cli(capsys, "convert", pano_run, "--out", out, "--force", "--quiet", "--no-verify")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dry_run_writes_nothing(pano_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, "convert", pano_run, "--out", out, "--dry-run", "--json")
    assert code == 0 and not out.exists()
    plan = json.loads(stdout)
    assert plan["dry_run"] is True
    by_name = {p["component"]: p for p in plan["plan"]}
    assert by_name["language_model"]["tensors"] == 25
    assert by_name["language_model"]["tie_word_embeddings"] is False
    code, stdout, _ = cli(capsys, "convert", pano_run, "--out", out, "--dry-run")
    assert code == 0 and "language_model" in stdout and "25 tensors" in stdout


def test_dry_run_reads_no_tensor_data(run_copy, pano_run, tmp_path, capsys):
    """Every tensor record of the checkpoint is damaged: the plan (metadata only) is the clean run's; a real
    conversion, which reads the data, stops on the first damaged record."""
    from converter.sources import SpanReader, open_checkpoint

    ckpt = run_copy / "checkpoints" / "last.ckpt"
    with SpanReader() as reader:
        spans = open_checkpoint(ckpt, reader).source.spans.values()
        offsets = {span.record.offset for span in spans if span.nbytes}
    data = bytearray(ckpt.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    damaged = run_convert(run_copy, tmp_path / "a", dry_run=True)
    clean = run_convert(pano_run, tmp_path / "b", dry_run=True)
    assert damaged["plan"] == clean["plan"] and damaged["engine"] == clean["engine"] == "full"
    line = _one_line_error(capsys, "convert", run_copy, "--out", tmp_path / "out")
    assert "fails its CRC-32 check" in line


def test_cuda_requested_without_a_gpu(pano_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = _one_line_error(capsys, "convert", pano_run, "--out", tmp_path / "out", "--device", "cuda")
    assert line == "ckpt2hf: error: --device cuda: no CUDA device is available here; use --device cpu or auto"
