"""The checkpoint's identity in the manifest: its zip records (name, size, CRC-32), read in milliseconds; the full
sha256 only with ``--source-sha256`` (test_hashing)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import ConvertError
from converter.identity import source_identity
from converter.sources.checkpoint import open_checkpoint
from converter.sources.pread import SpanReader

from helpers import cli, run_convert

RECORDS = "sha256 of the zip records (name, size, CRC-32)"


def test_the_same_content_anywhere_has_the_same_identity_and_a_changed_tensor_another(pano_run, tmp_path):
    ckpt = pano_run / "checkpoints" / "last.ckpt"
    original = source_identity(ckpt)
    copy = tmp_path / "elsewhere.ckpt"
    shutil.copyfile(ckpt, copy)
    os.utime(copy, ns=(1, 1))
    assert source_identity(copy).digest == original.digest  # a copy, renamed, another mtime: the same content
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("lora_B.default.weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1
    torch.save(state, copy)
    changed = source_identity(copy)
    assert changed.digest != original.digest and changed.record()["records"] == original.record()["records"]
    assert original.record()["method"] == RECORDS


def test_files_without_stored_checksums_are_hashed_in_full(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, path)
    identity = source_identity(path)
    assert identity.record()["method"] == "sha256 of every byte"
    assert identity.digest == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "in_full"),
    [
        ("zero3", ["latest", "zero_to_fp32.py", "zero_to_torch.py"]),  # DeepSpeed's text files; every .pt by records
        ("fsdp", [".metadata"]),  # the .distcp files hold a torch.save stream per chunk: each one's records
    ],
)
def test_checkpoint_folders_are_identified_file_by_file(name, in_full, distributed_runs, tmp_path):
    folder = distributed_runs[name] / "checkpoints" / "last.ckpt"
    with SpanReader() as reader:
        identity = open_checkpoint(folder, reader).identity()
    record = identity.record()
    assert record["method"] == (
        "sha256 of the zip records (name, size, CRC-32) of each file that has them, of every byte of the others"
    )
    assert record["hashed_in_full"] == in_full
    listed = {f.path for f in identity.files}
    assert listed == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if name == "fsdp":  # optimizer states' chunks are listed too, not only the weights the conversion reads
        assert sum(f.records for f in identity.files if f.path.endswith(".distcp")) > 0
    manifest = run_convert(distributed_runs[name], tmp_path / "out")
    assert manifest["source"]["checkpoint"]["identity"]["digest"] == identity.digest


def test_a_checkpoint_modified_during_the_conversion_is_refused(pano_run, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copyfile(pano_run / "checkpoints" / "last.ckpt", ckpt)

    class TouchWhenTheLanguageModelIsWritten(logging.Handler):
        """Modifies the checkpoint (a trainer saving again) while the conversion is half way through."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("writing language_model"):
                os.utime(ckpt, ns=(1, 1))

    logger, handler = logging.getLogger("converter"), TouchWhenTheLanguageModelIsWritten()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(ConvertError) as error:
            run_convert(pano_run, tmp_path / "out", ckpt=ckpt)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert str(error.value) == (
        f"{ckpt}: it changed while being read; convert a checkpoint that is no longer being written"
    )
    assert os.stat(ckpt).st_mtime_ns == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_source_sha256_adds_the_full_hash_beside_the_identity(causal_lm_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["convert", causal_lm_run, "--out", out, "--config", "causal_lm", "--quiet", "--no-verify"]
    assert cli(capsys, *argv, "--source-sha256")[0] == 0
    record = json.loads((out / "manifest.json").read_text())["source"]["checkpoint"]
    ckpt = causal_lm_run / "checkpoints" / "last.ckpt"
    assert record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["identity"]["digest"] == source_identity(ckpt).digest
    card = (out / "README.md").read_text()
    assert f"sha256 `{record['sha256']}`" in card
