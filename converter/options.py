"""What a conversion takes: ``ConvertOptions``, one field per command-line flag."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .sources.pread import CHUNK_BYTES, POOL_BYTES

if TYPE_CHECKING:
    from .peft import GivenConfig


@dataclasses.dataclass
class ConvertOptions:
    """Everything ``convert`` takes; the CLI maps its flags one to one onto these fields."""

    run: Path
    out: Path | None = None
    ckpt: Path | None = None
    config: str = "auto"  # a layout config (name in configs/ or a YAML path); auto: discovered from the keys
    adapter_dir: Path | None = None
    lora_from: str = "auto"  # auto | checkpoint | adapter
    bases: dict[str, Path] = dataclasses.field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    max_shard_size: str | int = "5GB"
    progress: bool = True
    engine: str = "auto"  # auto | full | streaming
    max_memory: str | int | None = None  # the auto engine streams when the full engine would need more
    tokenizer: Path | None = None  # the tokenizer to ship with a language model (default: the run's, else the base's)
    qlora_base: str = "base"  # base: a QLoRA run's base weights from the base model; dequantized: from the run
    chunk_bytes: int = CHUNK_BYTES  # pieces the engines read and write at a time
    pool_bytes: int = POOL_BYTES  # buffers the reader keeps for reuse
    adapter_out: Path | None = None  # also write the run's adapter as a clean PEFT folder here
    source_sha256: bool = False  # also hash every byte of the checkpoint (default: its zip records identify it)
    auto_class: str | None = None  # the task model's transformers Auto class (default: the adapter's task_type)
    strict: bool = False  # a tensor the checkpoint lacks is an error, not read from the base
    adapter_config: Path | None = None  # a PEFT adapter_config.json for a run that saved none
    lora_r: int | None = None  # LoRA's rank, for a run that saved no adapter config (default: from the tensors)
    lora_alpha: float | None = None  # LoRA's alpha, for a run that saved no adapter config nor a lora_alpha

    @property
    def given_config(self) -> GivenConfig:
        """What the command line says of the adapter's config."""
        from .peft import GivenConfig

        return GivenConfig(self.adapter_config, self.lora_r, self.lora_alpha)


# The options that shape what an export holds (where it is written, the device and the memory plan do not).
SHAPING = (
    "ckpt",
    "config",
    "adapter_dir",
    "lora_from",
    "bases",
    "dtype",
    "max_shard_size",
    "engine",
    "tokenizer",
    "qlora_base",
    "adapter_out",
    "source_sha256",
    "auto_class",
    "strict",
    "adapter_config",
    "lora_r",
    "lora_alpha",
    "verify",
)


def options_record(opts: ConvertOptions) -> dict[str, object]:
    """The manifest's ``options``: ``digest`` identifies the options that shape the export (paths resolved, so the
    same folder given relative or absolute is the same option); ``set`` shows those not at their default, a path by
    its name only (a manifest holds no paths of the machine that wrote it)."""
    defaults = ConvertOptions(run=Path("."))
    exact: dict[str, object] = {}
    shown: dict[str, object] = {}
    for name in SHAPING:
        value = getattr(opts, name)
        exact[name] = _canonical(value, exact=True)
        if value != getattr(defaults, name):
            shown[name] = _canonical(value, exact=False)
    text = json.dumps(exact, sort_keys=True)
    return {"digest": hashlib.sha256(text.encode()).hexdigest(), "set": shown}


def _canonical(value: object, exact: bool) -> object:
    """JSON for an option's value: a path resolved (``exact``) or by its name; a mapping's paths the same way."""
    if isinstance(value, Path):
        return str(value.resolve()) if exact else value.name
    if isinstance(value, dict):
        return {str(k): _canonical(v, exact) for k, v in sorted(value.items())}
    return value
