"""The full engine: the whole unmerged PEFT model in memory, PEFT's ``merge_and_unload``, one cast, one write.

It holds about three float32 copies of the model at its peak; in return verification runs the unmerged model and
the reloaded export end to end on the same input and compares their logits."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import checks, precision
from ..errors import ConvertError, preview
from ..merge import build_peft_model, merge_and_unload
from ..plan import PartPlan
from ..policy import cast_checked, settled_tie
from ..sources import Sources
from .base import Engine, Written
from .streams import write_tensors

log = logging.getLogger(__name__)


class FullEngine(Engine):
    name = "full"

    def write(self, part: PartPlan, folder: Path, verify: bool) -> FullWritten:
        reference = probe = None
        if part.lora is not None:
            state, reference, probe = self._merged_state(part, verify)
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
        hashes = write_tensors(folder, part, out)
        return FullWritten(part, hashes, precision, self.sources, self.device, reference, probe)

    def _precision(self, part: PartPlan, state: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """How much of each merged tensor's LoRA delta a 16-bit export keeps; the base values are read again from
        their source, one tensor at a time."""
        if part.lora is None:
            return {}
        layers = {layer.module: dict(layer.inputs) for layer in part.lora.layers}
        figures = {}
        for t in part.tensors:
            if t.merged_from is None or not precision.wanted(t.dtype):
                continue
            ref = layers[t.merged_from].get(f"base_layer.{t.name.removeprefix(t.merged_from + '.')}")
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

    def _merged_state(self, part: PartPlan, verify: bool) -> tuple[dict[str, torch.Tensor], Any, Any]:
        """Build the unmerged PEFT model in float32, load the sources, record reference logits, merge; return the
        plain state."""
        lora = part.lora
        model = build_peft_model(part.auto_class, part.config, lora.config, lora.adapter_name, self.device)
        params = model.state_dict()
        with torch.no_grad():
            for rel, ref in self._bar(part.inputs.items(), part.name):
                params[rel].copy_(self.sources.read(ref))
        del params
        reference = probe = None
        if verify and (found := checks.probe_inputs(part.auto_class, part.config)) is not None:
            probe = found
            reference = checks.model_outputs(model.get_base_model(), probe[0])
        state = dict(merge_and_unload(model, self.progress).state_dict())
        planned = {t.name for t in part.candidates}
        extra, missing = sorted(set(state) - planned), sorted(planned - set(state))
        if part.tie is not None and part.tie.configured and part.tie.head in extra:
            extra.remove(part.tie.head)  # the base ties lm_head to the embeddings; the checkpoint has no lm_head
            state.pop(part.tie.head)
        if extra or missing:
            raise ConvertError(
                f"{self._checkpoint_path(part)} ({part.name}): merge_and_unload gave other keys than planned: "
                f"extra {preview(extra, 3)}, missing {preview(missing, 3)}"
            )
        return state, reference, probe


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
            model = checks.load_clean(folder, part.auto_class, self.device)
            result["loads_clean"] = True
        written = checks.read_written(folder)
        if set(written) != {t.name for t in part.tensors}:
            raise ConvertError(f"{folder}: the written keys differ from the plan's")
        copies = {t.name: self.sources.read(t.source) for t in part.tensors if t.source is not None}
        result["exact_tensors"] = checks.exact_copies(written, copies, str(folder))
        if part.auto_class is not None:
            result["merged_tensors"] = len(written) - result["exact_tensors"]
        if self.reference is not None:
            inputs, what = self.probe
            exported = checks.model_outputs(model, inputs)
            result.update(checks.compare_outputs(self.reference, exported, part.check_dtype, str(folder), what))
            result["probe"] = {name: list(t.shape) for name, t in inputs.items()}
        return result
