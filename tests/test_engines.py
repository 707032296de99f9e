"""The streaming engine writes exactly what the whole-model merge_and_unload engine writes, for every fixture."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from safetensors.torch import load_file

from converter.engines.streams import ReadAhead, SafetensorsStream
from converter.errors import ConvertError

from helpers import assert_engines_agree, assert_same_tensors, export_tensors, run_convert

CASES = {
    "pano": ("pano_run", {}),  # against pano_export, which the full engine wrote already
    "pano-bf16-sharded": ("pano_run", {"dtype": "bfloat16", "max_shard_size": "40KB"}),
    "named-adapter": ("named_adapter_run", {}),
    "dora-rslora-patterns": ("dora_run", {}),
    "causal-lm-tied": ("causal_lm_run", {"config": "causal_lm"}),
    "lora-from-adapter": ("stale_adapter_run", {"lora_from": "adapter"}),
}  # the 28-layer layout: test_convert.test_28_layer_layout_gives_exactly_311_plain_lm_keys


@pytest.mark.parametrize("case", list(CASES))
def test_engines_write_identical_tensors(case, request, tmp_path):
    fixture, options = CASES[case]
    full = request.getfixturevalue("pano_export")[0] if case == "pano" else None
    assert_engines_agree(request.getfixturevalue(fixture), tmp_path, full=full, **options)


def test_streaming_engine_verifies_what_it_wrote(pano_run, pano_export, tmp_path):
    """The streaming engine's own checks: the same exact copies as the full engine's, every merged layer's output
    against the unmerged layer's, the folders reloaded on the meta device."""
    manifest = run_convert(pano_run, tmp_path / "out", engine="streaming", verify=True)
    full = pano_export[1]["verification"]
    checks = manifest["verification"]
    assert {name: c["exact_tensors"] for name, c in checks.items()} == {
        name: c["exact_tensors"] for name, c in full.items()
    }
    lm = checks["language_model"]
    assert (lm["loads_clean"], lm["merged_tensors"], lm["layers_checked"]) == (True, 14, 14)
    assert lm["max_rel_layer_output_diff"] <= lm["layer_tolerance"] == 1e-4
    assert checks["vision_encoder"]["loads_clean"] is True and checks["vision_encoder"]["layers_checked"] == 0


def test_auto_engine_follows_max_memory(pano_run, tmp_path):
    assert run_convert(pano_run, tmp_path / "a", dry_run=True)["engine"] == "full"
    assert run_convert(pano_run, tmp_path / "b", dry_run=True, max_memory="100KB")["engine"] == "streaming"


def test_small_chunks_and_a_small_pool_write_the_same_tensors(pano_run, pano_export, tmp_path):
    """Every tensor spans several chunks and merge inputs outgrow a chunk, so the reader's pool lends, takes back
    and reuses buffers of mixed sizes while the read-ahead, writer and hasher threads hold some of them."""
    reference = export_tensors(pano_export[0])
    for dtype in ("float32", "bfloat16"):
        streaming = run_convert(
            pano_run, tmp_path / dtype, engine="streaming", dtype=dtype, chunk_bytes=4096, pool_bytes=16384
        )
        expected = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in reference.items()}
        assert_same_tensors(export_tensors(tmp_path / dtype), expected)
        assert streaming["keys"] == pano_export[1]["keys"]


def test_read_ahead_keeps_order_and_raises_the_producers_error():
    def items():
        yield from range(5)
        raise ConvertError("broken source")

    ahead = ReadAhead(items(), limit=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ConvertError, match="^broken source$"):
        next(ahead)


def test_read_ahead_close_stops_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    ahead = ReadAhead(items(), limit=2)
    assert next(ahead) == 0
    ahead.close()
    assert len(produced) < 10
    assert not [t for t in threading.enumerate() if t.name == "ckpt2hf-read" and t.is_alive()]


def test_safetensors_stream_writes_tensors_without_elements(tmp_path):
    path = tmp_path / "model.safetensors"
    a, empty, b = torch.arange(6.0).reshape(2, 3), torch.empty(0, 3), torch.tensor([7], dtype=torch.int64)
    entries = [("a", a.dtype, tuple(a.shape)), ("empty", empty.dtype, (0, 3)), ("b", b.dtype, (1,))]
    stream = SafetensorsStream(path, entries, {"format": "pt"})
    stream.write("a", a[:1])
    stream.write("a", a[1:])
    stream.write("empty", torch.empty(0, dtype=torch.uint8))
    stream.write("b", b)
    stream.finish()
    digest = stream.close()
    written = load_file(path)
    assert written.keys() == {"a", "empty", "b"}
    assert torch.equal(written["a"], a) and written["empty"].shape == (0, 3) and torch.equal(written["b"], b)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_are_cpu_tensors_whatever_the_default_device(pano_run):
    """The full engine builds its model under ``torch.device(--device)`` and reads the checkpoint there: every
    read must still come back on the CPU with the stored values (a buffer allocated on the default device broke
    ``--device cuda``). The meta device stands in for a GPU: a buffer allocated there holds no bytes at all."""
    from converter.sources import SpanReader, open_checkpoint

    path = pano_run / "checkpoints" / "last.ckpt"
    stored = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    with SpanReader(chunk_bytes=4096, pool_bytes=1 << 16) as reader, torch.device("meta"):
        source = open_checkpoint(path, reader).source
        keys = sorted(source.keys())
        whole = {k: source.read(k) for k in keys}
        writable = {k: source.read(k, writable=True) for k in keys[:5]}
        pieces = {k: torch.cat([p.clone() for _, _, p in source.chunks(k, pooled=True)]) for k in keys[:5]}
    assert {t.device.type for t in [*whole.values(), *writable.values(), *pieces.values()]} == {"cpu"}
    assert_same_tensors(whole, stored)
    assert_same_tensors(writable, {k: stored[k] for k in writable})
    assert_same_tensors(pieces, {k: stored[k].reshape(-1, *stored[k].shape[1:]) for k in pieces})


@pytest.mark.parametrize("engine", ["streaming", "full"])
def test_shards_written_at_once_are_the_shards_written_in_turn(pano_run, tmp_path, monkeypatch, engine):
    """A sharded export written three files at once (``CKPT2HF_FILES_AT_ONCE=3``) is byte for byte the export
    written one file at a time, and its manifest records the same sha256s."""
    from converter.names import FILES_AT_ONCE

    exports = {}
    for at_once in ("1", "3"):
        monkeypatch.setenv(FILES_AT_ONCE, at_once)
        out = tmp_path / at_once
        manifest = run_convert(pano_run, out, engine=engine, dtype="bfloat16", max_shard_size="8KB")
        weights = sorted(p for p in out.rglob("*") if p.name.endswith((".safetensors", ".index.json")))
        exports[at_once] = ({p.relative_to(out).as_posix(): p.read_bytes() for p in weights}, manifest["files"])
    shards = [name for name in exports["1"][0] if name.startswith("language_model/model-")]
    assert len(shards) > 3  # more files than are open at once
    assert exports["3"] == exports["1"]


@pytest.mark.parametrize("piece", [None, 4096])
def test_verification_reads_every_copied_tensor_back_and_catches_a_changed_byte(pano_run, tmp_path, monkeypatch, piece):
    """Copied tensors are read back from the written files (in pieces on several threads, ``READ_BACK_PIECE``, the
    CRC-32 put together from theirs): a byte the disk changed after it was written, anywhere in a tensor, is an
    error naming the tensor, and nothing is left at ``out``; untouched, the same pieces pass."""
    import json
    import re

    from converter.engines import streaming

    if piece is not None:
        monkeypatch.setattr(streaming, "READ_BACK_PIECE", piece)
    run_convert(pano_run, tmp_path / "clean", engine="streaming", verify=True)
    verify = streaming.StreamingWritten.verify

    def verify_after_the_disk_changed_a_byte(self, folder):
        path = folder / "model.safetensors"
        if path.parent.name == "language_model":
            raw = bytearray(path.read_bytes())
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
            begin, end = header["model.embed_tokens.weight"]["data_offsets"]
            start = 8 + int.from_bytes(raw[:8], "little")
            raw[start + (begin + end) // 2 + 1] ^= 0x10  # in the middle: a later piece than the first
            path.write_bytes(bytes(raw))
        return verify(self, folder)

    monkeypatch.setattr(streaming.StreamingWritten, "verify", verify_after_the_disk_changed_a_byte)
    with pytest.raises(ConvertError) as failed:
        run_convert(pano_run, tmp_path / "out", engine="streaming", verify=True)
    said = r"^.*language_model: model\.embed_tokens\.weight was not written exactly; the disk may be failing$"
    assert re.match(said, str(failed.value)), str(failed.value)
    assert not (tmp_path / "out").exists()


def test_a_large_read_on_several_threads_checks_its_crc32_piece_by_piece(tmp_path):
    """A tensor of several ``PARALLEL_PIECE``s is read by several threads, each checking its own piece's CRC-32,
    put together for the record: the bytes as stored, and a byte changed in a later piece is caught."""
    import os
    import zlib

    from converter.sources import pread

    nbytes = 3 * pread.PARALLEL_PIECE + 4096 * 3 + 8  # pieces of unequal length
    data = bytearray(os.urandom(nbytes + 100))
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(data))
    record = pread.Record("archive/data/0", 100, nbytes, zlib.crc32(data[100:]))
    span = pread.Span(path, 100, torch.uint8, (nbytes,), record)
    with pread.SpanReader() as reader:
        assert reader.read(span, check_now=True).numpy().tobytes() == bytes(data[100:])
    data[100 + nbytes - 10] ^= 1
    path.write_bytes(bytes(data))
    with pread.SpanReader() as reader, pytest.raises(ConvertError, match="archive/data/0 fails its CRC-32 check"):
        reader.read(span, check_now=True)


@pytest.mark.parametrize(
    "damage",
    ["dropped", "renamed", "reshaped"],
)
def test_the_reload_on_the_meta_device_reads_no_data_and_says_what_the_full_reload_says(pano_run, tmp_path, damage):
    """Streaming verification reloads each folder on the meta device from its files' headers (no tensor data read):
    a clean export loads, and a missing, unexpected or mis-shaped tensor is refused with the same keys as the
    reload that reads the data."""
    import re
    import shutil

    from safetensors.torch import save_file

    from converter import verification

    run_convert(pano_run, tmp_path / "out", engine="streaming")
    folder = tmp_path / "out" / "language_model"
    model = verification.load_clean(folder, "AutoModelForCausalLM", torch.device("cpu"), "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    broken = tmp_path / damage
    shutil.copytree(folder, broken)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    if damage == "dropped":
        tensors.pop(key)
    elif damage == "renamed":
        tensors["model.layers.0.mlp.up_proj.weights"] = tensors.pop(key)
    else:
        tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    said = []
    for device_map in ("meta", None):
        with pytest.raises(ConvertError) as refused:
            verification.load_clean(broken, "AutoModelForCausalLM", torch.device("cpu"), device_map)
        said.append(str(refused.value))
    assert said[0] == said[1]
    assert re.match(
        rf"^{re.escape(str(broken))}: AutoModelForCausalLM.from_pretrained does not load the export cleanly", said[0]
    )
    assert "up_proj" in said[0]


def test_the_reload_on_the_meta_device_refuses_an_index_that_names_the_wrong_file(pano_run, tmp_path):
    import json

    from converter import verification

    run_convert(pano_run, tmp_path / "out", engine="streaming", max_shard_size="40KB")
    folder = tmp_path / "out" / "language_model"
    verification.load_clean(folder, "AutoModelForCausalLM", torch.device("cpu"), "meta")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    said = f"^{folder / 'model.safetensors.index.json'}: its weight_map does not say which file holds each tensor"
    with pytest.raises(ConvertError, match=said):
        verification.load_clean(folder, "AutoModelForCausalLM", torch.device("cpu"), "meta")


def test_the_reload_on_the_meta_device_names_an_auto_class_without_a_model_for_the_config(pano_export):
    from converter import verification

    folder = pano_export[0] / "vision_encoder"
    said = f"^{folder}: AutoModelForCausalLM has no model for a siglip_vision_model config$"
    with pytest.raises(ConvertError, match=said):
        verification.load_clean(folder, "AutoModelForCausalLM", torch.device("cpu"), "meta")
