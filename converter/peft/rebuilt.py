"""Whether a tuner's merge reads state PEFT computes from the base weights when it builds the model (PSOFT's
caches of an SVD of each weight), found by trying rather than by a list of tuners.

Such state is in no checkpoint and no adapter folder; the full engine has it right (it builds the whole model around
the real base weights, as training did), the streaming engine cannot (it materialises one unit at a time, around a
model whose weights were never loaded). The test: PEFT builds the model twice, around two different random bases;
for each unit whose unsaved state differs between the two, the same unit state is merged in both. If the merges
differ, the merge reads base-dependent state. Small models only (``LIMIT``): the test holds the model twice.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import library_warnings_to_log
from .model import _build_base, _tuner_layers, _wrap, merge_unit

LIMIT = 1 << 30  # float32 bytes of a model above which the test is not run


def _unsaved_values(peft: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of each tuner layer that no state_dict holds, by ``<layer path>/<attribute>``."""
    persistent = set(peft.state_dict(keep_vars=True))
    found = {}
    for path, layer in _tuner_layers(peft).items():
        for name, buffer in layer.named_buffers():
            if not name.startswith("base_layer.") and f"{path}.{name}" not in persistent:
                found[f"{path}/{name}"] = buffer
        for attr, value in vars(layer).items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            for key, tensor in items:
                if not attr.startswith("_") and isinstance(tensor, torch.Tensor):
                    found[f"{path}/{attr}.{key}"] = tensor
    return found


def _build(auto_class: str, hf_config: Any, config: Any, adapter_name: str, where: str, seed: int) -> nn.Module:
    from transformers.initialization import no_init_weights

    generator = torch.Generator().manual_seed(seed)
    with library_warnings_to_log(), torch.device("cpu"):
        with no_init_weights():
            base = _build_base(auto_class, copy.deepcopy(hf_config), where, dtype=torch.float32)
        with torch.no_grad():
            for param in base.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return _wrap(base, config, adapter_name, where)


def base_dependent_units(
    auto_class: str, hf_config: Any, config: Any, adapter_name: str, units: Any, nbytes: int, where: str = ""
) -> tuple[str, ...] | None:
    """The units (plain module paths) whose merge reads state PEFT derives from the base weights; None when the
    model is too large to test (``nbytes``: its float32 size)."""
    if nbytes > LIMIT:
        return None
    first, second = (_build(auto_class, hf_config, config, adapter_name, where, seed) for seed in (1, 2))
    a, b = _unsaved_values(first), _unsaved_values(second)
    differing = {key.split("/", 1)[0] for key in a if key in b and not _same(a[key], b[key])}
    dependent = []
    generator = torch.Generator().manual_seed(3)
    for unit in units:
        if unit.path not in differing:
            continue
        one, two = first.get_submodule(unit.path), second.get_submodule(unit.path)
        state = {k: torch.randn(v.shape, generator=generator) * 0.02 if v.is_floating_point() else v.clone()
                 for k, v in one.state_dict().items()}  # fmt: skip
        merged = []
        for layer in (one, two):
            layer.load_state_dict({k: v.clone() for k, v in state.items()})
            merge_unit(layer, adapter_name, config, where)
            merged.append(dict(layer.get_base_layer().named_parameters(recurse=False)))
        if any(not torch.equal(merged[0][n], merged[1][n]) for n in merged[0]):
            dependent.append(unit.module)
    return tuple(dependent)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
