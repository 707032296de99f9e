"""sha256: of the source checkpoint (``--source-sha256``: windowed hashing, and the hash the CLI starts before the
heavy imports), and of the files the safetensors stream writes."""

from __future__ import annotations

import hashlib
import mmap
import threading

import pytest

from converter import hashing

from helpers import cli

WINDOW = 2 * mmap.ALLOCATIONGRANULARITY


@pytest.mark.parametrize("size", [0, 1, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 17])
def test_sha256_file_matches_hashlib_across_window_edges(tmp_path, size):
    path = tmp_path / "data"
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path.write_bytes(data)
    assert hashing.sha256_file(path, window=WINDOW) == hashlib.sha256(data).hexdigest()


def test_take_reuses_a_prefetched_hash_of_the_same_file(tmp_path):
    path = tmp_path / "ckpt"
    path.write_bytes(b"weights" * 1000)
    started = hashing.prefetch(path)
    taken = hashing.take(path)
    assert taken is started
    assert taken.result() == hashlib.sha256(b"weights" * 1000).hexdigest()
    again = hashing.take(path)  # taken once: a second take starts afresh
    assert again is not taken and again.result() == taken.result()


def test_a_file_changed_after_prefetch_is_hashed_again(tmp_path):
    path = tmp_path / "ckpt"
    path.write_bytes(b"old")
    started = hashing.prefetch(path)
    path.write_bytes(b"newer bytes")
    taken = hashing.take(path)
    assert taken is not started
    assert taken.result() == hashlib.sha256(b"newer bytes").hexdigest()


def test_a_failed_cli_convert_leaves_no_hashing_thread(causal_lm_run, tmp_path, capsys):
    # A checkpoint of 8 GB of holes: hashing it takes seconds, so the hash the CLI starts before the imports is
    # still running when the conversion fails (the file is no zip); the CLI must stop it before it returns.
    ckpt = tmp_path / "big.ckpt"
    with ckpt.open("wb") as f:
        f.truncate(8 << 30)
    seen, stop = [], threading.Event()

    def observe() -> None:
        while not stop.is_set() and not seen:
            seen.extend(t for t in threading.enumerate() if t.name == "ckpt2hf-source-hash")
            stop.wait(0.001)

    observer = threading.Thread(target=observe)
    observer.start()
    argv = ["convert", causal_lm_run, "--ckpt", ckpt, "--out", tmp_path / "out", "--quiet", "--source-sha256"]
    try:
        code, _, stderr = cli(capsys, *argv)
    finally:
        stop.set()
        observer.join()
    assert code == 2 and stderr.startswith(f"ckpt2hf: error: {ckpt}: ")
    assert seen, "the CLI started no hash of the checkpoint"
    assert not seen[0].is_alive()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("buffered", [False, True])
def test_a_stream_writes_and_hashes_the_same_bytes_direct_or_buffered(tmp_path, monkeypatch, buffered):
    """Tensors across the edges of the staging buffers and of direct I/O's blocks, and a last partial block: the
    file holds them exactly, and the digest the stream returns is the file's."""
    import torch
    from safetensors.torch import load_file

    from converter.engines import streams
    from converter.names import BUFFERED_WRITES

    monkeypatch.setenv(BUFFERED_WRITES, "1" if buffered else "0")
    monkeypatch.setattr(streams, "STAGE_BYTES", 4 * streams.DIRECT_ALIGN)  # small buffers: many edges
    sizes = [1, streams.DIRECT_ALIGN - 3, 4 * streams.DIRECT_ALIGN, 9 * streams.DIRECT_ALIGN + 5, 0, 77]
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for i, n in enumerate(sizes)}
    path = tmp_path / "model.safetensors"
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    stream = streams.SafetensorsStream(path, entries, {"format": "pt"})
    if buffered:
        assert not stream._file.direct
    for name, tensor in tensors.items():
        half = tensor.numel() // 2
        for piece in (tensor[:half], tensor[half:]) if half else (tensor,):  # in pieces, as the engines write rows
            stream.write(name, piece)
    stream.finish()
    digest = stream.close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
