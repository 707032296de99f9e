"""Where a component's base config comes from: ``--base NAME=PATH``, else a hyper-parameter naming a local folder
or a hub id: from the local Hugging Face cache, else (online) its configuration, tokenizer and processor files are
fetched, never its weights. Only configs, generation settings, tokenizer and processor files are taken from a base;
weights come from the checkpoint (or, for a run that saved no frozen weights, a local base folder)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConvertError, untrusted
from .hparams import lookup
from .layout import Component
from .names import CONFIG, FETCHED_FROM_HUB

HUB_CACHE = "Hugging Face cache"
HUB_FETCHED = "fetched from the Hugging Face hub"
FETCHED = FETCHED_FROM_HUB

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """A base model folder (holding config.json) and how it was found."""

    path: Path
    found_by: str  # "--base NAME", "hyper_parameters.KEY" or "hyper_parameters.KEY (Hugging Face cache)"
    hub_id: str | None = None  # the hub id it was found by, if any
    revision: str | None = None  # the hub commit of its files, for a hub id

    @property
    def name(self) -> str:
        """How an export names the base: its hub id, else its folder's name (never a path of this machine)."""
        return self.hub_id or self.path.resolve().name

    def record(self) -> dict[str, str]:
        return {"name": self.name, "found_by": self.found_by, **({"revision": self.revision} if self.revision else {})}


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
        found_on_hub = _hub_snapshot(value, where, comp.name, path)
        if found_on_hub is not None:
            folder, how = found_on_hub
            return BaseRef(folder, f"hyper_parameters.{path} ({how})", hub_id=value, revision=folder.name)
    said = (
        f"hyper_parameters give {', '.join(tried)}, neither a local folder nor in the Hugging Face cache"
        if tried
        else f"hyper_parameters have no {' or '.join(comp.base) or 'base entry'}"
    )
    raise ConvertError(
        f"{where}: no config for {comp.name}: {said}; pass --base {comp.name}=PATH (a folder with config.json)"
    )


def _hub_snapshot(repo_id: str, where: Path, comp: str, hparam: str) -> tuple[Path, str] | None:
    """The snapshot folder of a hub id and how it was found: from the local cache, else (online) fetched -- only
    the configuration, tokenizer, processor and model card files, never weights. None: not a hub id, or offline and
    not cached. A fetch that fails is a ConvertError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=list(FETCHED)))
        if (path / CONFIG).is_file():
            return path, HUB_CACHE
    except (HFValidationError, ValueError):
        return None  # not a hub id
    except (LocalEntryNotFoundError, OSError):
        pass
    if constants.HF_HUB_OFFLINE:
        return None
    log.info("%s: fetching the configuration and tokenizer of %s from the Hugging Face hub (no weights)", comp, repo_id)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=list(FETCHED)))
    except Exception as exc:  # network, authentication, not found: all the same to the user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ConvertError(
            f"{where}: no config for {comp}: hyper_parameters.{hparam}={repo_id!r} is not a local folder, and "
            f"fetching it from the Hugging Face hub failed ({type(exc).__name__}: {reason}); pass --base "
            f"{comp}=PATH (a folder with config.json), or log in (hf auth login) for a gated model"
        ) from exc
    if not (path / CONFIG).is_file():
        raise ConvertError(f"{where}: {repo_id} on the Hugging Face hub has no config.json; pass --base {comp}=PATH")
    return path, HUB_FETCHED


def load_base_config(base: BaseRef) -> Any:
    """The transformers config of a base folder."""
    from transformers import AutoConfig

    with untrusted(base.path / CONFIG, "not a usable model config", "pass --base with the model's own folder"):
        return AutoConfig.from_pretrained(base.path, local_files_only=True)
