"""DeepSpeed ZeRO checkpoint folders (stages 1, 2 and 3), as Lightning's DeepSpeedStrategy saves them.

    last.ckpt/latest                                      the tag ("checkpoint")
    last.ckpt/<tag>/mp_rank_00_model_states.pt            stages 1-2: module, shapes, Lightning's dict
    last.ckpt/<tag>/zero_pp_rank_<R>_mp_rank_00_model_states.pt   stage 3: one per rank
    last.ckpt/<tag>/[bf16_]zero_pp_rank_<R>_mp_rank_00_optim_states.pt   one per rank: the fp32 master partitions

Trainable parameters come from the fp32 masters the optimizer holds (``single_partition_of_fp32_groups`` for
stages 1-2, ``fp32_flat_groups`` for stage 3), stitched across ranks by the shapes and order the files record, as
DeepSpeed's own ``zero_to_fp32`` does; frozen parameters from the module states (stage 1), the frozen fragments
(stages 2-3: whole tensors, or one partition per rank), or, when the run excluded them, from the base model.
Every file is read by the restricted unpickler: DeepSpeed's own classes stay inert placeholders, deepspeed is
never imported, and the ``zero_to_fp32.py`` DeepSpeed copies into the folder is never run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, preview
from . import unpickle
from .pieces import PiecedSource, Pieces, slice_runs
from .pread import Span, SpanReader, numel
from .torchfile import read_torch_file, record_span, span_of

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
DEEPSPEED_CLASSES = ("deepspeed.",)  # LossScaler, ZeroStageEnum, fragment_address...: read as inert placeholders
WEIGHT_KEYS = {"module", "buffer_names", "param_shapes", "frozen_param_shapes", "frozen_param_fragments"}


def tag_folder(folder: Path) -> Path:
    """The folder of the tag ``latest`` names (or the only tag folder)."""
    latest = folder / "latest"
    if latest.is_file():
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{latest}: unreadable ({exc}); it should hold the checkpoint's tag") from exc
        if not tag or "/" in tag or tag in (".", ".."):
            raise ConvertError(f"{latest}: {tag!r} is not a tag name; it should name a folder beside it")
        if not (folder / tag).is_dir():
            raise ConvertError(
                f"{latest}: names the tag {tag!r}, but {folder / tag} is missing; copy the whole checkpoint folder"
            )
        return folder / tag
    tags = sorted(p.parent for p in folder.glob("*/*model_states.pt"))
    if len(set(tags)) != 1:
        raise ConvertError(f"{folder}: no 'latest' file and {len(set(tags))} tag folders; keep the one to convert")
    return tags[0]


def _ranked(folder: Path, pattern: re.Pattern[str], what: str) -> dict[int | None, Path]:
    found: dict[int | None, Path] = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m is None:
            continue
        if int(m.group("mp")) != 0:
            raise ConvertError(
                f"{path}: model-parallel rank {int(m.group('mp'))}; ckpt2hf converts ZeRO data parallelism only"
            )
        dp = int(m.group("dp")) if m.group("dp") is not None else None
        if dp in found:
            raise ConvertError(
                f"{folder}: two {what} files for rank {dp} ({found[dp].name}, {path.name}); the folder mixes "
                "checkpoints of different runs; copy one run's checkpoint whole"
            )
        found[dp] = path
    if not found:
        raise ConvertError(f"{folder}: no {what} files; the DeepSpeed checkpoint is incomplete")
    return found


def _placeholder_value(value: Any) -> Any:
    """An enum DeepSpeed pickled (e.g. ZeroStageEnum) as the value it was built from; plain values as they are."""
    if isinstance(value, unpickle.Placeholder):
        args = value.recorded_args
        return args[0] if args else None
    return value


def _read(path: Path) -> tuple[dict[str, Any], unpickle.Loaded]:
    obj, loaded = read_torch_file(path, expected=DEEPSPEED_CLASSES)
    if not isinstance(obj, Mapping) or loaded is None:
        raise ConvertError(f"{path}: not a DeepSpeed checkpoint file (expected a dict saved by torch.save)")
    return dict(obj), loaded


def _flat_span(tensor: Any, path: Path, loaded: unpickle.Loaded, what: str) -> Span:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        raise ConvertError(f"{path}: {what} is not a flat tensor; the file is damaged or not from DeepSpeed")
    span = span_of(tensor, path, loaded.records)
    if span is None:
        if tensor.numel() == 0:
            return Span(path, 0, tensor.dtype, (0,))
        raise ConvertError(f"{path}: {what} is not stored contiguously; the file is damaged")
    return span


class _Reader:
    """Reads one ZeRO checkpoint folder into a ``PiecedSource`` and the metadata a ``Checkpoint`` takes."""

    def __init__(self, folder: Path, reader: SpanReader) -> None:
        self.folder, self.reader = folder, reader
        self.tag = tag_folder(folder)
        self.model_files = _ranked(self.tag, MODEL_STATES, "*_model_states.pt")
        self.optim_files = _ranked(self.tag, OPTIM_STATES, "*_optim_states.pt")
        first = self.model_files.get(0, self.model_files.get(None))
        if first is None:
            raise ConvertError(f"{self.tag}: no model states of rank 0; copy the whole checkpoint folder")
        self.model0, self.loaded0 = _read(first)
        self.model0_path = first
        missing = sorted(WEIGHT_KEYS - {"frozen_param_shapes", "frozen_param_fragments"} - self.model0.keys())
        if missing or not isinstance(self.model0.get("module"), Mapping):
            raise ConvertError(f"{first}: not DeepSpeed model states (no {', '.join(missing) or 'module'})")

    def optim(self) -> tuple[int, int, list[tuple[Path, dict[str, Any], unpickle.Loaded]]]:
        """(stage, world size, per rank: file, optimizer_state_dict, loaded), checked for a complete set."""
        ranks = []
        for dp in sorted(r for r in self.optim_files if r is not None):
            path = self.optim_files[dp]
            obj, loaded = _read(path)
            state = obj.get("optimizer_state_dict")
            if not isinstance(state, Mapping):
                raise ConvertError(f"{path}: no optimizer_state_dict; not a ZeRO optimizer states file")
            ranks.append((dp, path, dict(state), loaded))
        if not ranks:
            raise ConvertError(f"{self.tag}: no zero_pp_rank_*_optim_states.pt files")
        stage = _placeholder_value(ranks[0][2].get("zero_stage"))
        if not isinstance(stage, int):
            stage = (self.model0.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
        if stage not in (1, 2, 3):
            raise ConvertError(f"{ranks[0][1]}: unknown ZeRO stage {stage!r}")
        stages = {path.name: _placeholder_value(state.get("zero_stage")) for _, path, state, _ in ranks}
        if len(set(stages.values())) > 1:
            shown = ", ".join(f"{name}: {value}" for name, value in stages.items())
            raise ConvertError(
                f"{self.tag}: the optimizer states were saved by different ZeRO stages ({shown}); the folder mixes "
                "checkpoints of different runs; copy one run's checkpoint whole"
            )
        counts = {}
        for _, path, state, _ in ranks:
            count = state.get("partition_count")
            count = max(count) if isinstance(count, (list, tuple)) and count else count
            if not isinstance(count, int) or count < 1:
                raise ConvertError(f"{path}: no partition_count; not a ZeRO optimizer states file")
            counts[path.name] = count
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise ConvertError(
                f"{self.tag}: the optimizer states were saved by different world sizes ({shown}); the folder mixes "
                "checkpoints of different runs; copy one run's checkpoint whole"
            )
        world = next(iter(counts.values()))
        have = [dp for dp, *_ in ranks]
        if have != list(range(world)):
            lost = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world) if r not in have]
            extra = [r for r in have if r >= world]
            what = f"missing {preview(lost, 3)}" if lost else f"ranks {extra} beyond the world size {world}"
            raise ConvertError(
                f"{self.tag}: a ZeRO checkpoint of {world} ranks, {what}; copy the whole checkpoint folder"
            )
        return stage, world, [(path, state, loaded) for _, path, state, loaded in ranks]

    def source(self) -> tuple[PiecedSource, dict[str, Any]]:
        stage, world, ranks = self.optim()
        model = self.model0
        module = model["module"]
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        groups = []  # per rank: the spans of its fp32 partitions, group by group
        for path, state, loaded in ranks:
            flat = state.get(key)
            if not isinstance(flat, (list, tuple)) or not flat:
                raise ConvertError(f"{path}: no {key}; not a ZeRO stage {stage} optimizer states file")
            groups.append([_flat_span(t, path, loaded, f"{key}[{g}]") for g, t in enumerate(flat)])
        param_shapes = model.get("param_shapes") or []
        if not isinstance(param_shapes, (list, tuple)) or len(param_shapes) != len(groups[0]):
            raise ConvertError(
                f"{self.model0_path}: param_shapes names {len(param_shapes)} parameter groups, the optimizer states "
                f"hold {len(groups[0])}; the files come from different runs"
            )
        shapes = [{str(k): tuple(v) for k, v in g.items()} for g in param_shapes]
        pieces: dict[str, Pieces] = {}
        origins: dict[str, str] = {}
        masters = f"fp32 masters (optimizer partitions of {world} ranks)"
        if stage == 3:
            _stage3_trainable(self.tag, shapes, groups, world, ranks[0][0], pieces)
        else:
            paddings = ranks[0][1].get("param_alignment_paddings")
            _stage12_trainable(self.tag, shapes, groups, world, paddings, pieces)
        origins.update(dict.fromkeys(pieces, masters))
        spans: dict[str, Span] = {}
        tensors: dict[str, torch.Tensor] = {}
        frozen_shapes = model.get("frozen_param_shapes")
        fragments = model.get("frozen_param_fragments")
        if stage == 3 and frozen_shapes:
            self._stage3_frozen(frozen_shapes, world, pieces, origins)
        elif frozen_shapes:  # stage 2: whole tensors
            for name, shape in frozen_shapes.items():
                tensor = (fragments or {}).get(name)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
                    raise ConvertError(f"{self.model0_path}: the frozen fragment of {name} is missing or misshapen")
                tensors[str(name)] = tensor
                origins[str(name)] = "frozen parameter (model states)"
        buffer_names = set(model.get("buffer_names") or [])
        order = []
        for name, tensor in module.items():
            name = str(name)
            order.append(name)
            if name in pieces or name in tensors:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ConvertError(f"{self.model0_path}: module entry {name!r} is not a tensor")
            if stage == 3 and name not in buffer_names:
                continue  # a partitioned placeholder; resolved as a shared parameter below, or reported
            tensors[name] = tensor
            origins[name] = "buffer (model states)" if name in buffer_names else "module states"
        frozen_excluded = (stage >= 2 and frozen_shapes is None) or (
            stage == 1 and set(order) <= {*pieces, *buffer_names, *map(str, model.get("shared_params") or {})}
        )
        for alias, target in (model.get("shared_params") or {}).items():
            alias, target = str(alias), str(target)
            if target in pieces:
                pieces[alias] = pieces[target]
            elif target in tensors:
                tensors[alias] = tensors[target]
            elif frozen_excluded and alias in order:
                order.remove(alias)  # shares an excluded frozen parameter: it comes from the base model too
                continue
            origins[alias] = f"shared with {target}"
        unresolved = [k for k in order if k not in pieces and k not in tensors]
        if unresolved:
            raise ConvertError(
                f"{self.model0_path}: no data for {len(unresolved)} parameters ({preview(unresolved, 3)}); the "
                "checkpoint is incomplete"
            )
        order += [k for k in (*pieces, *tensors) if k not in set(order)]
        path, records = self.model0_path, self.loaded0.records
        spans = {k: s for k, t in tensors.items() if (s := span_of(t, path, records)) is not None}
        whole = {k: s for k, t in tensors.items() if k not in spans and (s := record_span(t, path, records))}
        source = PiecedSource(self.folder, self.reader, spans, pieces, order, origins, tensors, whole)
        layout = {
            "format": "deepspeed",
            "stage": stage,
            "ranks": world,
            "tag": self.tag.name,
            "files": sorted(p.name for p in self.tag.iterdir() if p.is_file()),
            "trainable_from": masters,
            "master_dtype": str(groups[0][0].dtype).removeprefix("torch."),
            "module_dtypes": sorted(
                {
                    str(t.dtype).removeprefix("torch.")
                    for t in module.values()
                    if isinstance(t, torch.Tensor) and t.numel()
                }
            ),
            "frozen_from": (
                "excluded from the checkpoint (exclude_frozen_parameters): taken from the base model"
                if frozen_excluded
                else "module states"
                if stage == 1
                else f"frozen fragments ({'one partition per rank' if stage == 3 else 'whole tensors'})"
            ),
            "frozen_excluded": frozen_excluded,
        }
        return source, layout

    def _stage3_frozen(self, frozen_shapes, world, pieces, origins) -> None:
        """Stage 3 frozen parameters: one partition per rank in each rank's model states."""
        ranks = sorted(r for r in self.model_files if r is not None)
        if ranks != list(range(world)):
            lost = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world) if r not in ranks]
            raise ConvertError(
                f"{self.tag}: a ZeRO-3 checkpoint of {world} ranks, missing {preview(lost, 3)}; copy the whole "
                "checkpoint folder"
            )
        per_rank = []
        for r in ranks:
            path = self.model_files[r]
            obj, loaded = (self.model0, self.loaded0) if r == 0 else _read(path)
            fragments = obj.get("frozen_param_fragments") or {}
            if set(map(str, fragments)) != set(map(str, frozen_shapes)):
                raise ConvertError(
                    f"{path}: its frozen parameters differ from rank 0's; the files come from different runs"
                )
            per_rank.append(
                {
                    str(k): _flat_span(v.reshape(-1) if v.dim() != 1 else v, path, loaded, f"fragment {k}")
                    for k, v in fragments.items()
                }
            )
        for name, shape in frozen_shapes.items():
            name, shape = str(name), tuple(shape)
            runs = tuple(per_rank[r][name] for r in range(world))
            pieces[name] = Pieces(runs[0].dtype, shape, runs)
            origins[name] = f"frozen fragments ({world} ranks)"


def _stage12_trainable(tag: Path, shapes, groups, world, paddings, pieces) -> None:
    """Stages 1-2: a group's partitions, concatenated in rank order, hold its parameters one after another."""
    for g, group_shapes in enumerate(shapes):
        runs = [groups[r][g] for r in range(world)]
        sizes = {run.shape[0] for run in runs}
        if len(sizes) > 1:
            raise ConvertError(
                f"{tag}: the ranks' partitions of parameter group {g} differ in size ({sorted(sizes)}); the "
                "files come from different runs"
            )
        offset, available = 0, sum(run.shape[0] for run in runs)
        pads = paddings[g] if isinstance(paddings, (list, tuple)) and g < len(paddings) else None
        for i, (name, shape) in enumerate(group_shapes.items()):
            n = numel(shape)
            pieces[name] = Pieces(runs[0].dtype, shape, slice_runs(runs, offset, n))
            offset += n + (int(pads[i]) if pads is not None and i < len(pads) else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x world size (as zero_to_fp32 checks)
        if math.ceil(offset / align) * align != math.ceil(available / align) * align:
            raise ConvertError(
                f"{tag}: parameter group {g} needs {offset} elements, the partitions hold {available}; the "
                "files come from different runs or another model"
            )


def _stage3_trainable(tag: Path, shapes, groups, world, path, pieces) -> None:
    """Stage 3: every parameter is split across the ranks, ceil(numel / world) elements each (the last padded),
    laid out parameter after parameter in each rank's groups."""
    merged = {name: shape for group in shapes for name, shape in group.items()}
    offset = 0
    per_rank = [sum(run.shape[0] for run in rank) for rank in groups]
    if len(set(per_rank)) > 1:
        raise ConvertError(
            f"{tag}: the ranks hold partitions of different sizes ({per_rank}); the files come from different runs"
        )
    for name, shape in merged.items():
        part = math.ceil(numel(shape) / world)
        runs = [run for r in range(world) for run in slice_runs(groups[r], offset, part)]
        pieces[name] = Pieces(groups[0][0].dtype, shape, tuple(runs))
        offset += part
    if offset != per_rank[0]:
        raise ConvertError(
            f"{path}: the parameters need {offset} elements per rank, the partitions hold {per_rank[0]}; the "
            "files come from different runs or another model"
        )


def client_state(folder: Path) -> dict[str, Any]:
    """Lightning's checkpoint dict that DeepSpeed stored beside the rank-0 model states (weights not read)."""
    tag = tag_folder(folder)
    files = _ranked(tag, MODEL_STATES, "*_model_states.pt")
    first = files.get(0, files.get(None))
    if first is None:
        return {}
    model, _ = _read(first)
    return {k: v for k, v in model.items() if k not in WEIGHT_KEYS}


def open_deepspeed(folder: Path, reader: SpanReader) -> tuple[PiecedSource, dict[str, Any], dict[str, Any]]:
    """(source, Lightning's dict (the client state), layout facts for inspect) of a ZeRO checkpoint folder."""
    ds = _Reader(folder, reader)
    source, layout = ds.source()
    client = {k: v for k, v in ds.model0.items() if k not in WEIGHT_KEYS}
    return source, client, layout
