"""What a path holds, by its name and layout alone (no file is opened; no torch): which checkpoint format reads it."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def checkpoint_kind(path: Path) -> str | None:
    """What a path holds, by its name and layout alone: ``deepspeed`` (a ZeRO checkpoint folder), ``dcp`` (a
    torch.distributed.checkpoint folder), ``file`` (a single checkpoint file), or None."""
    if path.is_dir():
        if (path / "latest").is_file() or any(path.glob("*/*model_states.pt")):
            return "deepspeed"
        if (path / ".metadata").is_file():
            return "dcp"
        return None
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES and not path.name.startswith("adapter_model"):
        return "file"
    return None
