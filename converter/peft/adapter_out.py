"""``--adapter-out DIR``: the run's adapter as a clean PEFT folder of the same type, for people who keep fine-tuning
or serve adapters. PEFT's own ``get_peft_model_state_dict`` selects and names the tensors (standard keys, no
Lightning prefixes, no adapter name; each tuner's own rules), so ``PeftModel.from_pretrained(base, DIR)`` rebuilds the
unmerged model; ``adapter_config.json`` names the base (its hub id, else its folder's name). A run that added tokens
also ships its tokenizer there, and its resized embeddings (the base has to be resized to ``len(tokenizer)`` rows
before loading, as in training)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError
from ..names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SAFETENSORS_METADATA
from ..sources import Sources
from .config import library_warnings_to_log
from .keys import TOKEN_ADAPTER, is_adapter_state, plain_module


def _adapter_state(part: Any, sources: Sources) -> dict[str, torch.Tensor]:
    """The PEFT model's state that PEFT's own selection may keep: adapter state, saved modules, token adapters and
    the embeddings (read from the sources); the frozen weights of the other layers are not read."""
    adapter = part.adapter.adapter_name
    embeddings = {k.removesuffix(".weight") for k in (part.tie.embed, part.tie.head) if k} if part.tie else set()
    state = {}
    for rel, ref in part.inputs.items():
        module = plain_module(rel.removeprefix("base_model.model.")).rsplit(".", 1)[0]
        if is_adapter_state(rel, adapter) or TOKEN_ADAPTER in rel.split(".") or module in embeddings:
            state[rel] = sources.read(ref).contiguous()
    return state


def write_adapter(part: Any, sources: Sources, folder: Path) -> list[str]:
    """Write ``part``'s adapter into ``folder`` (which exists); returns the file names written."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    plan = part.adapter
    model = copy.deepcopy(plan.meta_model)
    config = copy.deepcopy(plan.config)
    model.peft_config[plan.adapter_name] = offline = copy.deepcopy(config)
    offline.base_model_name_or_path = None  # PEFT's "auto" then decides from the model alone, without the hub
    resized = part.vocab_resized is not None
    with library_warnings_to_log():
        tensors = get_peft_model_state_dict(
            model,
            state_dict=_adapter_state(part, sources),
            adapter_name=plan.adapter_name,
            save_embedding_layers=True if resized else "auto",
        )
    if not tensors:
        raise ConvertError(f"{part.name}: PEFT found no adapter tensors to write for --adapter-out")
    # PEFT may name one tensor twice (a saved module's weight and the resized embedding): one copy each, as PEFT's
    # own save_pretrained writes them (safetensors refuses aliases).
    tensors = {k: v.to("cpu").clone().contiguous() for k, v in tensors.items()}
    config.base_model_name_or_path = part.base.name if part.base is not None else None
    config.inference_mode = True
    config.save_pretrained(folder)
    weights = folder / ADAPTER_WEIGHTS[0]
    save_file(tensors, weights, metadata=dict(SAFETENSORS_METADATA))
    os.chmod(weights, (folder / ADAPTER_CONFIG).stat().st_mode & 0o666)  # save_file's 0600, like its neighbours
    written = [ADAPTER_CONFIG, ADAPTER_WEIGHTS[0]]
    if part.tokenizer is not None and part.tokenizer.shipped_from_run:
        for name in part.tokenizer.files:
            shutil.copyfile(part.tokenizer.path / name, folder / name)
        written += list(part.tokenizer.files)
    back = load_file(weights)
    if back.keys() != tensors.keys() or any(not torch.equal(back[k], v) for k, v in tensors.items()):
        raise ConvertError(f"{weights}: the adapter was not written exactly; the disk may be failing")
    logging.getLogger(__name__).info("%s: adapter written to %s (%d tensors)", part.name, folder, len(tensors))
    return written


def write_adapters(plan: Any, sources: Sources, root: Path) -> dict[str, Any]:
    """Write every part's adapter under ``root`` (one part into ``root`` itself, several into ``root/<part
    folder>/``); returns the manifest's record (folders relative to ``root``)."""
    parts = [p for p in plan.parts if p.adapter is not None]
    if not parts:
        raise ConvertError(f"{plan.inputs.checkpoint}: --adapter-out: the run has no adapter to write")
    record = {}
    for part in parts:
        folder = root / part.out if len(parts) > 1 else root
        folder.mkdir(parents=True, exist_ok=True)
        files = write_adapter(part, sources, folder)
        record[part.name] = {
            "folder": folder.relative_to(root).as_posix() or ".",
            "files": files,
            "base": part.base.name if part.base else None,
            "peft_type": part.adapter.peft_type,
        }
    return record
