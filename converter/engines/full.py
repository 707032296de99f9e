"""The full engine: the whole unmerged PEFT model in memory, PEFT's ``merge_and_unload``, one cast, one write.

It holds about three float32 copies of the model at its peak; in return verification runs the unmerged model and
the reloaded export end to end on the same input and compares their logits."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import policy, precision, timings, verification
from ..errors import ConvertError, preview
from ..peft import build_peft_model, merge_and_unload, shape_like_folder
from ..plan import PartPlan
from ..policy import cast_checked, settled_tie
from ..sources import Sources
from .base import Engine, Written
from .shards import write_tensors

log = logging.getLogger(__name__)


class FullEngine(Engine):
    name = "full"

    def write(self, part: PartPlan, folder: Path, verify: bool) -> FullWritten:
        reference = probe = None
        if part.adapter is not None:
            state, reference, probe, idle = self._merged_state(part, verify)
            part = dataclasses.replace(part, adapter=dataclasses.replace(part.adapter, idle=idle))
        else:
            state = {t.name: self.sources.read(t.source) for t in self._bar(part.tensors, part.name)}
        tie = part.tie
        if tie is not None and not tie.settled:  # LoRA on the embeddings: the merged values decide
            tie = settled_tie(tie, torch.equal(state[tie.head], state[tie.embed]), "after the merge")
            part = dataclasses.replace(part, tie=tie)
        precision = self._precision(part, state)
        out = {}
        for t in part.tensors:
            source = self.sources.path(t.source) if t.source is not None else self._checkpoint_path(part)
            out[t.name] = cast_checked(t.name, state.pop(t.name), t.dtype, source).to("cpu").contiguous()
        state.clear()
        hashes = write_tensors(folder, part, as_saved(part, out))
        return FullWritten(part, hashes, precision, self.sources, self.device, reference, probe)

    def _precision(self, part: PartPlan, state: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """How much of each merged tensor's adapter delta a 16-bit export keeps; the base values are read again from
        their source, one tensor at a time."""
        if part.adapter is None:
            return {}
        units = {unit.module: unit for unit in part.adapter.units}
        figures = {}
        for t in part.tensors:
            if t.merged_from is None or not precision.wanted(t.dtype):
                continue
            ref = units[t.merged_from].base_input(t.name.removeprefix(t.merged_from + "."))
            if ref is None:
                continue
            before = self.sources.read(ref).to(self.device)
            found = precision.measure(before, state[t.name], t.dtype)
            if found is not None:
                figures[t.name] = found
        return figures

    def _checkpoint_path(self, part: PartPlan) -> Path:
        return self.sources.path(next(iter(part.inputs.values())))

    def _bar(self, items: Any, name: str) -> Any:
        return tqdm(items, desc=f"reading {name}", unit="tensor", disable=not self.progress, leave=False)

    def _merged_state(self, part: PartPlan, verify: bool) -> tuple[dict[str, torch.Tensor], Any, Any, tuple]:
        """Build the unmerged PEFT model in float32, load the sources, record reference outputs, merge; return the
        plain state, the reference, the probe and the units the merge left unchanged."""
        adapter = part.adapter
        where = str(self._checkpoint_path(part))

        def base_weights() -> Iterator[tuple[str, torch.Tensor]]:
            """The base model's state as training began (the adapted modules' weights before the merge), one tensor
            at a time: the state PEFT creates and never saves may be computed from them (PSOFT's SVD)."""
            for key, rel in part.plain.items():
                yield key, self.sources.read(part.inputs[rel])

        # Only a tuner with unsaved state needs them: any other initialisation is replaced by the loaded state below.
        model = build_peft_model(
            part.auto_class, part.config, adapter.config, adapter.adapter_name, self.device, where,
            base_weights if adapter.unsaved_state else None,
        )  # fmt: skip
        shape_like_folder(model, adapter.config, adapter.adapter_name, dict(adapter.folder_shapes))
        params = model.state_dict()
        with torch.no_grad():
            for rel, ref in self._bar(part.inputs.items(), part.name):
                params[rel].copy_(self.sources.read(ref))
        del params
        reference = probe = None
        if verify and (found := verification.probe_inputs(part.auto_class, part.config)) is not None:
            probe = found
            reference = verification.model_outputs(model.get_base_model(), probe[0])
        bases = {u.module: model.get_submodule(u.path).get_base_layer() for u in adapter.units}
        sampled = {m: policy.sample(dict(b.named_parameters(recurse=False))) for m, b in bases.items()}
        with timings.timed("merging"):
            merged = merge_and_unload(model, self.progress, where)
        state = dict(merged.state_dict())
        idle = []
        for unit in adapter.units:
            params = dict(merged.get_submodule(unit.module).named_parameters(recurse=False))
            if policy.changed(params, sampled[unit.module]):
                continue
            originals = {n: self.sources.read(r) for n in params if (r := unit.base_input(n)) is not None}
            if len(originals) == len(params) and policy.unchanged(params, originals):
                idle.append(unit.module)
        planned = {t.name for t in part.candidates}
        extra, missing = sorted(set(state) - planned), sorted(planned - set(state))
        if part.tie is not None and part.tie.configured and part.tie.head in extra:
            extra.remove(part.tie.head)  # the base ties lm_head to the embeddings; the checkpoint has no lm_head
            state.pop(part.tie.head)
        if extra or missing:
            raise ConvertError(
                f"{where} ({part.name}): merge_and_unload gave other keys than planned: "
                f"extra {preview(extra, 3)}, missing {preview(missing, 3)}"
            )
        return state, reference, probe, tuple(idle)


def as_saved(part: PartPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors as the files hold them (``save_pretrained``'s format: per-expert tensors of fused experts)."""
    if part.saved is None:
        return tensors
    converted = {name: tensors.pop(name) for name in list(tensors) if part.saved.of(name)}
    return {**tensors, **(part.saved.convert(converted) if converted else {})}


@dataclasses.dataclass
class FullWritten(Written):
    sources: Sources
    device: torch.device
    reference: torch.Tensor | None  # the unmerged model's outputs on ``probe``
    probe: tuple[dict[str, torch.Tensor], str] | None  # the inputs, and what the output is ("logit", ...)

    def verify(self, folder: Path) -> dict[str, Any]:
        part = self.part
        self.sources.wait()
        result: dict[str, Any] = {}
        model = None
        if part.auto_class is not None:
            model = verification.load_clean(folder, part.auto_class, self.device)
            result["loads_clean"] = True
        written = verification.read_written(folder)
        if set(written) != {t.name for t in part.written()}:
            raise ConvertError(f"{folder}: the written keys differ from the plan's")
        copies = as_saved(part, {t.name: self.sources.read(t.source) for t in part.tensors if t.source is not None})
        result["exact_tensors"] = verification.exact_copies(written, copies, str(folder))
        if part.auto_class is not None:
            result["merged_tensors"] = len(written) - result["exact_tensors"]
        if self.reference is not None:
            inputs, what = self.probe
            exported = verification.model_outputs(model, inputs)
            result.update(verification.compare_outputs(self.reference, exported, part.check_dtype, str(folder), what))
            result["probe"] = {name: list(t.shape) for name, t in inputs.items()}
        return result
