"""What the consumer tests need from llama.cpp, taken from llama-cpp-python's source distribution on the package
index (which vendors llama.cpp): its ``convert_hf_to_gguf.py`` with ``conversion/`` and ``gguf-py/``, and
``models/ggml-vocab-qwen2.gguf``, from which transformers rebuilds the real Qwen2 tokenizer -- llama.cpp's converter
only accepts tokenizers whose pre-tokenizer it recognises.

``python tests/consumers.py`` prepares ``build/llama.cpp/`` once (``make venv`` runs it): the sdist downloaded,
those files extracted, the tokenizer built (about 15 s). ``make test-consumers`` also builds llama-cpp-python from
the same sdist to run the GGUF with llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA = REPO / "build" / "llama.cpp"
VERSION = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp the tests use
SDIST = LLAMA / f"llama_cpp_python-{VERSION}.tar.gz"
VENDORED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-qwen2.gguf")
CONVERTER = LLAMA / "convert_hf_to_gguf.py"
TOKENIZER = LLAMA / "qwen2-tokenizer"


def prepare() -> None:
    """Download the sdist, extract the converter and the vocabulary, build the Qwen2 tokenizer (each step once)."""
    LLAMA.mkdir(parents=True, exist_ok=True)
    if not SDIST.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={VERSION}", "-d", str(LLAMA)],
            check=True,
        )
    if not CONVERTER.is_file():
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(SDIST) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(prefix + v for v in VENDORED))]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            tar.extractall(LLAMA, members=members, filter="data")
    if not (TOKENIZER / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(LLAMA / "models", gguf_file="ggml-vocab-qwen2.gguf")
        tokenizer.save_pretrained(TOKENIZER)


def qwen_base(root: Path) -> Path:
    """A tiny Qwen3 causal LM (config and initial weights) with the real Qwen2 tokenizer and Qwen's generation
    settings, as a hub base would ship them."""
    import shutil

    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    prepare()
    folder = root / "bases" / "qwen"
    tokenizer = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    vocab = 151936  # Qwen's embedding rows: the tokenizer's 151,646 tokens, padded
    eos = [151645, 151643]  # <|im_end|>, <|endoftext|>
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos[1],
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], max_new_tokens=8).save_pretrained(folder)
    for name in TOKENIZER.iterdir():
        shutil.copyfile(name, folder / name.name)
    assert tokenizer.get("chat_template") or (folder / "chat_template.jinja").is_file()
    return folder


def to_gguf(folder: Path, gguf: Path) -> subprocess.CompletedProcess:
    """llama.cpp's converter on a Hugging Face folder, float32 (so that values compare exactly)."""
    env = {**os.environ, "PYTHONPATH": str(LLAMA / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(CONVERTER), str(folder), "--outfile", str(gguf), "--outtype", "f32"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def build(root: Path, vision_base: Path) -> tuple[Path, Path]:
    """The consumer tests' input, made in the background while other tests run (tests/background.py): a LoRA run
    of the Qwen-vocabulary model (one Trainer step), converted by ckpt2hf (without its own verification: the test
    compares the export's tensors with the GGUF's), then by llama.cpp's converter. Returns (export, GGUF)."""
    from converter.example import RunSpec, build_run
    from converter.pipeline import ConvertOptions, convert

    from trainers import causal_lm_module

    root = Path(root)
    lm = qwen_base(root)
    spec = RunSpec(name="qwen-lora", steps=1)
    run = build_run(root, spec, bases=(Path(vision_base), lm), make_module=lambda _, lm: causal_lm_module(lm))
    out, gguf = root / "export", root / "export.gguf"
    convert(ConvertOptions(run=run, out=out, config="causal_lm", progress=False, verify=False))
    converted = to_gguf(out, gguf)
    if converted.returncode != 0:
        (root / "gguf-error.txt").write_text(converted.stderr)
    else:
        read_gguf(gguf, root / "gguf.pt")
    return out, gguf


def read_gguf(gguf: Path, summary: Path) -> None:
    """What the tests compare, read from the GGUF by gguf's own reader (which takes seconds to parse a 151,936-token
    vocabulary, so the background does it): metadata, the token count, and the tensors as torch tensors."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    fields = reader.fields
    keys = ("general.architecture", "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id")
    metadata = {key: fields[key].contents() for key in keys}
    metadata["tokens"] = len(fields["tokenizer.ggml.tokens"].data)
    tensors = {
        t.name: torch.from_numpy(np.array(t.data)).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors
    }
    torch.save({"metadata": metadata, "tensors": tensors}, summary)


def outputs(root: Path) -> tuple[Path, Path]:
    return Path(root) / "export", Path(root) / "gguf.pt"


if __name__ == "__main__":
    prepare()
    print(f"llama.cpp's converter and the Qwen2 tokenizer are in {LLAMA}")
