"""Where a component's base config comes from: ``--base NAME=PATH``, else a hyper-parameter naming a local folder
or a hub id present in the local Hugging Face cache (offline). Only configs, generation settings and tokenizer
files are taken from a base; weights always come from the checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConvertError, untrusted
from .hparams import lookup
from .layout import Component
from .names import CONFIG

HUB_CACHE = "(Hugging Face cache)"


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """A base model folder (holding config.json) and how it was found."""

    path: Path
    found_by: str  # "--base NAME", "hyper_parameters.KEY" or "hyper_parameters.KEY (Hugging Face cache)"
    hub_id: str | None = None  # the hub id it was found by, if any


def resolve_base(
    comp: Component, hparams: Mapping[str, Any], run: Path, overrides: Mapping[str, Path], where: Path
) -> BaseRef:
    """The folder holding ``comp``'s config; ConvertError naming ``--base`` when there is none."""
    if comp.name in overrides:
        path = Path(overrides[comp.name])
        if not (path / CONFIG).is_file():
            raise ConvertError(f"{path}: no config.json here (given with --base {comp.name}=...)")
        return BaseRef(path, f"--base {comp.name}")
    tried = []
    for hp in comp.base:
        found = lookup(hparams, (hp,), f"the base of {comp.name}", f"--base {comp.name}=PATH", where)
        if found is None or not isinstance(found[1], str) or not found[1]:
            continue
        path, value = found
        tried.append(f"{path}={value!r}")
        local = Path(value).expanduser()
        if not local.is_absolute() and not local.exists():
            local = run / value
        if (local / CONFIG).is_file():
            return BaseRef(local, f"hyper_parameters.{path}")
        cached = _hub_cache_snapshot(value)
        if cached is not None:
            return BaseRef(cached, f"hyper_parameters.{path} {HUB_CACHE}", hub_id=value)
    said = (
        f"hyper_parameters give {', '.join(tried)}, neither a local folder nor in the Hugging Face cache"
        if tried
        else f"hyper_parameters have no {' or '.join(comp.base) or 'base entry'}"
    )
    raise ConvertError(
        f"{where}: no config for {comp.name}: {said}; pass --base {comp.name}=PATH (a folder with config.json)"
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / CONFIG).is_file() else None


def load_base_config(base: BaseRef) -> Any:
    """The transformers config of a base folder."""
    from transformers import AutoConfig

    with untrusted(base.path / CONFIG, "not a usable model config", "pass --base with the model's own folder"):
        return AutoConfig.from_pretrained(base.path, local_files_only=True)
