"""Runs of multi-GPU training (DeepSpeed ZeRO-1/2/3, FSDP2 sharded) convert like any other run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from converter.inspection import inspect_run

from distributed import trained_logits_path
from helpers import (
    Started,
    assert_engines_agree,
    assert_same_tensors,
    cli,
    cli_subprocess,
    export_logits,
    export_tensors,
    load_report,
    refused,
    run_convert,
)

CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
RUNS = ["zero1", "zero2-bf16", "zero2-one-rank", "zero3", "zero3-no-frozen", "fsdp", "fsdp-modelparallel", "fsdp-full"]


@pytest.fixture(scope="module")
def exports(distributed_runs, tmp_path_factory) -> dict:
    """Each run converted as a user would: the command line, no options, verification on."""
    root = tmp_path_factory.mktemp("distributed-exports")
    return {name: root / name for name in RUNS}


@pytest.mark.parametrize("name", RUNS)
def test_converts_by_default_and_matches_the_trained_model(name, distributed_runs, exports, capsys, tmp_path):
    """Converted with no options (the full engine, verification on): a clean load and the trained model's logits;
    the streaming engine writes the same."""
    out = exports[name]
    code, stdout, stderr = cli(capsys, "convert", distributed_runs[name], "--out", out, "--quiet")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}")
    assert load_report(out / "language_model")[1] == CLEAN
    trained = torch.load(
        trained_logits_path(distributed_runs[name.removesuffix("-full").split("-model")[0]]), weights_only=True
    )
    got = export_logits(out, trained["pixel_values"], trained["input_ids"])
    if name.endswith("bf16"):  # the trained module computed in bf16; the export holds the fp32 masters
        assert float((got - trained["logits"]).abs().max()) <= 5e-2 * max(1.0, float(trained["logits"].abs().max()))
    else:
        torch.testing.assert_close(got, trained["logits"], rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"]["path"] == "checkpoints/last.ckpt"
    assert manifest["source"]["checkpoint"]["global_step"] == 2
    assert manifest["verification"]["language_model"]["max_abs_logit_diff"] < 1e-4
    assert_engines_agree(distributed_runs[name], tmp_path, full=out)


def _consolidated(name, run, tmp_path):
    """The run's weights as the libraries' own consolidators give them, in a Lightning checkpoint file."""
    folder = run / "checkpoints" / "last.ckpt"
    path = tmp_path / "consolidated.ckpt"
    if name.startswith("fsdp"):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        full = _load_distributed_checkpoint(folder)
        meta = torch.load(folder / "meta.pt", weights_only=True)
        torch.save({**meta, "state_dict": full.get("model", full.get("state_dict"))}, path)
    else:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(folder, path)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "checkpoints").mkdir()
    shutil.move(path, copy / "checkpoints" / "last.ckpt")
    return copy


@pytest.mark.parametrize("name", ["zero2-bf16", "zero3", "fsdp", "fsdp-modelparallel"])
def test_exports_equal_the_libraries_own_consolidation(name, distributed_runs, tmp_path):
    """DeepSpeed's zero_to_fp32 (through Lightning) and torch.distributed.checkpoint's loader (through Fabric)
    consolidate the run; converting that single file gives exactly the tensors the folder gives."""
    run = distributed_runs[name]
    run_convert(run, tmp_path / "folder")
    run_convert(_consolidated(name, run, tmp_path), tmp_path / "file")
    assert_same_tensors(export_tensors(tmp_path / "folder"), export_tensors(tmp_path / "file"))


def test_zero1_frozen_parameters_come_from_the_module_states(distributed_runs, tmp_path):
    """DeepSpeed's zero_to_fp32 drops a ZeRO-1 run's frozen parameters; ckpt2hf reads them from the module states
    and agrees with the consolidation on every trainable tensor."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    folder = distributed_runs["zero1"] / "checkpoints" / "last.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(folder, tmp_path / "consolidated.ckpt")
    consolidated = torch.load(tmp_path / "consolidated.ckpt", weights_only=True)["state_dict"]
    from converter.sources import SpanReader, open_checkpoint

    with SpanReader() as reader:
        source = open_checkpoint(folder, reader).source
        ours = {k: source.read(k) for k in source.keys()}
    assert set(consolidated) < set(ours)
    assert_same_tensors({k: ours[k] for k in consolidated}, consolidated)
    frozen = sorted(set(ours) - set(consolidated))
    assert len(frozen) == 73 and "model.vision_encoder.embeddings.patch_embedding.weight" in frozen


def test_frozen_parameters_the_run_did_not_save_come_from_the_base(distributed_runs, exports, bases):
    manifest = json.loads((exports["zero3-no-frozen"] / "manifest.json").read_text())
    base_note = "not in the checkpoint (frozen, not saved): read from the base model"
    keys = manifest["keys"]
    # Each tensor counted once: the checkpoint's own keys by their fate, the base's apart (they are no source key).
    assert keys["vision_encoder"] == {base_note: 48}
    assert keys["language_model"] == {"written": 2, "merged into its base layer": 28, base_note: 2 * 11 + 1 + 2}
    own = sum(n for part in ("vision_encoder", "resampler", "projector", "language_model")
              for fate, n in keys[part].items() if fate != base_note)  # fmt: skip
    assert own == keys["source_keys"] == 41
    assert manifest["source"]["checkpoint"]["frozen_excluded"] is True
    written = export_tensors(exports["zero3-no-frozen"])
    reference = export_tensors(exports["zero3"])
    assert_same_tensors(
        {k: v for k, v in written.items() if not k.startswith("language_model/")},
        {k: v for k, v in reference.items() if not k.startswith("language_model/")},
    )


def test_inspect_explains_each_format(distributed_runs, pano_run):
    pano = inspect_run(pano_run)["plain_load"]
    for name in ("zero2-bf16", "zero3", "fsdp"):
        report = inspect_run(distributed_runs[name])
        layout = report["checkpoint"]["layout"]
        assert report["plain_load"] == pano  # the same keys as a single-file Lightning checkpoint
        assert report["warnings"] and report["plan"] is not None
        if name == "fsdp":
            assert layout["format"] == "torch.distributed.checkpoint"
            assert (layout["ranks"], layout["weights_state"], layout["other_states"]) == (2, "model", ["optimizer_0"])
            assert report["checkpoint"]["tensors_from"] == {"2 row shards": 113, "1 row shards": 1}
        else:
            assert (layout["format"], layout["ranks"]) == ("deepspeed", 2)
            assert layout["stage"] == int(name[4])
            assert layout["master_dtype"] == "float32"
    zero2 = inspect_run(distributed_runs["zero2-bf16"])["checkpoint"]
    assert zero2["layout"]["module_dtypes"] == ["bfloat16"]
    assert zero2["tensors_from"] == {
        "frozen parameter (model states)": 72,
        "fp32 masters (optimizer partitions of 2 ranks)": 41,
        "shared with model.language_model.base_model.model.model.embed_tokens.original_module.weight": 1,
    }


@pytest.fixture(scope="module", autouse=True)
def real_process(distributed_runs, tmp_path_factory):
    """A ZeRO-3 run converted by ``ckpt2hf`` in a process of its own, started at the module's first test (it runs
    beside the others); the folder holds a zero_to_fp32.py that would leave a marker if it ran."""
    tmp_path = tmp_path_factory.mktemp("real-process")
    run = tmp_path / "run"
    shutil.copytree(distributed_runs["zero3"], run)
    marker = tmp_path / "ran"
    (run / "checkpoints" / "last.ckpt" / "zero_to_fp32.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    started = Started("convert", run, "--out", tmp_path / "out", "--json", python=("-X", "importtime"))
    return run, tmp_path, started


def test_the_newest_checkpoint_by_step_among_files_and_folders(distributed_runs, pano_run, tmp_path, capsys):
    """No last.ckpt: a sharded folder at step 2 beats a file at step 1; both are listed."""
    run = tmp_path / "run"
    shutil.copytree(distributed_runs["fsdp"], run)
    checkpoints = run / "checkpoints"
    (checkpoints / "last.ckpt").rename(checkpoints / "epoch=0-step=2.ckpt")
    older = torch.load(pano_run / "checkpoints" / "last.ckpt", weights_only=True)
    older["global_step"] = 1
    torch.save(older, checkpoints / "epoch=0-step=1.ckpt")
    plan = run_convert(run, tmp_path / "out", dry_run=True)
    assert plan["source"]["checkpoint"]["path"] == "checkpoints/epoch=0-step=2.ckpt"
    assert plan["source"]["checkpoint"]["chosen_because"] == "newest by global_step (2) of 2"
    report = inspect_run(run)
    assert report["checkpoint"]["others"] == ["epoch=0-step=1.ckpt"]
    not_a_checkpoint = tmp_path / "empty.ckpt"
    not_a_checkpoint.mkdir()
    code, _, stderr = cli(capsys, "convert", run, "--ckpt", not_a_checkpoint, "--quiet")
    assert code == 2 and stderr.strip() == (
        f"ckpt2hf: error: {not_a_checkpoint}: a folder that is no checkpoint (no DeepSpeed 'latest', no .metadata) "
        "(given with --ckpt)"
    )


# --- bad input: one line naming the file and what is wrong, exit 2, nothing written ----------------------------


def _folder(run):
    return run / "checkpoints" / "last.ckpt"


def _copy(distributed_runs, name, tmp_path):
    run = tmp_path / name
    shutil.copytree(distributed_runs[name], run)
    return run


@pytest.mark.trust
def test_a_missing_rank(distributed_runs, tmp_path, capsys):
    run = _copy(distributed_runs, "zero3", tmp_path)
    tag = _folder(run) / "checkpoint"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {tag}: a ZeRO checkpoint of 2 ranks, missing zero_pp_rank_1_mp_rank_00_optim_states.pt; "
        "copy the whole checkpoint folder"
    )


@pytest.mark.trust
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_truncated_partition(keep, distributed_runs, tmp_path, capsys):
    run = _copy(distributed_runs, "zero3", tmp_path)
    path = _folder(run) / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {path}: not a readable PyTorch checkpoint (")
    assert line.endswith("the file may be truncated or corrupt")


@pytest.mark.trust
def test_latest_names_a_missing_tag(distributed_runs, tmp_path, capsys):
    run = _copy(distributed_runs, "zero2-bf16", tmp_path)
    (_folder(run) / "latest").write_text("global_step99")
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {_folder(run) / 'latest'}: names the tag 'global_step99', but "
        f"{_folder(run) / 'global_step99'} is missing; copy the whole checkpoint folder"
    )


@pytest.mark.trust
def test_mixed_world_sizes(distributed_runs, tmp_path, capsys):
    """Rank 0's optimizer states come from a one-rank run, rank 1's from a two-rank run."""
    run = _copy(distributed_runs, "zero1", tmp_path)
    tag = _folder(run) / "checkpoint"
    one = _folder(distributed_runs["zero2-one-rank"]) / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copyfile(one, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {tag}: the optimizer states were saved by different ")
    assert line.endswith("the folder mixes checkpoints of different runs; copy one run's checkpoint whole")


@pytest.mark.trust
def test_a_zero_file_from_another_run(distributed_runs, tmp_path, capsys):
    """Rank 1's model states of a ZeRO-3 run replaced by those of a run that saved no frozen parameters."""
    run = _copy(distributed_runs, "zero3", tmp_path)
    tag = _folder(run) / "checkpoint"
    other = _folder(distributed_runs["zero3-no-frozen"]) / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    shutil.copyfile(other, tag / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {tag / 'zero_pp_rank_1_mp_rank_00_model_states.pt'}: its frozen parameters differ from "
        "rank 0's; the files come from different runs"
    )


@pytest.mark.trust
def test_a_missing_rank_file_of_a_sharded_fsdp_checkpoint(distributed_runs, tmp_path, capsys):
    run = _copy(distributed_runs, "fsdp", tmp_path)
    (_folder(run) / "__1_0.distcp").unlink()
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {_folder(run) / '__1_0.distcp'}: missing; a rank's file of the checkpoint was not copied"
    )


@pytest.mark.trust
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_rank_file_cut_short_is_refused_before_anything_is_written(keep, distributed_runs, tmp_path, capsys):
    """A copy of a rank's file that stopped partway (through the weights, or only through the optimizer states that
    follow them) is refused by the sizes ``.metadata`` records, with nothing written."""
    run = _copy(distributed_runs, "fsdp", tmp_path)
    path = _folder(run) / "__1_0.distcp"
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(int(size * keep))
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {path}: {int(size * keep)} bytes, but .metadata records data up to byte ")
    assert line.endswith("; the file was cut short (an incomplete copy): copy it again from the training machine")
    assert not (tmp_path / "out").exists()


@pytest.mark.trust
def test_a_damaged_chunk_of_a_sharded_fsdp_checkpoint(distributed_runs, tmp_path, capsys):
    run = _copy(distributed_runs, "fsdp", tmp_path)
    path = _folder(run) / "__1_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {path}: ")


@pytest.mark.trust
def test_optimizer_states_of_another_zero_stage(distributed_runs, tmp_path, capsys):
    """Rank 1's optimizer states of a ZeRO-2 run replaced by a ZeRO-1 run's (named as a bf16 run names them)."""
    run = _copy(distributed_runs, "zero2-bf16", tmp_path)
    tag = _folder(run) / "checkpoint"
    zero1 = _folder(distributed_runs["zero1"]) / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copyfile(zero1, tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    line = refused(capsys, run, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {tag}: the optimizer states were saved by different ZeRO stages (")


@pytest.mark.trust
@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_flipped_byte_in_a_partition_fails_its_crc(name, distributed_runs, tmp_path, capsys):
    """One byte of rank 1's share of a trained LoRA tensor is changed: the zip record's CRC-32 catches it."""
    from converter.sources import SpanReader, open_checkpoint

    run = _copy(distributed_runs, name, tmp_path)
    key = "model.language_model.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"
    with SpanReader() as reader:
        part = open_checkpoint(_folder(run), reader).source.pieces[key].runs[1]
    data = bytearray(part.path.read_bytes())
    data[part.offset + 3] ^= 0xFF
    part.path.write_bytes(bytes(data))
    line = refused(capsys, run, tmp_path, "--lora-from", "checkpoint")
    assert line.startswith(f"ckpt2hf: error: {part.path}: tensor data in ")
    assert "fails its CRC-32 check (stored " in line and line.endswith("the file is corrupt; re-copy it")


def test_a_real_process_converts_without_deepspeed_and_fails_without_a_traceback(real_process):
    """What a user sees: a JSON summary on stdout; deepspeed is never imported and the zero_to_fp32.py DeepSpeed
    left in the folder never runs; a second convert to the same OUT fails with one line and no traceback."""
    run, tmp_path, started = real_process
    marker = tmp_path / "ran"
    ok = started.result()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["verification"]["language_model"]["loads_clean"] is True
    imported = {line.rsplit("|", 1)[-1].strip() for line in ok.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "peft" in imported
    # deepspeed is never needed; bitsandbytes, which PEFT imports where installed, only by --qlora-base dequantized
    # (PEFT's attempt shows as the bare name, found unavailable in microseconds; a real import loads its modules)
    assert not {m for m in imported if m.split(".")[0] == "deepspeed" or m.startswith("bitsandbytes.")}
    assert not marker.exists()
    bad = cli_subprocess("convert", run, "--out", tmp_path / "out", "--quiet")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"ckpt2hf: error: {tmp_path / 'out'}: already exists; pass --force to replace it or choose another --out"
    ]
