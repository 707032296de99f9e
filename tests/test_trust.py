"""Hostile, broken and faulty input: nothing executes, one-line errors, no partial OUT, sources unchanged.

Every case is marked ``trust``; the README reports how many there are (``pytest -m trust``).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib
import json
import operator
import os
import pathlib
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.inspection import inspect_run

from helpers import REPO, assert_same_tensors, cli, export_tensors, no_stage_left, refused, run_convert, tree_digest

pytestmark = pytest.mark.trust


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.fixture(scope="module")
def reference(pano_run, tmp_path_factory):
    """The export of the untouched run, to compare successful conversions with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_convert(pano_run, out)
    return out


@pytest.fixture
def run_copy(pano_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pano_run, run)
    return run


def _ckpt(run):
    return run / "checkpoints" / "last.ckpt"


def _edit_checkpoint(run, edit):
    ckpt = torch.load(_ckpt(run), weights_only=True)
    edit(ckpt)
    torch.save(ckpt, _ckpt(run))


# --- hostile pickles: nothing executes ---------------------------------------------------------------------------

HOSTILE = {
    "os.system in hyper_parameters": (
        lambda m: Payload(os.system, f"touch {m}"),
        lambda c, p: c["hyper_parameters"].__setitem__("seed", p),
        "refers to posix.system (at hyper_parameters.seed)",
    ),
    "subprocess.call in callbacks": (
        lambda m: Payload(subprocess.call, ["touch", str(m)]),
        lambda c, p: c["callbacks"].__setitem__("Evil", p),
        "refers to subprocess.call (at callbacks.Evil)",
    ),
    "subprocess.Popen in optimizer_states": (
        lambda m: Payload(subprocess.Popen, ["touch", str(m)]),
        lambda c, p: c["optimizer_states"][0]["state"].__setitem__(999, p),
        "refers to subprocess.Popen (at optimizer_states[0].state.999)",
    ),
    "builtins.eval in state_dict": (
        lambda m: Payload(builtins.eval, f"open({str(m)!r}, 'w').close()"),
        lambda c, p: c["state_dict"].__setitem__("model.projector.evil", p),
        "refers to builtins.eval (at state_dict.model.projector.evil)",
    ),
    "builtins.exec nested deep": (
        lambda m: Payload(builtins.exec, f"open({str(m)!r}, 'w').close()"),
        lambda c, p: c["hyper_parameters"].__setitem__("cfg", {"stages": [1, 2, {"hook": p}]}),
        "refers to builtins.exec (at hyper_parameters.cfg.stages[2].hook)",
    ),
    "runpy.run_path": (
        lambda m: Payload(runpy.run_path, str(m) + ".py"),
        lambda c, p: c["loops"].__setitem__("evil", p),
        "refers to runpy.run_path (at loops.evil)",
    ),
    "importlib.import_module": (
        lambda m: Payload(importlib.import_module, "antigravity"),
        lambda c, p: c["hyper_parameters"].__setitem__("plugin", p),
        "refers to importlib.import_module (at hyper_parameters.plugin)",
    ),
    "operator.attrgetter gadget": (
        lambda m: Payload(operator.attrgetter("system"), "posix"),
        lambda c, p: c["callbacks"].__setitem__("gadget", [p]),
        "refers to operator.attrgetter (at callbacks.gadget[0])",
    ),
    "shutil.rmtree": (
        lambda m: Payload(shutil.rmtree, str(m.parent / "victim")),
        lambda c, p: c["hyper_parameters"].__setitem__("cleanup", p),
        "refers to shutil.rmtree (at hyper_parameters.cleanup)",
    ),
    "bare reference to os.system": (
        lambda m: os.system,
        lambda c, p: c["hyper_parameters"].__setitem__("fn", p),
        "refers to posix.system (at hyper_parameters.fn)",
    ),
    "a function outside the allowlist": (
        lambda m: Payload(json.loads, "[1]"),
        lambda c, p: c["hyper_parameters"].__setitem__("parsed", p),
        "calls json.loads, a function outside the allowlist of tensor-rebuilding functions",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoint_runs_nothing(case, run_copy, tmp_path, capsys):
    make, place, expected = HOSTILE[case]
    marker = tmp_path / "pwned"
    (tmp_path / "victim").mkdir()
    (tmp_path / "pwned.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_checkpoint(run_copy, lambda c: place(c, make(marker)))
    for command in ("convert", "inspect"):
        line = refused(capsys, run_copy, tmp_path, command=command)
        assert line.startswith(f"ckpt2hf: error: {_ckpt(run_copy)}: refused: the pickle {expected}")
        assert line.endswith("nothing in it was executed; do not load this file with torch.load(weights_only=False)")
        assert not marker.exists() and (tmp_path / "victim").is_dir()


def test_hostile_adapter_bin_runs_nothing(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    adapter = run_copy / "lora_weights"
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "x": Payload(os.system, f"touch {marker}")}, adapter / "adapter_model.bin")
    line = refused(capsys, run_copy, tmp_path)
    assert line.startswith(
        f"ckpt2hf: error: {adapter / 'adapter_model.bin'}: refused: the pickle refers to posix.system"
    )
    assert not marker.exists()


# --- benign unknown objects: read as placeholders, the weights convert --------------------------------------------


@contextlib.contextmanager
def _vanished_class(module_name, class_name, base=object):
    """A class whose module is gone by the time the checkpoint is read (like a renamed training project)."""
    parts = module_name.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    cls = type(class_name, (base,), {"__module__": module_name})
    setattr(sys.modules[module_name], class_name, cls)
    try:
        yield cls
    finally:
        for name in names:
            del sys.modules[name]


BENIGN = {
    "argparse.Namespace": lambda c: c["hyper_parameters"].__setitem__("args", argparse.Namespace(lr=1e-3, n=2)),
    "pathlib path": lambda c: c["hyper_parameters"].__setitem__("data_dir", pathlib.PurePosixPath("/data/panos")),
    "class that no longer exists": "gone_project.configs:TrainConfig",
    "OmegaConf container": "omegaconf.dictconfig:DictConfig",
}


@pytest.mark.parametrize("case", list(BENIGN))
def test_benign_unknown_objects_still_convert(case, run_copy, reference, tmp_path, caplog):
    spec = BENIGN[case]
    if callable(spec):
        _edit_checkpoint(run_copy, spec)
    else:
        with _vanished_class(*spec.split(":")) as cls:
            obj = cls()
            obj.content = {"lr": 0.001, "layers": [1, 2]}
            _edit_checkpoint(run_copy, lambda c: c["callbacks"].__setitem__("cfg", obj))
    with caplog.at_level("WARNING", logger="converter"):
        run_convert(run_copy, tmp_path / "out")
    # Objects in the hyper-parameters are read as plain data (test_hparams) and shown by inspect; others are named.
    warned = "were read as inert placeholders (never constructed)" in caplog.text
    assert warned == (not callable(spec))
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(reference))
    hparams = inspect_run(run_copy)["hyper_parameters"]["values"]
    if case == "argparse.Namespace":
        assert hparams["args"] == {"lr": 1e-3, "n": 2}
    if case == "pathlib path":
        assert hparams["data_dir"] == "/data/panos"


def test_hyper_parameters_of_a_vanished_dict_class(run_copy, reference, tmp_path):
    """Lightning may save hparams as a dict subclass; its items are recovered without constructing it."""
    with _vanished_class("old_lightning.utilities", "AttributeDict", dict) as cls:
        _edit_checkpoint(run_copy, lambda c: c.__setitem__("hyper_parameters", cls(c["hyper_parameters"])))
    manifest = run_convert(run_copy, tmp_path / "out")
    assert manifest["components"]["language_model"]["base_config_from"] == "hyper_parameters.language_model_name"


# --- broken input ------------------------------------------------------------------------------------------------


def _record_offset(path, predicate):
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        info = next(i for i in zf.infolist() if predicate(i))
        fh.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
        return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("engine", ["full", "streaming"])
@pytest.mark.parametrize(
    "key",
    [
        "model.vision_encoder.embeddings.patch_embedding.weight",
        "model.language_model.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight",
    ],
)
def test_flipped_byte_in_tensor_data_fails_crc(run_copy, tmp_path, capsys, engine, key):
    from converter.sources import SpanReader, open_checkpoint

    with SpanReader() as reader:
        span = open_checkpoint(_ckpt(run_copy), reader).source.spans[key]
    _flip(_ckpt(run_copy), span.offset + 5)
    line = refused(capsys, run_copy, tmp_path, "--engine", engine, "--lora-from", "checkpoint")
    assert "fails its CRC-32 check (stored " in line and line.endswith("the file is corrupt; re-copy it")


def test_flipped_byte_in_the_pickle(run_copy, tmp_path, capsys):
    offset, size = _record_offset(_ckpt(run_copy), lambda i: i.filename.endswith("data.pkl"))
    _flip(_ckpt(run_copy), offset + size // 2)
    line = refused(capsys, run_copy, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {_ckpt(run_copy)}: the checkpoint's pickle is damaged (")


def test_missing_tensor_record(run_copy, tmp_path, capsys):
    src = _ckpt(run_copy)
    with zipfile.ZipFile(src) as zin:
        victim = next(i.filename for i in zin.infolist() if "/data/" in i.filename)
        with zipfile.ZipFile(tmp_path / "x.ckpt", "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                if info.filename != victim:
                    zout.writestr(info, zin.read(info.filename))
    shutil.move(tmp_path / "x.ckpt", src)
    line = refused(capsys, run_copy, tmp_path)
    assert "is missing; the file is damaged" in line


def test_safetensors_with_a_bad_header(run_copy, tmp_path, capsys):
    adapter = run_copy / "lora_weights" / "adapter_model.safetensors"
    adapter.write_bytes((10**9).to_bytes(8, "little") + b"{garbage")
    line = refused(capsys, run_copy, tmp_path)
    assert line.startswith(f"ckpt2hf: error: {adapter}: not a valid safetensors file (")


def test_adapter_for_another_base(run_copy, tmp_path, capsys):
    adapter = run_copy / "lora_weights" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(32, 48)
    save_file(tensors, adapter, metadata={"format": "pt"})
    line = refused(capsys, run_copy, tmp_path)
    assert f"{key} (32, 32) vs (32, 48)); the adapter was trained for another base model" in line


def test_lora_a_without_lora_b(run_copy, tmp_path, capsys):
    key = "model.language_model.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"
    _edit_checkpoint(run_copy, lambda c: c["state_dict"].pop(key))
    line = refused(capsys, run_copy, tmp_path)
    assert (
        "(language_model): 1 adapter tensors the config describes are not in the checkpoint "
        "(base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight); the checkpoint is damaged or was edited"
    ) in line


def test_config_whose_shapes_disagree(run_copy, tmp_path, capsys):
    hparams = torch.load(_ckpt(run_copy), weights_only=True, mmap=True)["hyper_parameters"]
    base = tmp_path / "other-base"
    shutil.copytree(hparams["language_model_name"], base)
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] = 48
    (base / "config.json").write_text(json.dumps(config))
    line = refused(capsys, run_copy, tmp_path, "--base", f"language_model={base}")
    assert f"does not fit {base / 'config.json'}: 6 tensors have other shapes than the config gives (" in line
    assert line.endswith("pass --base language_model=PATH with the config the model was trained with")
    original = hparams["language_model_name"]  # the advice followed: the base the model was trained from
    code, _, stderr = cli(capsys, "convert", run_copy, "--out", tmp_path / "advised", "--quiet",
                          "--base", f"language_model={original}")  # fmt: skip
    assert code == 0, stderr


@pytest.mark.parametrize("engine", ["full", "streaming"])
def test_nan_from_the_merge(run_copy, tmp_path, capsys, engine):
    key = "model.language_model.base_model.model.model.layers.0.self_attn.o_proj.lora_B.default.weight"
    _edit_checkpoint(run_copy, lambda c: c["state_dict"][key].__setitem__((0, 0), float("nan")))
    line = refused(capsys, run_copy, tmp_path, "--lora-from", "checkpoint", "--engine", engine)
    assert "model.layers.0.self_attn.o_proj.weight holds 32 NaN/Inf values after the merge" in line


# --- the streaming engine's threads: a failure in any stage stops them all --------------------------------------
def _pipeline_threads() -> set[int]:
    """The ckpt2hf threads alive now (read-ahead, CRC-32 lanes, writers, hashers, prefetch)."""
    return {t.ident for t in threading.enumerate() if t.name.startswith("ckpt2hf-") and t.is_alive()}


MERGED_BASE = "model.language_model.base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"
LORA_B = "model.language_model.base_model.model.model.layers.0.self_attn.o_proj.lora_B.default.weight"


@pytest.mark.parametrize("stage", ["reader", "merge"])
def test_a_failing_stage_of_the_stream_stops_the_conversion(stage, run_copy, tmp_path, capsys):
    """The read-ahead thread's read of a merged layer (its CRC-32 fails) or the converting thread's merge (NaN):
    one line, nothing written, and no thread of the pipeline left running."""
    if stage == "reader":
        from converter.sources import SpanReader, open_checkpoint

        with SpanReader() as reader:
            span = open_checkpoint(_ckpt(run_copy), reader).source.spans[MERGED_BASE]
        _flip(_ckpt(run_copy), span.offset + span.nbytes // 2)
        expected = "fails its CRC-32 check (stored "
    else:
        _edit_checkpoint(run_copy, lambda c: c["state_dict"][LORA_B].__setitem__((0, 0), float("nan")))
        expected = "model.layers.0.self_attn.o_proj.weight holds 32 NaN/Inf values after the merge"
    before = _pipeline_threads()
    line = refused(capsys, run_copy, tmp_path, "--engine", "streaming", "--lora-from", "checkpoint")
    assert expected in line
    assert _pipeline_threads() <= before


NORM = "model.language_model.base_model.model.model.norm.weight"


@pytest.mark.parametrize(
    ("key", "dtype"),
    [(NORM, torch.float32), (MERGED_BASE, torch.bfloat16)],
    ids=["copied-while-written", "merged-from-a-copy"],
)
def test_a_corrupt_tensor_checked_while_it_is_used_is_reported_as_corrupt(run_copy, tmp_path, capsys, key, dtype):
    """A tensor's CRC-32 is checked on another thread while it is used: a copied tensor's pieces go on to be cast
    and written, and a merged weight stored in bfloat16 is merged from a float32 copy. Bytes changed into a NaN stop
    the cast or break the merge before the check has its verdict; the line still names the corrupt record, not the
    NaN it caused."""
    from converter.sources import SpanReader, open_checkpoint

    if dtype != torch.float32:
        _edit_checkpoint(run_copy, lambda c: c["state_dict"].update({key: c["state_dict"][key].to(dtype)}))
    with SpanReader() as reader:
        span = open_checkpoint(_ckpt(run_copy), reader).source.spans[key]
    assert span.dtype == dtype
    data = bytearray(_ckpt(run_copy).read_bytes())
    data[span.offset : span.offset + dtype.itemsize] = b"\xff" * dtype.itemsize  # the first element: a NaN
    _ckpt(run_copy).write_bytes(bytes(data))
    line = refused(capsys, run_copy, tmp_path, "--engine", "streaming", "--lora-from", "checkpoint")
    assert "fails its CRC-32 check (stored " in line and line.endswith("the file is corrupt; re-copy it")


# A child that may write files of at most 64 KiB (SIGXFSZ ignored, so that write() fails with EFBIG instead).
SMALL_FILES = (
    "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY)); "
    "from converter.cli import run; run()"
)


def test_a_failing_writer_thread_stops_the_conversion(run_copy, tmp_path):
    """The writer thread's write fails (the file would outgrow the process's limit): one line naming the export,
    exit 2, nothing at OUT, no staging folder, the sources untouched."""
    out, before = tmp_path / "out", tree_digest(run_copy)
    argv = ["convert", str(run_copy), "--out", str(out), "--engine", "streaming", "--quiet"]
    done = subprocess.run([sys.executable, "-c", SMALL_FILES, *argv], capture_output=True, text=True, cwd=REPO)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (
        f"ckpt2hf: error: {out}: writing the export failed (File too large); nothing was written; free space or "
        "choose another --out"
    )
    assert done.stdout == "" and not out.exists() and no_stage_left(tmp_path)
    assert tree_digest(run_copy) == before


@pytest.mark.parametrize(
    ("engine", "key", "written"),
    [
        ("full", "model.projector.0.weight", "0.weight"),
        ("streaming", "model.language_model.base_model.model.model.norm.weight", "model.norm.weight"),
        (
            "streaming",
            "model.language_model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight",
            "model.layers.0.mlp.up_proj.weight",
        ),
    ],
)
def test_float16_overflow(run_copy, tmp_path, capsys, engine, key, written):
    _edit_checkpoint(run_copy, lambda c: c["state_dict"][key].view(-1).__setitem__(0, 1e6))
    line = refused(capsys, run_copy, tmp_path, "--dtype", "float16", "--engine", engine, "--lora-from", "checkpoint")
    assert f": {written} overflows float16 (max abs " in line
    assert line.endswith("use --dtype bfloat16 or float32")


def test_non_tensor_in_state_dict(run_copy, tmp_path, capsys):
    _edit_checkpoint(run_copy, lambda c: c["state_dict"].__setitem__("model.projector.note", "hello"))
    line = refused(capsys, run_copy, tmp_path)
    assert line == f"ckpt2hf: error: {_ckpt(run_copy)}: state_dict entry 'model.projector.note' is not a tensor"


def test_invalid_adapter_config(run_copy, tmp_path, capsys):
    (run_copy / "lora_weights" / "adapter_config.json").write_text("{not json")
    line = refused(capsys, run_copy, tmp_path)
    assert "adapter_config.json: unreadable adapter config (" in line


# --- faults while writing ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path, options):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_disk_full(pano_run, tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "size=160k") as disk:
        line = refused(capsys, pano_run, disk)
        assert line.startswith(f"ckpt2hf: error: {disk / 'out'}: writing the export failed (")
        assert "No space left on device" in line or "StorageFull" in line
        assert list(disk.iterdir()) == []


def test_read_only_destination(pano_run, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        line = refused(capsys, pano_run, disk)
        assert line == f"ckpt2hf: error: {disk}: cannot write here (Read-only file system); choose another --out"


def test_killed_mid_write_leaves_no_out(deep_run, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(deep_run)
    proc = subprocess.Popen(
        [sys.executable, "-m", "converter", "convert", str(deep_run), "--out", str(out), "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        stages = [p for p in tmp_path.glob(".out.ckpt2hf-tmp-*") if (p / "vision_encoder").exists()]
        if stages:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the convert finished before it could be killed"
    assert not out.exists() and tree_digest(deep_run) == before
    run_convert(deep_run, out)  # the next convert removes the dead one's staging folder
    assert out.is_dir() and no_stage_left(tmp_path)


def test_force_keeps_the_old_export_when_the_new_one_fails(run_copy, tmp_path, capsys):
    out = tmp_path / "out"
    run_convert(run_copy, out)
    before = tree_digest(out)
    key = "model.language_model.base_model.model.model.layers.0.self_attn.o_proj.lora_B.default.weight"
    _edit_checkpoint(run_copy, lambda c: c["state_dict"][key].__setitem__((0, 0), float("inf")))
    code, _, stderr = cli(capsys, "convert", run_copy, "--out", out, "--force", "--lora-from", "checkpoint", "--quiet")
    assert code == 2 and "NaN/Inf" in stderr
    assert tree_digest(out) == before and no_stage_left(tmp_path)


# --- integrity: ckpt2hf verify -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_export(pano_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "export"
    run_convert(pano_run, out, max_shard_size="40KB")
    return out


@pytest.fixture
def export(sharded_export, tmp_path):
    """A copy of a sharded export, to damage."""
    return pathlib.Path(shutil.copytree(sharded_export, tmp_path / "export"))


def _verify(capsys, out):
    code, stdout, stderr = cli(capsys, "verify", out)
    return code, stdout.strip().splitlines(), stderr.strip()


def test_verify_accepts_an_untouched_export(export, capsys):
    code, lines, _ = _verify(capsys, export)
    assert code == 0 and lines == [f"{export}: 19 files match manifest.json"]


def test_verify_catches_one_changed_byte(export, capsys):
    shard = sorted((export / "language_model").glob("model-*.safetensors"))[0]
    offset = shard.stat().st_size - 3
    _flip(shard, offset)
    code, lines, err = _verify(capsys, export)
    assert code == 1 and lines == [f"changed: language_model/{shard.name} (sha256 differs from the manifest)"]
    assert err == f"ckpt2hf: error: {export}: 1 differences from manifest.json"


def test_verify_catches_missing_and_extra_files_and_a_broken_index(export, capsys):
    shard = sorted((export / "language_model").glob("model-*.safetensors"))[-1]
    weight_map = json.loads((export / "language_model" / "model.safetensors.index.json").read_text())["weight_map"]
    lost = sorted(t for t, s in weight_map.items() if s == shard.name)
    assert lost
    shard.unlink()
    (export / "projector" / "notes.txt").write_text("x")
    code, lines, _ = _verify(capsys, export)
    assert code == 1
    index = "index: language_model/model.safetensors.index.json"
    assert lines == [
        f"missing: language_model/{shard.name}",
        "not in the manifest: projector/notes.txt",
        f"{index} names language_model/{shard.name}, which is not there",
    ] + [f"{index} puts {t} in {shard.name}, which does not hold it" for t in lost]


def test_verify_checks_safetensors_metadata(export, capsys):
    path = export / "projector" / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "np"})
    code, lines, _ = _verify(capsys, export)
    assert code == 1
    assert "metadata: projector/model.safetensors has format 'np', expected 'pt'" in lines
