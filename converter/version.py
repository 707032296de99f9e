"""ckpt2hf's version: the one place it is written (pyproject.toml reads it from here, the manifest records it)."""

__version__ = "0.1.0"
