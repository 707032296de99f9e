"""Before writing: what the plan left to the values. The checkpoint's adapter tensors are compared with the adapter
folder's (``AdapterPlan.comparison``), and a tie that the stored checksums could not decide is decided by value."""

from __future__ import annotations

import dataclasses
import logging

from .peft import compare_sources, is_saved_copy, is_trained_state, peft_saved_view
from .plan import PartPlan, Plan
from .policy import settled_tie
from .sources import Sources

log = logging.getLogger(__name__)


def settle(plan: Plan) -> Plan:
    """The plan with what only data can tell before writing filled in (reads the tensors those checks compare)."""
    return dataclasses.replace(plan, parts=tuple(_settle_part(part, plan.sources) for part in plan.parts))


def _settle_part(part: PartPlan, sources: Sources) -> PartPlan:
    adapter, tie = part.adapter, part.tie
    if adapter is not None and adapter.pairing is not None:

        def saved_view(rels: list[str]) -> dict:
            """PEFT's save of the checkpoint's trained adapter tensors (small: no base weights)."""
            state = {
                rel: sources.read(ref)
                for rel, ref in part.inputs.items()
                if is_trained_state(rel, adapter.adapter_name) and rel in part.keys
            }
            return peft_saved_view(adapter.meta_model, adapter.adapter_name, state)

        comparison = compare_sources(adapter.pairing, part.keys, sources, saved_view)
        log.info(
            "adapter sources: checkpoint and %s %s",
            adapter.adapter_folder,
            "agree" if comparison.equal else f"differ; using the {adapter.tensors_from}",
        )
        adapter = dataclasses.replace(adapter, comparison=comparison)
    if tie is not None and not tie.settled and not tie.after_merge:
        head, embed = (part.inputs[part.plain[k]] for k in (tie.head, tie.embed))
        tie = settled_tie(tie, sources.equal(head, embed)[0], "compared by value")
    return dataclasses.replace(part, adapter=adapter, tie=tie)


def trained_copies_differ(part: PartPlan, sources: Sources) -> bool:
    """Whether any modules_to_save copy differs from its original (the copy is what training changed)."""
    adapter = part.adapter
    for rel, ref in part.inputs.items():
        parts = rel.split(".")
        if adapter is not None and is_saved_copy(rel, adapter.adapter_name):
            i = parts.index("modules_to_save")
            original = ".".join([*parts[:i], "original_module", *parts[i + 2 :]])
            if original in part.inputs and not sources.equal(ref, part.inputs[original])[0]:
                return True
    return False
