"""Seeded damage to every kind of input a conversion reads (tests/fuzzing.py): reading ends in success or in one
ConvertError naming the file, never a crash; the command line exits 0 or 2 with one line, writes no OUT and leaves
the input as it was. ``make fuzz`` runs the same with fresh seeds for as long as it is given."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from fuzzing import DAMAGE, TARGETS, check, damage, plan_from_json, prepare
from hypothesis import HealthCheck, given, settings

from helpers import cli, refused

SEEDED = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
REGRESSIONS = Path(__file__).parent / "fuzz_regressions"  # make fuzz's findings, replayed (see README)

# Examples per kind (186 in all): 2-25 ms each where the file is read directly, 50 ms where the plan is built.
READ = {
    "checkpoint zip": 30,
    "legacy checkpoint": 20,
    "adapter safetensors": 25,
    "adapter_config.json": 5,
    "tokenizer.json": 4,
    "tokenizer_config.json": 4,
    "export manifest.json": 25,
    "export weights": 25,
    "DeepSpeed model states": 12,
    "DeepSpeed optimizer states": 6,
    "DeepSpeed latest": 6,
    "DCP .metadata": 12,
    "DCP rank file": 6,
    "DCP meta.pt": 6,
}
CLI = {"checkpoint zip": 2, "adapter safetensors": 1, "export weights": 2}  # inspect and convert (or verify)


@pytest.fixture(scope="module")
def folders(pano_run, pano_export, bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    sources = {"run": pano_run, "legacy": pano_run, "tokenizer": pano_run, "export": pano_export[0]}
    return {name: prepare(name, source, root, bases[1]) for name, source in sources.items()}


@pytest.fixture(scope="module")
def distributed_folders(distributed_runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-distributed")
    return {name: prepare(name, distributed_runs[name], root) for name in ("zero3", "fsdp")}


def _fuzz(name: str, folder: Path, examples: int, cli: bool = False) -> None:
    target = TARGETS[name]
    original = (folder / target.file).read_bytes()

    @settings(SEEDED, max_examples=examples)
    @given(DAMAGE)
    def case(plan):
        check(target, folder, original, plan, cli=cli)

    case()


@pytest.mark.parametrize("name", [n for n in READ if TARGETS[n].fixture not in ("zero3", "fsdp")])
def test_damaged_files_are_read_or_refused_in_one_line(name, folders):
    _fuzz(name, folders[TARGETS[name].fixture], READ[name])


@pytest.mark.parametrize("name", [n for n in READ if TARGETS[n].fixture in ("zero3", "fsdp")])
def test_damaged_multi_gpu_checkpoints_are_read_or_refused_in_one_line(name, distributed_folders):
    _fuzz(name, distributed_folders[TARGETS[name].fixture], READ[name])


@pytest.mark.parametrize("name", list(CLI))
def test_the_command_line_on_damaged_files_exits_2_with_one_line(name, folders):
    _fuzz(name, folders[TARGETS[name].fixture], CLI[name], cli=True)


# --- the three crashes the issue found, as they were (inspect and convert) ----------------------------------------
def _refused_by_both(capsys, run: Path, tmp_path: Path) -> str:
    lines = {command: refused(capsys, run, tmp_path, command=command) for command in ("convert", "inspect")}
    assert lines["convert"] == lines["inspect"]
    return lines["convert"]


def _refused_checkpoint(pano_run, tmp_path, capsys, edit) -> tuple[str, Path]:
    """A copy of the run whose last.ckpt is ``edit(bytes)``: (the one line both convert and inspect give, its path)."""
    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(edit(ckpt.read_bytes()))
    return _refused_by_both(capsys, run, tmp_path), ckpt


def test_random_bytes_behind_a_pickle_header_read_as_a_legacy_checkpoint(pano_run, tmp_path, capsys):
    """torch's weights-only unpickler raised IndexError ("pop from empty list") on a POP with nothing pushed."""
    # protocol 2, then TUPLE with no mark to pop
    line, ckpt = _refused_checkpoint(pano_run, tmp_path, capsys, lambda _: b"\x80\x02t\x8a\x13random bytes")
    assert line == (
        f"ckpt2hf: error: {ckpt}: not a readable PyTorch checkpoint (legacy format) (IndexError: pop from empty "
        "list); the file may be truncated or corrupt"
    )


def test_a_scrambled_zip_central_directory(pano_run, tmp_path, capsys):
    """zipfile raised NotImplementedError ("zip file version 11.1") for an entry's 'version needed to extract'."""

    def version_111(data: bytes) -> bytes:
        data = bytearray(data)
        struct.pack_into("<H", data, data.index(b"PK\x01\x02") + 6, 111)
        return bytes(data)

    line, ckpt = _refused_checkpoint(pano_run, tmp_path, capsys, version_111)
    assert line == (
        f"ckpt2hf: error: {ckpt}: not a readable PyTorch checkpoint (zip file version 11.1); the file may be "
        "truncated or corrupt"
    )


def test_a_zip_entry_name_that_is_not_utf8(pano_run, tmp_path, capsys):
    """zipfile raised UnicodeDecodeError for a name flagged UTF-8 that is not."""
    line, ckpt = _refused_checkpoint(pano_run, tmp_path, capsys, lambda data: damage(data, [("zip-name", 0)]))
    assert line == (
        f"ckpt2hf: error: {ckpt}: not a readable PyTorch checkpoint ('utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte); the file may be truncated or corrupt"
    )


def test_an_adapter_config_value_peft_does_not_implement(pano_run, tmp_path, capsys):
    """Found by make fuzz (seed 466897041, after 12,600 cases): one bit flipped in ``"bias": "none"`` made PEFT raise
    NotImplementedError ("Requested bias: oone") while applying the config. (An explicit test: the offset of that
    byte depends on the base's path, which the adapter config records.)"""
    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    path = run / "lora_weights" / "adapter_config.json"
    path.write_text(path.read_text().replace('"bias": "none"', '"bias": "oone"'))
    reason = (
        f"{run / 'checkpoints' / 'last.ckpt'} (language_model): PEFT cannot apply the adapter's config to the base "
        "model (NotImplementedError: Requested bias: oone, is not implemented; target_modules ['down_proj', "
        "'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']); the adapter_config.json is damaged or "
        "belongs to another model: pass --adapter-dir with the run's own"
    )
    assert refused(capsys, run, tmp_path) == f"ckpt2hf: error: {reason}"
    code, stdout, _ = cli(capsys, "inspect", run)  # inspect explains the run, and says why convert would stop
    assert code == 0 and f"  - convert would stop: {reason}" in stdout.splitlines()


@pytest.mark.parametrize("found", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_what_make_fuzz_found_stays_fixed(found, folders, distributed_folders):
    """Each input make fuzz saved (its damage, replayed on today's fixture) holds the property."""
    record = json.loads(found.read_text())
    target = TARGETS[record["target"]]
    folder = {**folders, **distributed_folders}[target.fixture]
    original = (folder / target.file).read_bytes()
    check(target, folder, original, plan_from_json(record["damage"]), cli=True)
