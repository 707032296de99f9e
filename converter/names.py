"""File names and format constants of inputs and exports, defined once."""

from __future__ import annotations

# The export
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ckpt2hf.manifest/1"
MODEL_CARD = "README.md"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LEGACY_WEIGHTS = "pytorch_model.bin"  # a base folder saved before safetensors
LEGACY_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's filename_pattern
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in every safetensors header
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

# A tokenizer's files, and a processor's
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    CHAT_TEMPLATE,
    "chat_template.json",
)
PROCESSOR_FILES = (PREPROCESSOR_CONFIG, "processor_config.json")
# Files copied from a base folder when present: generation settings, tokenizer, processor.
SUPPORT_FILES = (GENERATION_CONFIG, *TOKENIZER_FILES, *PROCESSOR_FILES)
# What a base named by hub id contributes to an export, as huggingface_hub's allow_patterns: never weights.
FETCHED_FROM_HUB = (CONFIG, "tokenizer*", "chat_template*", *SUPPORT_FILES, MODEL_CARD)

# A run
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "lora_weights"
LAST_CHECKPOINT = "last.ckpt"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Names of the tensor sources a plan refers to
CHECKPOINT = "checkpoint"
ADAPTER = "adapter"

# "1": write every file through the page cache, not with O_DIRECT (engines/streams.py; the bench compares both)
BUFFERED_WRITES = "CKPT2HF_BUFFERED_WRITES"
# How many of a sharded export's files are written at once (engines/shards.py; default 1)
FILES_AT_ONCE = "CKPT2HF_FILES_AT_ONCE"
TRACE = "CKPT2HF_TRACE"  # a file: the conversion's stages, thread by thread, as a Chrome trace (timings.py)
DEFER_BITSANDBYTES = "CKPT2HF_DEFER_BITSANDBYTES"  # "1": the command line marked bitsandbytes unavailable (cli.py)
