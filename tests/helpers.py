"""Test helpers: run the converter (library and CLI) and rebuild the VLM from an export."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from converter.cli import main
from converter.example import Resampler, make_projector, panorama_logits
from converter.pipeline import ConvertOptions, convert

from trainers import load_trained_module

REPO = Path(__file__).resolve().parent.parent


def run_convert(run: Path, out: Path, verify: bool = False, **options) -> dict:
    """The library call, quiet; without verification unless asked (tests that check values compare themselves)."""
    return convert(ConvertOptions(run=run, out=out, progress=False, verify=verify, **options))


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, keyed ``folder/name``."""
    found = {}
    for path in sorted(out.rglob("*.safetensors")):
        found.update({f"{path.relative_to(out).parent.as_posix()}/{k}": v for k, v in load_file(path).items()})
    return found


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same keys, and every tensor equal in dtype and value."""
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    said = {  # what differs, and by how much: a failure says where to look
        k: (str(got[k].dtype), str(expected[k].dtype), float((got[k].double() - expected[k].double()).abs().max()))
        for k in different
        if got[k].shape == expected[k].shape
    }
    assert different == [], said


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``ckpt2hf ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_subprocess(*argv: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [PYTHON] -m converter ARGV`` in a fresh process (to see exactly what a user sees)."""
    return Started(*argv, python=python).result()


class Started:
    """``python [PYTHON] -m converter ARGV`` started now, in a fresh process; ``result()`` waits for it. A module
    starts its slow command-line runs this way at its first test, so that they run beside its other tests."""

    def __init__(self, *argv: str, python: tuple[str, ...] = ()) -> None:
        command = [sys.executable, *python, "-m", "converter", *map(str, argv)]
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def result(self) -> subprocess.CompletedProcess:
        stdout, stderr = self._proc.communicate(timeout=300)
        return subprocess.CompletedProcess(self._proc.args, self._proc.returncode, stdout, stderr)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: to assert that sources are untouched."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_report(folder: Path, cls=AutoModelForCausalLM):
    model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return model.eval(), {
        k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }


def probe(run: Path, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image and text, sized for the run's base models."""
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    vision = json.loads((Path(hparams["vision_name"]) / "config.json").read_text())
    vocab = json.loads((Path(hparams["language_model_name"]) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    size = vision["image_size"]
    return torch.randn(2, 3, size, size, generator=gen), torch.randint(0, vocab, (2, 9), generator=gen)


@torch.no_grad()
def trained_logits(run: Path, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The model that trained (unmerged PEFT), rebuilt from its checkpoint."""
    module = load_trained_module(run)
    return module.vlm(pixel_values, input_ids)


@torch.no_grad()
def export_logits(out: Path, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The VLM reassembled from the export's four folders, no PEFT involved."""
    vision = AutoModel.from_pretrained(out / "vision_encoder").eval()
    lm = AutoModelForCausalLM.from_pretrained(out / "language_model", dtype=torch.float32).eval()
    dim = vision.config.hidden_size
    resampler = Resampler(dim, num_queries=4)
    resampler.load_state_dict(load_file(out / "resampler" / "model.safetensors"))
    projector = make_projector(dim, lm.config.hidden_size)
    projector.load_state_dict(load_file(out / "projector" / "model.safetensors"))
    return panorama_logits(vision, resampler.eval(), projector.eval(), lm, pixel_values, input_ids)


def no_stage_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".ckpt2hf-" in p.name]


def refused(capsys, run: Path, tmp_path: Path, *extra: str, command: str = "convert") -> str:
    """Run the CLI; assert exit 2, one line on stderr, nothing written, the sources unchanged; return the line."""
    before = tree_digest(run)
    out = tmp_path / "out"
    argv = [command, run, *(["--out", out] if command == "convert" else []), *extra, "--quiet"]
    code, stdout, stderr = cli(capsys, *argv)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ckpt2hf: error: ")
    assert stdout == "" and not out.exists() and no_stage_left(tmp_path)
    assert tree_digest(run) == before
    return lines[0]


def assert_engines_agree(run: Path, tmp_path: Path, full: Path | None = None, **options) -> None:
    """The full and the streaming engine write the same tensors, configs and key accounting (``full``: an export
    the full engine wrote already)."""
    if full is None:
        full = tmp_path / "full"
        run_convert(run, full, engine="full", **options)
    streaming = tmp_path / "streaming"
    run_convert(run, streaming, engine="streaming", **options)
    assert_same_tensors(export_tensors(streaming), export_tensors(full))
    manifests, configs = {}, {}
    for engine, out in (("full", full), ("streaming", streaming)):
        manifests[engine] = json.loads((out / "manifest.json").read_text())
        found = [p for p in out.rglob("*.json") if p.name != "manifest.json"]
        configs[engine] = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in found}
    assert configs["full"] == configs["streaming"]
    assert manifests["full"]["keys"] == manifests["streaming"]["keys"]
    assert (manifests["full"]["engine"], manifests["streaming"]["engine"]) == ("full", "streaming")
