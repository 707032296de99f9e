"""Consumers no one here wrote, on an export of a real run: llama.cpp's own converter turns it into a GGUF (in make
test), and llama.cpp itself runs that GGUF (``make test-consumers``, which builds llama-cpp-python first).

The run is a tiny Qwen3 with the real Qwen2 tokenizer (llama.cpp's converter recognises tokenizers by their
pre-tokenizer), trained a few steps with LoRA by a Lightning Trainer; see tests/consumers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "<|im_start|>user\nWhat is in this panorama?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def qwen_export(consumer_export) -> tuple[Path, dict]:
    """(the export, what gguf's reader read from llama.cpp's GGUF of it), made in the background while other tests
    run (tests/consumers.py)."""
    out = consumer_export["export"]
    error = out.parent / "gguf-error.txt"
    assert not error.exists(), error.read_text()[-3000:]
    return out, torch.load(consumer_export["gguf_read"], weights_only=True)


def test_llama_cpp_converts_the_export_to_gguf(qwen_export):
    """The GGUF holds the export's tensors (the merged ones included) and its tokenizer, chat template and EOS."""
    out, gguf = qwen_export
    metadata, tensors = gguf["metadata"], gguf["tensors"]
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    eos = json.loads((out / "tokenizer_config.json").read_text())["eos_token"]
    eos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == eos)
    assert metadata == {
        "general.architecture": "qwen3",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.chat_template": (out / "chat_template.jinja").read_text(),
        "tokenizer.ggml.eos_token_id": eos_id,
        "tokens": 151936,
    }
    weights = load_file(out / "model.safetensors")
    assert len(tensors) == len(weights)
    assert torch.equal(tensors["token_embd.weight"], weights["model.embed_tokens.weight"])
    assert torch.equal(tensors["output.weight"], weights["lm_head.weight"])
    for layer in range(2):  # v_proj is merged with LoRA, k_proj copied
        for gguf_name, key in (("attn_v", "v_proj"), ("attn_k", "k_proj")):
            got = tensors[f"blk.{layer}.{gguf_name}.weight"]
            assert torch.equal(got, weights[f"model.layers.{layer}.self_attn.{key}.weight"])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]


@pytest.mark.consumers
def test_llama_cpp_runs_the_gguf_like_transformers_runs_the_export(qwen_export):
    """llama.cpp (llama-cpp-python, built by make test-consumers) tokenizes like the exported tokenizer and gives
    float32 logits within 1e-3 of transformers' on the export."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test-consumers builds llama-cpp-python")
    out, _ = qwen_export
    gguf = out.with_suffix(".gguf")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=256, verbose=False, n_threads=2)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    assert float((got - expected).abs().max()) <= 1e-3
