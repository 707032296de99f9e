"""File names and format constants of inputs and exports, defined once."""

from __future__ import annotations

# The export
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ckpt2hf.manifest/1"
MODEL_CARD = "README.md"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's filename_pattern
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in every safetensors header
CONFIG = "config.json"

# A tokenizer's files, and a processor's
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Files copied from a base folder when present: generation settings, tokenizer, processor.
SUPPORT_FILES = ("generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES)

# A run
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "lora_weights"
LAST_CHECKPOINT = "last.ckpt"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Names of the tensor sources a plan refers to
CHECKPOINT = "checkpoint"
ADAPTER = "adapter"
