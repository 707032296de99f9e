"""transformers' own conversion mapping, both ways: a checkpoint's names as ``from_pretrained`` reads them (the
renamings of older checkpoints: CLIP's ``vision_model.`` before transformers 5, LayerNorm's ``gamma``), and the
tensors of an export as ``save_pretrained`` writes them (a mixture-of-experts model's fused experts written one
tensor per expert, as the hub's checkpoints are). No table of ours: ``transformers.conversion_mapping`` is the one
transformers keeps for every architecture, and its reverse is what ``save_pretrained`` applies.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConvertError


def meta_model(auto_class: str, hf_config: Any, where: str) -> nn.Module:
    """The model a config builds, on the meta device (no memory)."""
    import transformers

    from .peft.config import library_warnings_to_log

    with library_warnings_to_log(), torch.device("meta"):
        try:
            return getattr(transformers, auto_class).from_config(copy.deepcopy(hf_config))
        except (ValueError, KeyError) as exc:  # e.g. a vision config given to a causal LM component
            raise ConvertError(
                f"{where}: {auto_class} cannot build a model from the base config ({type(hf_config).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); check the component's kind in the layout config, or pass --base"
            ) from exc


def load_renames(model: nn.Module) -> Callable[[str], str] | None:
    """How ``from_pretrained`` renames a checkpoint's keys for ``model`` (older names to today's); None when the
    architecture has no renaming. Keys that a converter would compute from several tensors are left as they are."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model, add_legacy=True)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    if not renamings:
        return None
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        return key if pattern is not None else renamed

    return rename


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """A tensor as ``save_pretrained`` writes it: from which in-memory tensor, and whether its bytes are that tensor's
    (a renaming) or computed from it by transformers' reverse conversion (an expert's slice of fused experts)."""

    name: str
    shape: tuple[int, ...]
    source: str  # the in-memory (plan) name
    renamed: bool


@dataclasses.dataclass(frozen=True)
class SaveLayout:
    """How an export's tensors are written in the hub's format (None where that is the in-memory one)."""

    tensors: tuple[SavedTensor, ...]
    model: Any = dataclasses.field(compare=False, repr=False)  # the meta model transformers' conversion needs

    def of(self, source: str) -> tuple[SavedTensor, ...]:
        return tuple(t for t in self.tensors if t.source == source)

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In-memory tensors (all of a conversion's sources) as ``save_pretrained`` writes them."""
        from transformers.core_model_loading import revert_weight_conversion

        from .peft.config import library_warnings_to_log

        with library_warnings_to_log(), torch.no_grad():
            return {k: v.contiguous() for k, v in revert_weight_conversion(self.model, dict(tensors)).items()}


def _reverse_converters(model: nn.Module) -> list[Any] | None:
    """The reversed converters ``save_pretrained`` applies to ``model`` (as ``revert_weight_conversion`` picks
    them for a model not loaded by ``from_pretrained``); None when it applies nothing."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
    if not conversions:
        return None
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    return [r for r in reverse if isinstance(r, WeightConverter)]


def save_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> SaveLayout | None:
    """Where each in-memory tensor (``shapes``, in writing order) goes when ``save_pretrained`` writes ``model``:
    None when it writes them as they are."""
    from transformers.core_model_loading import apply_converters, revert_weight_conversion

    converters = _reverse_converters(model)
    if converters is None:
        return None
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    whole = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(meta)).items()}
    if whole == dict(shapes):
        return None
    found = []
    for key, tensor in meta.items():
        outputs = revert_weight_conversion(model, {key: tensor})
        renamed = apply_converters(key, converters)[1] is None
        found.extend(
            SavedTensor(name, tuple(t.shape), key, renamed and len(outputs) == 1) for name, t in outputs.items()
        )
    if {t.name: t.shape for t in found} != whole:
        raise ConvertError(
            f"{where}: transformers writes this architecture's tensors from several in-memory tensors at once, which "
            "ckpt2hf does not do yet; report this with --debug output"
        )
    return SaveLayout(tuple(found), model)
