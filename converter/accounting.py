"""What happens to each source key (the fates the manifest counts), and the keys of bitsandbytes' 4-bit state.

Every key of a checkpoint ends in exactly one fate: written (under its plain name), merged (a base layer that
receives the adapter, or the adapter's own state, consumed by the merge), superseded (an ``original_module`` copy),
tied (an lm_head equal to the embeddings), a 4-bit quantization state (consumed by the dequantization), or dropped by
a layout rule. Tensors a run did not save and that come from its base model are counted apart: they are no source key.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

WRITTEN = "written"
MERGED = "merged into its base layer"
SUPERSEDED = "original_module superseded by modules_to_save"
TIED = "lm_head tied to the input embeddings (identical values)"
ALIASED = "tied by the model to another tensor written (identical values; from_pretrained ties it again)"
QUANT_STATE = "4-bit quantization state of a base weight (bitsandbytes)"
FROM_BASE = "not in the checkpoint (frozen, not saved): read from the base model"

# bitsandbytes' 4-bit state beside a packed weight W: W.absmax, W.quant_map, W.nested_absmax, W.nested_quant_map,
# W.quant_state.bitsandbytes__nf4 (or __fp4).
QUANT_STATE_KEY = re.compile(
    r"^(?P<w>.+)\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__(?:nf4|fp4))$"
)


def is_quant_state(key: str) -> bool:
    return QUANT_STATE_KEY.match(key) is not None


def quantized_weights(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Weights stored in 4-bit by bitsandbytes: weight key -> {state name (``absmax``, ...): its key}."""
    keys = list(keys)
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        m = QUANT_STATE_KEY.match(key)
        if m is not None:
            found[m.group("w")][key[len(m.group("w")) + 1 :]] = key
    present = set(keys)
    return {w: states for w, states in found.items() if w in present}
