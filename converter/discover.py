"""Finding a run's inputs: which checkpoint and which adapter folder a conversion uses.

Importing this module does not import torch (the CLI finds the checkpoint before the heavy imports).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .errors import ConvertError
from .kinds import checkpoint_kind
from .names import ADAPTER_DIR, CHECKPOINTS_DIR, LAST_CHECKPOINT

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """The files a conversion reads. ``checkpoints`` lists every candidate seen, chosen one included."""

    run: Path
    checkpoint: Path
    adapter_root: Path | None
    checkpoints: tuple[Path, ...]
    reason: str  # why this checkpoint was chosen


def _global_step(path: Path) -> int:
    """A checkpoint's global_step, read from its metadata (tensors are not read)."""
    from .sources import read_metadata  # torch is imported only when this is needed

    step = read_metadata(path).get("global_step")
    return int(step) if isinstance(step, int) else -1


def find_inputs(run_or_ckpt: Path, ckpt: Path | None = None, adapter_dir: Path | None = None) -> RunInputs:
    """Choose the checkpoint (``ckpt``, else last.ckpt, else the newest by global_step) and adapter folder.

    ``run_or_ckpt`` is a run folder (``checkpoints/``, ``lora_weights/``) or a checkpoint itself. A checkpoint is a
    file, or a folder written by multi-GPU training (DeepSpeed ZeRO, torch.distributed.checkpoint).
    """
    run_or_ckpt = Path(run_or_ckpt)
    if not run_or_ckpt.exists():
        raise ConvertError(f"{run_or_ckpt}: no such run folder or checkpoint file")
    if run_or_ckpt.is_file() or checkpoint_kind(run_or_ckpt) is not None:
        parent = run_or_ckpt.parent
        run = parent.parent if parent.name == CHECKPOINTS_DIR else parent
        ckpt = ckpt or run_or_ckpt
    else:
        run = run_or_ckpt

    ckpt_dir = run / CHECKPOINTS_DIR if (run / CHECKPOINTS_DIR).is_dir() else run
    found = tuple(sorted(p for p in ckpt_dir.iterdir() if checkpoint_kind(p) is not None))
    if ckpt is not None:
        ckpt = Path(ckpt)
        if not ckpt.is_absolute() and not ckpt.exists() and (run / ckpt).exists():
            ckpt = run / ckpt
        if not ckpt.is_file() and checkpoint_kind(ckpt) is None:
            what = (
                "a folder that is no checkpoint (no DeepSpeed 'latest', no .metadata)"
                if ckpt.is_dir()
                else "no such file"
            )
            raise ConvertError(f"{ckpt}: {what} (given with --ckpt)")
        reason = "given with --ckpt"
    elif checkpoint_kind(ckpt_dir / LAST_CHECKPOINT) is not None:
        ckpt, reason = ckpt_dir / LAST_CHECKPOINT, LAST_CHECKPOINT
    else:
        lightning = [p for p in found if p.suffix == ".ckpt"]
        if not lightning:
            raise ConvertError(f"{ckpt_dir}: no checkpoint (*.ckpt file or folder) found; pass one with --ckpt")
        steps = {p: _global_step(p) for p in lightning}
        ckpt = max(lightning, key=lambda p: (steps[p], p.stat().st_mtime))
        reason = f"newest by global_step ({steps[ckpt]}) of {len(lightning)}"

    if adapter_dir is not None:
        adapter_root = Path(adapter_dir)
        if not adapter_root.is_dir():
            raise ConvertError(f"{adapter_root}: no such adapter folder (given with --adapter-dir)")
    else:
        adapter_root = run / ADAPTER_DIR if (run / ADAPTER_DIR).is_dir() else None
    return RunInputs(run, ckpt, adapter_root, found, reason)


def relative_to_run(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (the run); outside it, its name alone (as a manifest records a checkpoint: it
    holds no paths of the machine that wrote it)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().name
