"""transformers' own conversion mapping, both ways: a checkpoint's names as ``from_pretrained`` reads them (the
renamings of older checkpoints: CLIP's ``vision_model.`` before transformers 5, LayerNorm's ``gamma``), and the
tensors of an export as ``save_pretrained`` writes them (a mixture-of-experts model's fused experts written one
tensor per expert, as the hub's checkpoints are). No table of ours: ``transformers.conversion_mapping`` is the one
transformers keeps for every architecture, and its reverse is what ``save_pretrained`` applies.
"""

from __future__ import annotations

import copy
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
