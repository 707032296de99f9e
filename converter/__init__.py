"""ckpt2hf: turn a PyTorch Lightning training run of a PEFT/LoRA model into a clean Hugging Face export."""

from .errors import ConvertError

__all__ = ["ConvertError"]
