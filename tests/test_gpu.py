"""The GPU paths, on a machine with a CUDA device (CI has none: these are skipped there and run by hand on the GPU
machine, ``python -m pytest tests/test_gpu.py``): the writer taking tensors that are still on the GPU, and whole
conversions merged on the GPU against the same conversions merged on the CPU."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from helpers import export_tensors, run_convert

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_tensors_on_the_gpu_are_written_through_page_locked_staging_buffers(tmp_path):
    """Blocks left on the GPU are copied to the host by the copier, into staging buffers it page-locks for the
    driver and unlocks when the file is done; the file holds exactly the tensors, and its sha256 is the file's."""
    from converter.engines import streams

    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {
        "a": torch.randn(3000, 4096, device="cuda", generator=gen).to(torch.bfloat16),  # 24 MB: across buffers
        "b": torch.randn(7, 5, device="cuda", generator=gen),
        "c": torch.arange(10, dtype=torch.int64),  # a host tensor in between
        "d": torch.randn(9000, 1024, device="cuda", generator=gen).to(torch.float16),
    }
    path = tmp_path / "model.safetensors"
    stream = streams.SafetensorsStream(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {})
    for name, tensor in tensors.items():
        stream.write(name, tensor)
    stream.finish()
    digest = stream.close()
    assert stream._pinned and len(stream._pinned) == streams.STAGES
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    written = load_file(path)
    assert list(written) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(written[name], tensor.cpu()), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_conversion_merged_on_the_gpu_passes_its_checks_and_matches_the_cpu(pano_run, tmp_path, dtype):
    """The streaming engine on the GPU: verified (each merged layer's output against the unmerged layer's, the
    copied tensors read back), and every tensor as the CPU's merge writes it, to the float32 merge's rounding."""
    on_gpu = run_convert(pano_run, tmp_path / "gpu", verify=True, device="cuda", dtype=dtype, engine="streaming")
    run_convert(pano_run, tmp_path / "cpu", device="cpu", dtype=dtype, engine="streaming")
    assert on_gpu["merged_on"]["device"] == "cuda" and on_gpu["verification"]
    got, expected = export_tensors(tmp_path / "gpu"), export_tensors(tmp_path / "cpu")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=1e-5 if dtype == "float32" else 1e-2, atol=1e-6, msg=name)
