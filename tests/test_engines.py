"""The streaming engine writes exactly what the whole-model merge_and_unload engine writes, for every fixture."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from converter.errors import ConvertError
from converter.lazy import SpanReader
from converter.stream import ReadAhead, SafetensorsStream

from helpers import run_convert

CASES = {
    "pano": ("pano_run", {}),
    "pano-bf16-sharded": ("pano_run", {"dtype": "bfloat16", "max_shard_size": "40KB"}),
    "named-adapter": ("named_adapter_run", {}),
    "dora-rslora-patterns": ("dora_run", {}),
    "causal-lm-tied": ("causal_lm_run", {"config": "causal_lm"}),
    "28-layers": ("deep_run", {}),
    "lora-from-adapter": ("stale_adapter_run", {"lora_from": "adapter"}),
}


def _tensors(out):
    found = {}
    for path in sorted(out.rglob("*.safetensors")):
        found.update({f"{path.relative_to(out).parent}/{k}": v for k, v in load_file(path).items()})
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_engines_write_identical_tensors(case, request, tmp_path):
    fixture, options = CASES[case]
    run = request.getfixturevalue(fixture)
    full = run_convert(run, tmp_path / "full", engine="full", **options)
    streaming = run_convert(run, tmp_path / "streaming", engine="streaming", **options)
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "streaming")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    files = sorted(p.relative_to(tmp_path / "full").as_posix() for p in (tmp_path / "full").rglob("*.json"))
    for rel in files:
        if rel != "manifest.json":
            assert json.loads((tmp_path / "full" / rel).read_text()) == json.loads(
                (tmp_path / "streaming" / rel).read_text()
            ), rel
    assert full["keys"] == streaming["keys"]
    assert (full["engine"], streaming["engine"]) == ("full", "streaming")
    for name, check in streaming["verification"].items():
        assert check["exact_tensors"] == full["verification"][name]["exact_tensors"]
        if check.get("merged_tensors"):
            assert check["layers_checked"] > 0
            assert check["max_rel_layer_output_diff"] <= check["layer_tolerance"]


def test_auto_engine_follows_max_memory(pano_run, tmp_path):
    assert run_convert(pano_run, tmp_path / "a", dry_run=True)["engine"] == "full"
    assert run_convert(pano_run, tmp_path / "b", dry_run=True, max_memory="100KB")["engine"] == "streaming"


def test_small_chunks_and_a_small_pool_write_the_same_tensors(pano_run, tmp_path, monkeypatch):
    """Every tensor spans several chunks and merge inputs outgrow a chunk, so the reader's pool lends, takes back
    and reuses buffers of mixed sizes while the read-ahead, writer and hasher threads hold some of them."""
    full = run_convert(pano_run, tmp_path / "full", engine="full")
    monkeypatch.setattr(SpanReader.__init__, "__defaults__", (4096, False, 16384))  # chunk, pin, pool bytes
    for dtype in ("float32", "bfloat16"):
        streaming = run_convert(pano_run, tmp_path / dtype, engine="streaming", dtype=dtype)
        reference = _tensors(tmp_path / "full")
        got = _tensors(tmp_path / dtype)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k].to(got[k].dtype)) for k in got)
        assert streaming["keys"] == full["keys"]


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
