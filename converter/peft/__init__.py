"""The PEFT wing: everything ckpt2hf knows about adapters, for every tuner PEFT registers.

The rest of the package asks it questions and never names a tuner: what a component's keys say (``keys``), which
config rebuilds the adapter (``config``), whether the checkpoint and the adapter folder agree (``agreement``), which
PEFT model to build and how to merge it (``model``), the adapter's share of the plan (``plan``) and the clean
adapter folder of ``--adapter-out`` (``adapter_out``). What PEFT supports is read from PEFT's own registries
(``registry``); a tuner PEFT can merge needs no code here.
"""

from .adapter_out import write_adapters
from .agreement import (
    Pairing,
    SourceComparison,
    compare_sources,
    peft_saved_view,
    require_agreement,
    shape_like_folder,
)
from .config import GivenConfig, adapter_config, component_config, library_warnings_to_log, parameters
from .keys import (
    PEFT_PREFIX,
    AdapterKeys,
    ComponentKeys,
    PeftLayout,
    base_key,
    classify_adapter_keys,
    component_adapter_keys,
    component_keys,
    has_markers,
    is_saved_copy,
    is_trained_state,
    renamed,
)
from .model import ModelShape, build_peft_model, describe_model, merge_and_unload, merge_unit, release
from .plan import AdapterInputs, AdapterPlan, MergeUnit, plan_adapter
from .registry import supported_table, tuner

__all__ = [
    "PEFT_PREFIX",
    "AdapterInputs",
    "AdapterKeys",
    "AdapterPlan",
    "ComponentKeys",
    "MergeUnit",
    "ModelShape",
    "Pairing",
    "PeftLayout",
    "SourceComparison",
    "GivenConfig",
    "adapter_config",
    "base_key",
    "build_peft_model",
    "classify_adapter_keys",
    "compare_sources",
    "component_adapter_keys",
    "component_config",
    "component_keys",
    "describe_model",
    "has_markers",
    "is_saved_copy",
    "is_trained_state",
    "library_warnings_to_log",
    "merge_and_unload",
    "merge_unit",
    "parameters",
    "peft_saved_view",
    "plan_adapter",
    "release",
    "renamed",
    "require_agreement",
    "shape_like_folder",
    "supported_table",
    "tuner",
    "write_adapters",
]
