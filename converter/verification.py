"""After writing: that each folder loads cleanly and matches its sources. One place decides what is verified and
against which tolerance: a clean reload (``load_clean``), outputs against the unmerged model's (``compare_outputs``,
the tolerance of ``policy``), copies bit for bit (``exact_copies``). The engines call these from their
``Written.verify``; the streaming engine's per-unit output check uses the same tolerance."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .errors import ConvertError, preview
from .names import WEIGHTS, WEIGHTS_INDEX
from .policy import tolerance
from .tasks import TASK_CLASSES

log = logging.getLogger(__name__)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _capture_transformers_warnings():
    logger = logging.getLogger("transformers")
    handler = _Capture()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def load_clean(folder: Path, auto_class: str, device: torch.device, device_map: str | None = None) -> nn.Module:
    """``from_pretrained(output_loading_info=True)`` in float32; any missing, unexpected or mismatched key, or a
    printed load report, is a ConvertError. ``device_map="meta"`` checks names and shapes without reading data.
    Never with the hub's kernels (transformers 5.25 turns them on by default): the check is of the weights, and
    replacing layers by code fetched from the hub has no place in it."""
    import transformers

    cls = getattr(transformers, auto_class)
    # On the meta device transformers would still read every tensor from the files (and then drop it): 16 GB for an
    # 8B export. Given the files' headers as empty tensors instead, it checks the same names and shapes.
    source: dict[str, Any] = {"pretrained_model_name_or_path": folder}
    if device_map == "meta":
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        source = {"pretrained_model_name_or_path": None, "config": config, "state_dict": headers_on_meta(folder)}
        if hasattr(cls, "_model_mapping"):  # an auto class: from a state dict, only the class it maps to loads
            if type(config) not in cls._model_mapping:
                raise ConvertError(f"{folder}: {auto_class} has no model for a {config.model_type} config")
            cls = cls._model_mapping[type(config)]
    with _capture_transformers_warnings() as warned:
        # ignore_mismatched_sizes: a mis-shaped tensor is listed in mismatched_keys (and refused below), not raised
        model, info = cls.from_pretrained(
            **source, dtype=torch.float32, output_loading_info=True, device_map=device_map, local_files_only=True,
            use_kernels=False, ignore_mismatched_sizes=True,
        )  # fmt: skip
    problems = {
        k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    reports = [m for m in warned if "LOAD REPORT" in m]
    if problems or reports:
        detail = "; ".join(f"{k}: {preview([str(x) for x in v], 3)}" for k, v in problems.items()) or "a load report"
        raise ConvertError(f"{folder}: {auto_class}.from_pretrained does not load the export cleanly ({detail})")
    return model.eval() if device_map == "meta" else model.to(device).eval()


def compare_outputs(
    reference: torch.Tensor, exported: torch.Tensor, dtype: torch.dtype, where: str, what: str = "logit"
) -> dict[str, Any]:
    """Max abs difference between the unmerged model's outputs (``what``: logits, hidden states) and the export's,
    against the dtype's tolerance relative to max(1, max |reference output|); over tolerance is an error."""
    diff = float((reference.float() - exported.float()).abs().max())
    tol = tolerance(dtype) * max(1.0, float(reference.abs().max()))
    if not diff <= tol:  # also catches NaN
        raise ConvertError(
            f"{where}: the export's {what.replace('_', ' ')}s differ from the unmerged model's by {diff:.3g} "
            f"(tolerance {tol:.3g} for {str(dtype).removeprefix('torch.')}); the merge is wrong, report this with "
            "--debug output"
        )
    return {f"max_abs_{what}_diff": diff, "tolerance": tol, f"max_abs_{what}": float(reference.abs().max())}


def probe_inputs(auto_class: str, config: Any, seed: int = 1234) -> tuple[dict[str, torch.Tensor], str] | None:
    """A random input for a part's model and what its output is: token ids for a causal LM, pixel values for a
    vision model whose forward needs nothing else; None for a model that needs more (no end-to-end check)."""
    generator = torch.Generator().manual_seed(seed)
    if auto_class in TASK_CLASSES.values() and auto_class != "AutoModel":  # a text model with a task head
        vocab = config.get_text_config().vocab_size
        inputs = {"input_ids": torch.randint(0, vocab, (2, 16), generator=generator)}
        if auto_class == "AutoModelForSeq2SeqLM":
            inputs["decoder_input_ids"] = torch.randint(0, vocab, (2, 8), generator=generator)
        return inputs, "logit"
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
    if isinstance(size, int):
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}, "hidden_state"
    return None


@torch.no_grad()
def model_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The model's logits or last hidden state on ``inputs`` (float32, CPU); None when its forward needs more."""
    required = [
        name
        for name, p in inspect.signature(model.forward).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if set(required) - set(inputs):
        return None
    device = next(model.parameters()).device
    dtype = model.dtype
    out = model(**{k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()})
    if getattr(out, "logits", None) is not None:
        result = out.logits
    elif getattr(out, "start_logits", None) is not None:  # question answering: the span's two ends
        result = torch.stack([out.start_logits, out.end_logits])
    else:
        result = out.last_hidden_state
    return result.float().cpu()


def written_files(folder: Path) -> list[str]:
    """The safetensors files of an export folder: the shards its index names, else model.safetensors."""
    index = folder / WEIGHTS_INDEX
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]


def headers_on_meta(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export folder as an empty tensor on the meta device, of the dtype and shape its file's
    header gives (and the index, if any, naming each tensor's file); no tensor data is read."""
    from .sources.safetensors import safetensors_spans

    found, where = {}, {}
    for name in written_files(folder):
        for key, span in safetensors_spans(folder / name).items():
            found[key] = torch.empty(span.shape, dtype=span.dtype, device="meta")
            where[key] = name
    index = folder / WEIGHTS_INDEX
    if index.exists() and json.loads(index.read_text())["weight_map"] != where:
        raise ConvertError(f"{index}: its weight_map does not say which file holds each tensor; the export is broken")
    return found


def read_written(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export folder (single file or index + shards), keyed by name."""
    tensors = {}
    for name in written_files(folder):
        with safe_open(folder / name, framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


def exact_copies(written: Mapping[str, torch.Tensor], sources: Mapping[str, torch.Tensor], where: str) -> int:
    """Every written tensor named in ``sources`` must equal its source cast to the written dtype, bit for bit."""
    wrong = [k for k, src in sources.items() if not torch.equal(written[k], src.to(written[k].dtype))]
    if wrong:
        raise ConvertError(f"{where}: {len(wrong)} tensors were not copied exactly: {preview(sorted(wrong), 3)}")
    return len(sources)
