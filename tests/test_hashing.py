"""sha256: of the source checkpoint (``--source-sha256``: windowed hashing, and the hash the CLI starts before the
heavy imports), and of the files the safetensors stream writes."""

from __future__ import annotations

import hashlib
import mmap
import threading
from pathlib import Path

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
    seen = []

    def started(*_) -> None:  # called in every thread started meanwhile (at each of its calls), from its first
        thread = threading.current_thread()
        if thread.name == "ckpt2hf-source-hash" and thread not in seen:
            seen.append(thread)

    threading.settrace(started)  # not a poll: a hash started and stopped between two looks is still seen
    argv = ["convert", causal_lm_run, "--ckpt", ckpt, "--out", tmp_path / "out", "--quiet", "--source-sha256"]
    try:
        code, _, stderr = cli(capsys, *argv)
    finally:
        threading.settrace(None)
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


def _layout_tensors():
    import torch

    from converter.engines.shards import FileLayout

    gen = torch.Generator().manual_seed(1)
    sizes = {"a.safetensors": [900, 100, 5000], "b.safetensors": [3000, 3000], "c.safetensors": [10, 20, 0]}
    sizes["d.safetensors"] = [7000]
    tensors, files = {}, {}
    for filename, lengths in sizes.items():
        files[filename] = []
        for i, n in enumerate(lengths):
            name = f"{filename[0]}{i}"
            tensors[name] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
            files[filename].append(name)
    return FileLayout(files), tensors


def test_files_written_at_once_take_their_tensors_in_turn_largest_remainder_first():
    """The schedule: each file's tensors in its own order; at most ``at_once`` files open; the next tensor from the
    open file with the most bytes left; the next file opens when one is done."""
    from converter.engines.shards import FileSet

    layout, tensors = _layout_tensors()
    entries = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    one = FileSet(Path("unused"), layout, entries, at_once=1).order
    assert one == [(f, n) for f, names in layout.files.items() for n in names]
    two = FileSet(Path("unused"), layout, entries, at_once=2).order
    assert [n for _, n in two] == ["a0", "b0", "a1", "a2", "b1", "d0", "c0", "c1", "c2"]
    for at_once in (2, 3, 9):
        order = FileSet(Path("unused"), layout, entries, at_once=at_once).order
        assert sorted(order) == sorted(one)
        for filename, names in layout.files.items():
            assert [n for f, n in order if f == filename] == names


@pytest.mark.parametrize("at_once", [2, 4])
def test_files_written_at_once_hold_the_bytes_of_files_written_in_turn(tmp_path, monkeypatch, at_once):
    """Several shards written at once (each on its threads, with small staging buffers: many edges) hold exactly
    the bytes that writing them one after the other gives, and each digest is its file's."""
    from converter.engines import shards, streams

    monkeypatch.setattr(streams, "STAGE_BYTES", streams.DIRECT_ALIGN)
    layout, tensors = _layout_tensors()
    entries = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    written = {}
    for n in (1, at_once):
        folder = tmp_path / str(n)
        folder.mkdir()
        files = shards.FileSet(folder, layout, entries, at_once=n)
        for filename, name in files.order:
            tensor, third = tensors[name], tensors[name].numel() // 3
            for piece in (tensor[:third], tensor[third:]) if third else (tensor,):
                files.stream(filename).write(name, piece)
            files.done(filename)
        digests = files.close()
        assert digests == {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in layout.files}
        written[n] = {f: (folder / f).read_bytes() for f in layout.files}
    assert written[1] == written[at_once]


def test_files_at_once_comes_from_the_environment_else_one_per_four_cores(monkeypatch):
    from converter.engines import shards
    from converter.engines.shards import files_at_once
    from converter.errors import ConvertError
    from converter.names import FILES_AT_ONCE

    monkeypatch.setenv(FILES_AT_ONCE, "5")
    assert files_at_once() == 5
    monkeypatch.setenv(FILES_AT_ONCE, "many")
    said = "^CKPT2HF_FILES_AT_ONCE='many': not a number of files; unset it or give one$"
    with pytest.raises(ConvertError, match=said):
        files_at_once()
    monkeypatch.delenv(FILES_AT_ONCE)
    for cores, expected in ((None, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)):
        monkeypatch.setattr(shards.os, "cpu_count", lambda c=cores: c)
        assert files_at_once() == expected, cores


def test_a_finished_file_gives_its_staging_buffers_back_before_the_next_opens(tmp_path, monkeypatch):
    """Memory follows the files open at once, not the files of the part: once a file's tensors are handed over and
    it is written and hashed, none of its staging buffers is held any more (the part's other files still to come)."""
    import types
    import weakref

    from converter.engines import shards, streams

    made, real = [], streams.mmap.mmap

    def mapping(*args):
        buffer = real(*args)
        made.append(weakref.ref(buffer))
        return buffer

    monkeypatch.setattr(streams, "STAGE_BYTES", streams.DIRECT_ALIGN)
    monkeypatch.setattr(streams, "mmap", types.SimpleNamespace(mmap=mapping))
    layout, tensors = _layout_tensors()
    entries = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    files = shards.FileSet(tmp_path, layout, entries, at_once=1)
    first = next(iter(layout.files))
    for filename, name in files.order:
        if filename != first:
            break
        files.stream(filename).write(name, tensors[name])
        files.done(filename)
    stream = files.stream(first)
    for thread in (stream._thread, stream._disk, stream._hash._thread):
        thread.join()
    assert len(made) == streams.STAGES and all(ref() is None for ref in made)
    for filename, name in files.order:
        if filename != first:
            files.stream(filename).write(name, tensors[name])
            files.done(filename)
    digests = files.close()
    assert digests == {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in layout.files}


def test_crc32_combine_gives_the_crc32_of_the_bytes_one_after_the_other():
    import os
    import zlib

    from converter.sources.crc import crc32_combine

    for first, second in ((0, 0), (0, 5), (5, 0), (1, 1), (1000, 12345), (7, 1 << 20)):
        a, b = os.urandom(first), os.urandom(second)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), (first, second)
