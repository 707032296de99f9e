"""One merge unit at a time, for the streaming engine: materialised in float32 on the merge device from a PEFT
model that otherwise lives on the meta device, merged by PEFT (``peft.merge_unit``: the call merge_and_unload
makes), checked, cast, and released again, so that memory follows the size of one adapted module."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .. import policy, precision, timings
from ..peft import MergeUnit, merge_unit, release
from ..plan import PartPlan
from ..sources import Sources


def _probe_input(base: torch.nn.Module, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A random input for a unit's wrapped module (Linear, Conv1D, Embedding)."""
    if isinstance(base, torch.nn.Embedding):
        return torch.randint(0, base.num_embeddings, (8,), generator=generator).to(device)
    weight = base.weight
    fan_in = weight.shape[0] if type(base).__name__ == "Conv1D" else weight.shape[1]
    return torch.randn(8, fan_in, generator=generator).to(device)


class UnitMerger:
    """Merges a part's units one at a time; records the per-unit output checks, the precision figures and the units
    that changed nothing."""

    def __init__(self, part: PartPlan, sources: Sources, device: torch.device, verify: bool) -> None:
        self.part, self.sources, self.device, self.verify = part, sources, device, verify
        adapter = part.adapter
        self.adapter = adapter
        self.peft = copy.deepcopy(adapter.meta_model)  # its own copy: PEFT records on each layer that it merged
        self.units = {u.module: u for u in adapter.units}
        self.generator = torch.Generator().manual_seed(1234)
        self.layer_checks: list[float] = []
        self.unprobed = 0  # units whose module has no forward to probe on its own (fused experts)
        self.precision: dict[str, dict[str, float]] = {}
        self.idle: list[str] = []

    def read(self, unit: MergeUnit) -> dict[str, torch.Tensor]:
        """The source tensors of one unit, each in a buffer of its own. Runs on the read thread.

        The merge adds into the wrapped module's weights in place. Where a weight is materialised in its own buffer
        (float32 on the CPU), its checksum is checked as it is read (on the reading threads), before the merge
        changes it; elsewhere the merge works on a copy (on the GPU, or in float32), and the checksum is checked on
        the CRC-32 threads meanwhile, off the read thread (on the H200 machine an 8B conversion waited 6.3 s for
        reads checked as they were read, 0.6 s otherwise); ``Sources.wait`` collects the verdicts before anything
        is committed, and a corrupt source is reported before what it caused."""
        return {name: self.sources.read(ref, writable=self._in_place(ref), pooled=True) for name, ref in unit.inputs}

    def _in_place(self, ref: Any) -> bool:
        """Whether the merge changes the very buffer ``ref`` is read into (``_materialise`` keeps it as it is)."""
        return self.device.type == "cpu" and self.sources.info(ref).dtype == torch.float32

    def _materialise(self, unit: MergeUnit, inputs: dict[str, torch.Tensor]) -> torch.nn.Module:
        module = self.peft.get_submodule(unit.path)
        # The stored bytes to the merge device, then float32 there (a 100 MB bfloat16 layer on the H200 machine:
        # 13.6 ms, against 14.5 ms for one ``to(device, float32)``).
        state = {name: t.to(self.device, non_blocking=True).to(torch.float32) for name, t in inputs.items()}
        module.load_state_dict(state, assign=True, strict=True)
        # What PEFT created without saving it (a projection from a PRNG seed) is on the CPU: with the unit.
        module.to(self.device)
        return module

    def merge(
        self,
        unit: MergeUnit,
        inputs: dict[str, torch.Tensor],
        dtypes: dict[str, torch.dtype],
        keep: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Materialise, merge with PEFT, check and cast one unit; return its outputs (plain key -> tensor in the
        output dtype) and, into ``keep``, their float32 values before the cast."""
        with timings.timed("merging"):
            return self._merge(unit, inputs, dtypes, keep)

    def _merge(
        self,
        unit: MergeUnit,
        inputs: dict[str, torch.Tensor],
        dtypes: dict[str, torch.dtype],
        keep: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        module = self._materialise(unit, inputs)
        if self.device.type == "cuda":
            # The source buffers are copied to the GPU: back to the pool now, for the next unit's reads.
            torch.cuda.current_stream(self.device).synchronize()
            for tensor in inputs.values():
                self.sources.release(tensor)
            inputs = {}
        base = module.get_base_layer()
        where = self.sources.path(unit.inputs[0][1])
        outputs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            params = dict(base.named_parameters(recurse=False))
            sampled = policy.sample(params)
            probe = reference = None
            if self.verify and unit.probe:
                probe = _probe_input(base, self.device, self.generator)
                reference = module(probe)
            elif self.verify:
                self.unprobed += 1
            before = {
                n: p.detach().clone() for n, p in params.items() if precision.wanted(dtypes[f"{unit.module}.{n}"])
            }
            merge_unit(module, self.adapter.adapter_name, self.adapter.config, str(where))
            base = module.get_base_layer()  # a tuner may merge by swapping in another module (LN tuning)
            params = dict(base.named_parameters(recurse=False))
            if not policy.changed(params, sampled) and self._unchanged(unit, params):
                self.idle.append(unit.module)
            for pname, param in params.items():
                key = f"{unit.module}.{pname}"
                if keep is not None:
                    keep[key] = param.detach().to("cpu", copy=True)
                if pname in before and (found := precision.measure(before.pop(pname), param, dtypes[key])):
                    self.precision[key] = found
                outputs[key] = policy.cast_checked(key, param.detach(), dtypes[key], where)
            if probe is not None:
                self._check_output(unit, module, base, probe, reference, outputs)
        release(module)
        # A source buffer merged in place and written as it is belongs to the writer now; the others go back now.
        written = {t.untyped_storage().data_ptr() for t in outputs.values()}
        for tensor in inputs.values():
            if tensor.untyped_storage().data_ptr() not in written:
                self.sources.release(tensor)
        return outputs

    def _unchanged(self, unit: MergeUnit, params: dict[str, torch.Tensor]) -> bool:
        """The exact check behind a sample that found no change: the parameters against their sources, read again."""
        originals = {}
        for name in params:
            ref = unit.base_input(name)
            if ref is None:
                return False
            originals[name] = self.sources.read(ref)
        return policy.unchanged(params, originals)

    def _check_output(self, unit: MergeUnit, module: Any, base: Any, probe: Any, reference: Any, outputs: dict) -> None:
        """The merged module, with the weights as written, against the unmerged layer on the same input."""
        base.weight.data = outputs[f"{unit.module}.weight"].to(torch.float32)
        if getattr(base, "bias", None) is not None and f"{unit.module}.bias" in outputs:
            base.bias.data = outputs[f"{unit.module}.bias"].to(torch.float32)
        got = module(probe)  # merged: the base module alone, with the weights as written
        diff = float((got - reference).abs().max()) / max(1.0, float(reference.abs().max()))
        self.layer_checks.append(diff)
