"""The export's parts: one class per component kind, dispatched through ``PART_KINDS``.

Each part is prepared first (keys mapped, configs found, tensors planned; nothing computed or written), so that
``--dry-run`` and the real conversion share one plan. ``write`` then produces the part's folder and ``verify``
checks it against the source.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import verify as checks
from .config import Component
from .errors import ConvertError, preview
from .keymap import WRITTEN, PeftLayout, detect_peft_layout, is_peft_wrapped, plain_keys
from .lazy import Span, SpanReader, chunked_equal, stored_crc
from .merge import (
    AdapterFacts,
    adapter_keys_as_checkpoint,
    build_peft_model,
    compare_sources,
    load_exactly,
    lora_config_from,
    merge,
)
from .reader import AdapterFolder, find_adapter_folder, read_adapter_folder
from .verify import check_finite
from .writer import copy_support_files, write_hf_weights, write_module_file

log = logging.getLogger(__name__)

TIED = "lm_head tied to the input embeddings (identical values)"


@dataclasses.dataclass
class Context:
    """What every part needs to know about the conversion."""

    hparams: dict[str, Any]
    checkpoint_path: Path
    adapter_root: Path | None
    bases: dict[str, Path]
    lora_from: str
    dtype: str
    device: torch.device
    max_shard_size: str | int
    progress: bool
    run: Path
    spans: dict[str, Span]  # checkpoint key -> where its bytes are
    reader: SpanReader  # chunked reads with CRC-32 checks, shared by the whole conversion


def parse_dtype(name: str) -> torch.dtype | None:
    """``auto`` (None) or a floating dtype name such as ``bfloat16``."""
    if name == "auto":
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConvertError(f"--dtype {name}: not a floating dtype; use auto, float32, bfloat16 or float16")
    return dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class Part:
    """A component of the export. Subclasses fill ``plain`` (written key -> tensor source) in ``__init__``."""

    def __init__(self, comp: Component, keys: dict[str, str], tensors: Any, ctx: Context) -> None:
        self.comp, self.keys, self.source, self.ctx = comp, keys, tensors, ctx
        self.fate: dict[str, list[str]] = {WRITTEN: list(keys)}  # disposition -> component-relative keys
        self.verification: dict[str, Any] = {}
        self.info: dict[str, Any] = {}

    # The tensors as written: key -> source tensor (before the dtype cast), known before any merge.
    def planned(self) -> dict[str, torch.Tensor]:
        return {rel: self.source[src] for rel, src in self.keys.items()}

    def out_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.ctx.dtype)

    def files(self) -> list[str]:
        return ["model.safetensors"]

    def plan(self) -> dict[str, Any]:
        planned = self.planned()
        dtype = self.out_dtype()
        out = [dtype if dtype is not None and t.is_floating_point() else t.dtype for t in planned.values()]
        dtypes = Counter(str(d).removeprefix("torch.") for d in out)
        size = sum(t.numel() * d.itemsize for t, d in zip(planned.values(), out, strict=True))
        return {
            "component": self.comp.name,
            "kind": self.comp.kind,
            "out": self.comp.out or ".",
            "files": self.files(),
            "tensors": len(planned),
            "dtypes": dict(dtypes),
            "bytes": size,
        }

    def write(self, folder: Path, reference: bool, engine: str = "full") -> None:
        """Write the part's files into ``folder`` with ``engine`` ("full" or "streaming"); ``reference``: record
        what ``verify`` compares against."""
        raise NotImplementedError

    def verify(self, folder: Path) -> None:
        """Check the written folder against the source; fill ``self.verification``; raise ConvertError."""
        raise NotImplementedError

    def accounting(self) -> dict[str, int]:
        return {reason: len(keys) for reason, keys in self.fate.items() if keys}


class StateDictPart(Part):
    """A custom module (resampler, projector): its state_dict in one safetensors file, copied exactly."""

    def write(self, folder: Path, reference: bool, engine: str = "full") -> None:
        dtype = self.out_dtype()
        tensors = {
            k: check_finite(k, t, _cast(t, dtype) if dtype else t, self.ctx.checkpoint_path)
            for k, t in self.planned().items()
        }
        write_module_file(folder / "model.safetensors", tensors)

    def verify(self, folder: Path) -> None:
        written = checks.read_written(folder)
        if set(written) != set(self.keys):
            raise ConvertError(f"{folder}: written keys differ from the source's")
        self.verification = {"exact_tensors": checks.exact_copies(written, self.planned(), str(folder))}


def resolve_base(comp: Component, ctx: Context) -> tuple[Path, str]:
    """The folder holding the component's config: ``--base NAME=PATH``, else a hyper_parameters entry that is a
    local folder or a hub id present in the local Hugging Face cache (offline)."""
    if comp.name in ctx.bases:
        path = ctx.bases[comp.name]
        if not (path / "config.json").is_file():
            raise ConvertError(f"{path}: no config.json here (given with --base {comp.name}=...)")
        return path, f"--base {comp.name}"
    tried = []
    for hp in comp.base:
        value = ctx.hparams.get(hp)
        if not isinstance(value, str) or not value:
            continue
        tried.append(f"{hp}={value!r}")
        local = Path(value).expanduser()
        if not local.is_absolute() and not local.exists():
            local = ctx.run / value
        if (local / "config.json").is_file():
            return local, f"hyper_parameters.{hp}"
        cached = _hub_cache_snapshot(value)
        if cached is not None:
            return cached, f"hyper_parameters.{hp} (Hugging Face cache)"
    said = (
        f"hyper_parameters give {', '.join(tried)}, neither a local folder nor in the Hugging Face cache"
        if tried
        else f"hyper_parameters have no {' or '.join(comp.base) or 'base entry'}"
    )
    raise ConvertError(
        f"{ctx.checkpoint_path}: no config for {comp.name}: {said}; "
        f"pass --base {comp.name}=PATH (a folder with config.json)"
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


class HFPart(Part):
    """A Hugging Face model folder; PEFT-wrapped keys are merged with PEFT's merge_and_unload."""

    auto_class = "AutoModel"

    def __init__(self, comp: Component, keys: dict[str, str], tensors: Any, ctx: Context) -> None:
        super().__init__(comp, keys, tensors, ctx)
        from transformers import AutoConfig

        self.base_dir, self.base_from = resolve_base(comp, ctx)
        try:
            self.hf_config = AutoConfig.from_pretrained(self.base_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConvertError(f"{self.base_dir / 'config.json'}: not a usable model config ({exc})") from exc
        self.layout: PeftLayout | None = None
        self.adapter: AdapterFolder | None = None
        self.adapter_facts: AdapterFacts | None = None
        self.replaced: dict[str, str] = {}  # component key -> adapter folder key (--lora-from adapter)
        if is_peft_wrapped(keys):
            if self.auto_class != "AutoModelForCausalLM":
                raise ConvertError(
                    f"{ctx.checkpoint_path}: {comp.name} is PEFT-wrapped, but LoRA is merged only in "
                    f"hf_causal_lm components; change its kind in the config"
                )
            self._prepare_peft()
        else:
            self.plain = {rel: rel for rel in keys}
        self._fit_vocab()
        self.tie = self._decide_tie()
        self._check_fit()

    # --- preparation -------------------------------------------------------------------------------------
    def _prepare_peft(self) -> None:
        where = f"{self.ctx.checkpoint_path} ({self.comp.name})"
        self.layout = layout = detect_peft_layout(self.keys, where)
        folder = find_adapter_folder(self.ctx.adapter_root, layout.adapter_name) if self.ctx.adapter_root else None
        self.adapter = read_adapter_folder(folder) if folder else None
        lora_config, config_from = lora_config_from(layout, self.adapter, self.ctx.hparams, where)
        self.lora_config = lora_config
        tensors_from = "checkpoint"
        compared = None
        rel_tensors = {rel: self.source[src] for rel, src in self.keys.items()}
        if self.adapter is not None:
            rel_spans = {rel: self.ctx.spans[src] for rel, src in self.keys.items() if src in self.ctx.spans}
            cmp = compare_sources(rel_tensors, self.adapter, layout.adapter_name, rel_spans, self.ctx.reader)
            compared = cmp.as_dict()
            if cmp.reshaped and self.ctx.lora_from != "checkpoint":
                raise ConvertError(
                    f"{self.adapter.weights_path} does not fit the model in {self.ctx.checkpoint_path}: "
                    f"{len(cmp.reshaped)} tensors have other shapes ({preview(cmp.reshaped, 2)}); the adapter was "
                    "trained for another base model; use --lora-from checkpoint or the run's own adapter folder"
                )
            if not cmp.equal and self.ctx.lora_from == "auto":
                what = []
                if cmp.differing:
                    what.append(
                        f"{len(cmp.differing)} of {cmp.keys} tensors differ, max abs diff {cmp.max_abs_diff:.3g}"
                    )
                if cmp.only_checkpoint or cmp.only_adapter:
                    what.append(
                        f"{len(cmp.only_checkpoint)} keys only in the checkpoint, "
                        f"{len(cmp.only_adapter)} only in the adapter folder"
                    )
                raise ConvertError(
                    f"{self.adapter.weights_path} and {self.ctx.checkpoint_path} hold different LoRA weights "
                    f"({'; '.join(what)}); the adapter folder was probably saved at another step; choose one with "
                    "--lora-from checkpoint or --lora-from adapter"
                )
            if self.ctx.lora_from == "adapter":
                self.replaced = adapter_keys_as_checkpoint(list(self.keys), self.adapter, layout.adapter_name)
                tensors_from = "adapter"
            log.info(
                "LoRA sources: checkpoint and %s %s",
                self.adapter.weights_path,
                "agree" if cmp.equal else f"differ; using the {tensors_from}",
            )
        elif self.ctx.lora_from == "adapter":
            raise ConvertError(f"{self.ctx.run}: --lora-from adapter, but there is no adapter folder (lora_weights/)")
        self.adapter_facts = AdapterFacts(
            name=layout.adapter_name,
            r=lora_config.r,
            alpha=lora_config.lora_alpha,
            target_modules=sorted(lora_config.target_modules)
            if not isinstance(lora_config.target_modules, str)
            else [lora_config.target_modules],
            modules_to_save=sorted(lora_config.modules_to_save or []),
            use_rslora=bool(lora_config.use_rslora),
            use_dora=bool(lora_config.use_dora),
            config_from=config_from,
            tensors_from=tensors_from,
            lora_pairs=len(layout.lora_modules),
            sources_compared=compared,
        )
        self.plain, self.fate = plain_keys(self.keys, layout.adapter_name)

    def _meta_model(self) -> Any:
        import transformers

        with torch.device("meta"):
            return getattr(transformers, self.auto_class).from_config(self.hf_config)

    def _embedding_keys(self) -> tuple[str | None, str | None]:
        model = self._meta_model()
        names = {id(m): n for n, m in model.named_modules()}
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        key = lambda m: f"{names[id(m)]}.weight" if m is not None and id(m) in names else None  # noqa: E731
        return key(inp), key(out)

    def _tensor(self, plain: str) -> torch.Tensor:
        rel = self.plain[plain]
        return self.source_tensor(rel)

    def source_tensor(self, rel: str) -> torch.Tensor:
        """The tensor for a component key: the checkpoint's, or the adapter folder's with --lora-from adapter."""
        return self.adapter.tensors[self.replaced[rel]] if rel in self.replaced else self.source[self.keys[rel]]

    def source_span(self, rel: str) -> Span | None:
        """Where a component key's bytes are on disk, if known (for reading in bounded chunks)."""
        if rel in self.replaced:
            return self.adapter.spans.get(self.replaced[rel])
        return self.ctx.spans.get(self.keys[rel])

    def _fit_vocab(self) -> None:
        self.embed_key, self.head_key = self._embedding_keys()
        text_config = self.hf_config.get_text_config()
        if self.embed_key in self.plain and hasattr(text_config, "vocab_size"):
            rows = self._tensor(self.embed_key).shape[0]
            if rows != text_config.vocab_size:
                log.warning(
                    "%s: the checkpoint's embeddings have %d rows, the base config says vocab_size %d; "
                    "writing vocab_size %d",
                    self.comp.name,
                    rows,
                    text_config.vocab_size,
                    rows,
                )
                text_config.vocab_size = rows
                self.info["vocab_size_changed"] = rows

    def _check_fit(self) -> None:
        """The tensors to write must be exactly those of the model the config builds, with the same shapes."""
        expected = {k: tuple(t.shape) for k, t in self._meta_model().state_dict().items()}
        planned = self.planned()
        missing = sorted(set(expected) - set(planned) - ({self.head_key} if self.tie else set()))
        unexpected = sorted(set(planned) - set(expected))
        wrong = [
            f"{k} {tuple(planned[k].shape)} vs {expected[k]}"
            for k in sorted(set(planned) & set(expected))
            if tuple(planned[k].shape) != expected[k]
        ]
        if not (missing or unexpected or wrong):
            return
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} tensors have other shapes than the config gives ({preview(wrong, 2)})")
        if missing:
            problems.append(f"{len(missing)} tensors of the model are not in the checkpoint ({preview(missing, 3)})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} checkpoint tensors have no place in the model ({preview(unexpected, 3)})"
            )
        raise ConvertError(
            f"{self.ctx.checkpoint_path} ({self.comp.name}) does not fit {self.base_dir / 'config.json'}: "
            f"{'; '.join(problems)}; pass --base {self.comp.name}=PATH with the config the model was trained with"
        )

    def _tied_config(self) -> bool:
        return bool(getattr(self.hf_config.get_text_config(decoder=True), "tie_word_embeddings", False))

    def _decide_tie(self) -> bool:
        """Keep tie_word_embeddings only when lm_head equals the input embeddings; a trained head is kept."""
        if not self._tied_config() or self.head_key is None:
            return False
        if self.head_key not in self.plain:
            return True
        lora_on = {m + ".weight" for m in (self.layout.lora_modules if self.layout else ())}
        if self.head_key in lora_on or self.embed_key in lora_on:
            return True  # decided after the merge, see _settle_tie
        head, embed = self._tensor(self.head_key), self._tensor(self.embed_key)
        spans = self.source_span(self.plain[self.head_key]), self.source_span(self.plain[self.embed_key])
        if None not in spans:
            crcs = {stored_crc(span) for span in spans}
            # Different stored CRC-32s mean different bytes: no need to read 2 x vocab x hidden values. (Only +0.0
            # against -0.0 could differ in bytes and not in value; keeping both then is merely redundant.)
            differ = None not in crcs and len(crcs) == 2 and spans[0].dtype == spans[1].dtype
            same = not differ and chunked_equal(self.ctx.reader, *spans)[0]
        else:
            same = head.shape == embed.shape and torch.equal(head, embed)
        if same:
            return True
        log.warning(
            "%s: the trained lm_head differs from embed_tokens; writing tie_word_embeddings false and keeping both",
            self.comp.name,
        )
        return False

    def out_dtype(self) -> torch.dtype | None:
        explicit = parse_dtype(self.ctx.dtype)
        if explicit is not None:
            return explicit
        dtype = getattr(self.hf_config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else None

    def planned(self) -> dict[str, torch.Tensor]:
        return {k: self._tensor(k) for k in self.plain if not (self.tie and k == self.head_key)}

    def files(self) -> list[str]:
        names = ["config.json", "model.safetensors (or shards + index)"]
        from .writer import SUPPORT_FILES

        return names + [n for n in SUPPORT_FILES if (self.base_dir / n).is_file()]

    # --- conversion ----------------------------------------------------------------------------------------
    def _merged_state_dict(self, verify: bool) -> dict[str, torch.Tensor]:
        """Build the unmerged PEFT model in float32, record reference outputs, merge, return the plain tensors."""
        where = f"{self.ctx.checkpoint_path} ({self.comp.name})"
        model = build_peft_model(self.hf_config, self.lora_config, self.layout.adapter_name, self.ctx.device)
        sources = {rel: self.source_tensor(rel) for rel in self.keys}
        load_exactly(
            model,
            _progress(sources, "reading " + self.comp.name, self.ctx.progress),
            where,
            "check that the base config matches the trained model (--base)",
        )
        if verify:
            self.probe = checks.probe_input_ids(self.hf_config.get_text_config().vocab_size)
            self.reference = checks.causal_lm_logits(model, self.probe)
        merged = merge(model, self.ctx.progress)
        state = {k: v for k, v in merged.state_dict().items()}
        planned_keys = set(self.plain)
        extra, missing = sorted(set(state) - planned_keys), sorted(planned_keys - set(state))
        if self.head_key in extra and self._tied_config():
            extra.remove(self.head_key)  # the base still ties lm_head to the embeddings
            state.pop(self.head_key)
        if extra or missing:
            raise ConvertError(
                f"{where}: merge_and_unload gave other keys than planned: "
                f"extra {preview(extra, 3)}, missing {preview(missing, 3)}"
            )
        return state

    def write(self, folder: Path, reference: bool, engine: str = "full") -> None:
        self.engine = engine
        if engine == "streaming":
            from .stream import StreamingWriter

            lora_on = {m + ".weight" for m in (self.layout.lora_modules if self.layout else ())}
            if self.tie and {self.head_key, self.embed_key} & lora_on:
                raise ConvertError(f"{self.comp.name}: LoRA on tied embeddings needs --engine full")
            if self.tie and self.head_key in self.plain:
                self._account_tie()
            self._streamer = StreamingWriter(self, self.ctx.reader, verify=reference)
            self._streamer.write(folder)
            self.written_hashes = dict(self._streamer.sha)
            self._write_config(folder)
            return
        if self.layout is not None:
            state = self._merged_state_dict(reference)
        else:
            state = {k: self._tensor(k) for k in self.plain}
        if self.tie and self.head_key in state:
            head, embed = state[self.head_key], state[self.embed_key]
            if not torch.equal(head, embed):
                self.tie = False
                log.warning(
                    "%s: lm_head differs from embed_tokens after the merge; writing tie_word_embeddings false",
                    self.comp.name,
                )
            else:
                state.pop(self.head_key)
                self._account_tie()
        dtype = self.out_dtype()
        out = {}
        for k, t in _progress(state, "casting " + self.comp.name, self.ctx.progress).items():
            out[k] = check_finite(k, t, _cast(t, dtype) if dtype else t, self.ctx.checkpoint_path).to("cpu")
            out[k] = out[k].contiguous()
        write_hf_weights(folder, out, self.ctx.max_shard_size)
        del out, state
        self._write_config(folder)

    def _account_tie(self) -> None:
        head_source = self.plain[self.head_key]
        self.fate.setdefault(TIED, []).append(head_source)
        self.fate[WRITTEN] = [k for k in self.fate.get(WRITTEN, []) if k != head_source]

    def _write_config(self, folder: Path) -> None:
        dtype = self.out_dtype()
        config = self.hf_config
        if self._tied_config() and not self.tie:
            config.get_text_config(decoder=True).tie_word_embeddings = False
            config.tie_word_embeddings = False
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(folder)
        self.info["copied_from_base"] = copy_support_files(self.base_dir, folder)
        self.info["tie_word_embeddings"] = self.tie if self._tied_config() else False

    def verify(self, folder: Path) -> None:
        if getattr(self, "engine", "full") == "streaming":
            self.verification = self._streamer.verify_written(folder)
            return
        model = checks.load_clean(folder, self.auto_class, self.ctx.device)
        result: dict[str, Any] = {"loads_clean": True}
        written = checks.read_written(folder)
        copies = {self._plain_of(src): self._tensor(self._plain_of(src)) for src in self.fate.get(WRITTEN, [])}
        copies = {k: v for k, v in copies.items() if k in written}
        result["exact_tensors"] = checks.exact_copies(written, copies, str(folder))
        result["merged_tensors"] = len(written) - result["exact_tensors"]
        if getattr(self, "reference", None) is not None:
            exported = checks.causal_lm_logits(model, self.probe)
            dtype = self.out_dtype() or torch.float32
            result.update(checks.compare_logits(self.reference, exported, dtype, str(folder)))
            result["probe"] = list(self.probe.shape)
        self.verification = result

    def _plain_of(self, src: str) -> str:
        if not hasattr(self, "_inverse"):
            self._inverse = {v: k for k, v in self.plain.items()}
        return self._inverse[src]

    def plan(self) -> dict[str, Any]:
        plan = super().plan()
        plan["base"] = str(self.base_dir)
        plan["tie_word_embeddings"] = self.tie if self._tied_config() else False
        if self.adapter_facts is not None:
            plan["lora"] = {
                "adapter": self.adapter_facts.name,
                "pairs": self.adapter_facts.lora_pairs,
                "tensors_from": self.adapter_facts.tensors_from,
            }
        return plan


class CausalLMPart(HFPart):
    auto_class = "AutoModelForCausalLM"


def _progress(mapping: dict[str, Any], desc: str, enabled: bool) -> dict[str, Any]:
    """Materialise ``mapping`` (touching each memory-mapped tensor) under a tqdm bar."""
    out = {}
    for key in tqdm(list(mapping), desc=desc, unit="tensor", disable=not enabled, leave=False):
        out[key] = mapping[key]
    return out


PART_KINDS: dict[str, type[Part]] = {
    "state_dict": StateDictPart,
    "hf_model": HFPart,
    "hf_causal_lm": CausalLMPart,
}
