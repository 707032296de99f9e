"""What a release needs beside the weights, checked the way consumers will use it: the image processor's files
with a vision part, the chat template in both places servers read it from (``chat_template.jinja`` and
``tokenizer_config.json``), rendered once, and a ``generation_config.json`` whose EOS ids are a list that the shipped
tokenizer has. Problems here are warnings: the weights are right, and the warning names what to add or fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .names import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, PROCESSOR_FILES, TOKENIZER_CONFIG
from .plan import PartPlan

log = logging.getLogger(__name__)

SAMPLE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Describe this panorama."},
    {"role": "assistant", "content": "A wide view of a harbour."},
    {"role": "user", "content": "And the weather?"},
]


def is_vision(part: PartPlan) -> bool:
    """A part whose config describes images (SigLIP, CLIP, ViT... all have ``image_size``)."""
    config = part.config
    return config is not None and hasattr(getattr(config, "vision_config", config), "image_size")


def complete_part(part: PartPlan, folder: Path) -> dict[str, Any]:
    """Add and check the release files of one written part; returns what the manifest records about them."""
    record: dict[str, Any] = {}
    if part.auto_class is None or not (folder / CONFIG).is_file():
        return record
    if is_vision(part):
        record["processor_files"] = [n for n in PROCESSOR_FILES if (folder / n).is_file()]
        if not record["processor_files"]:
            log.warning(
                "%s: the base (%s) has no %s; the export has no image processor, so AutoProcessor and "
                "AutoImageProcessor cannot load it: add the vision model's %s before release",
                part.name,
                part.base.name if part.base else "?",
                " or ".join(PROCESSOR_FILES),
                PROCESSOR_FILES[0],
            )
    if (folder / TOKENIZER_CONFIG).is_file():
        tokenizer = _load_tokenizer(folder)
        record["chat_template"] = _chat_template(part, folder, tokenizer)
        if part.comp.kind == "hf_causal_lm":
            record["eos_token_id"] = _generation_config(part, folder, tokenizer)
    return record


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _chat_template(part: PartPlan, folder: Path, tokenizer: Any) -> str:
    """Write the template into whichever of the two places lacks it, then render a sample conversation with the
    shipped tokenizer. Returns "absent", "renders" or "does not render"."""
    jinja = folder / CHAT_TEMPLATE
    config_path = folder / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text())
    in_config = config.get("chat_template")
    in_file = jinja.read_text() if jinja.is_file() else None
    if in_file is None and in_config is None:
        return "absent"
    if in_file is not None and in_config is None:
        config["chat_template"] = in_file
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    elif in_file is None and isinstance(in_config, str):
        jinja.write_text(in_config)
    elif isinstance(in_config, str) and in_config != in_file:
        log.warning(
            "%s: %s and the chat_template in %s differ; shipped as they are (transformers reads %s, some servers "
            "only %s)",
            part.name,
            CHAT_TEMPLATE,
            TOKENIZER_CONFIG,
            CHAT_TEMPLATE,
            TOKENIZER_CONFIG,
        )
    try:
        tokenizer = _load_tokenizer(folder) if in_file is None or in_config is None else tokenizer
        tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError and whatever the template raises
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        log.warning(
            "%s: the chat template does not render (%s: %s); fix it in the run's tokenizer (%s) before release",
            part.name,
            type(exc).__name__,
            reason,
            CHAT_TEMPLATE,
        )
        return "does not render"
    return "renders"


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _generation_config(part: PartPlan, folder: Path, tokenizer: Any) -> list[int]:
    """``generation_config.json`` with every EOS id as a list: the base's generation config's, the model config's and
    the shipped tokenizer's own (a run that made ``<|im_end|>`` its EOS token must stop on it). An id the tokenizer
    does not have is a warning naming it."""
    from transformers import GenerationConfig

    path = folder / GENERATION_CONFIG
    if path.is_file():
        generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    else:
        generation = GenerationConfig.from_model_config(part.config)
    text = part.config.get_text_config(decoder=True)
    ids = [*_ids(generation.eos_token_id), *_ids(getattr(text, "eos_token_id", None))]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    ids = list(dict.fromkeys(ids))
    size = len(tokenizer)
    for token_id in ids:
        if not 0 <= token_id < size or tokenizer.convert_ids_to_tokens(token_id) is None:
            log.warning(
                "%s: %s's eos_token_id %d is not a token of the shipped tokenizer (%d tokens); generation cannot stop "
                "on it: check the tokenizer (--tokenizer) or the base's %s",
                part.name,
                GENERATION_CONFIG,
                token_id,
                size,
                GENERATION_CONFIG,
            )
    if not ids:
        return ids
    generation.eos_token_id = ids
    generation.save_pretrained(folder)
    return ids
