"""Which tokenizer ships with a language model's export, and whether it fits the written embeddings.

A run that added tokens in training (``<image>``, chat markers) saves its tokenizer beside the adapter (or in
``RUN/tokenizer/``); the base's tokenizer cannot produce those tokens. Looked for, in order: ``--tokenizer PATH``,
the adapter folder, ``RUN/tokenizer/``, a hyper-parameter naming one, the base model's folder. The chosen one must
fit the embeddings: ``len(tokenizer)`` no more than their rows (rows beyond it are padding, e.g. from
``pad_to_multiple_of``), every added token's id below it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConvertError, preview, untrusted
from .hparams import lookup
from .names import TOKENIZER_FILES

log = logging.getLogger(__name__)

TOKENIZER_HPARAMS = ("tokenizer_name", "tokenizer_name_or_path", "tokenizer_path", "tokenizer")
BASE = "the base model"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """The tokenizer an export ships: where it is, why it was chosen, and how it fits the embeddings."""

    path: Path
    found_by: str
    files: tuple[str, ...]
    size: int  # len(tokenizer)
    added: dict[str, int]  # tokens added beyond the base's vocabulary -> id
    rows: int | None  # the embeddings' rows as written
    padding_rows: int
    base_vocab: int | None = None  # the base config's vocab_size

    @property
    def shipped_from_run(self) -> bool:
        """The run's own tokenizer (not the base's)."""
        return self.found_by != BASE

    def record(self) -> dict[str, Any]:
        return {
            "found_by": self.found_by,
            "tokens": self.size,
            "added_tokens": self.added,
            "embedding_rows": self.rows,
            "base_vocab_size": self.base_vocab,
            "padding_rows": self.padding_rows,
        }


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES[:2])


def find_tokenizer(
    override: Path | None,
    adapter_folder: Path | None,
    run: Path,
    hparams: Mapping[str, Any],
    base: Path,
) -> tuple[Path, str]:
    """The folder of the tokenizer the run trained with, and how it was found."""
    if override is not None:
        if not _has_tokenizer(override):
            raise ConvertError(f"{override}: no tokenizer.json or tokenizer_config.json here (given with --tokenizer)")
        return override, "--tokenizer"
    for folder in (adapter_folder, adapter_folder.parent if adapter_folder else None):
        if folder is not None and folder != run and _has_tokenizer(folder):
            return folder, f"saved beside the adapter ({folder.name}/)"
    if _has_tokenizer(run / "tokenizer"):
        return run / "tokenizer", "the run's tokenizer/ folder"
    for name in TOKENIZER_HPARAMS:
        found = lookup(hparams, (name,), "the tokenizer", "--tokenizer PATH")
        if found is not None and isinstance(found[1], str) and found[1]:
            local = Path(found[1]).expanduser()
            local = local if local.is_absolute() or local.exists() else run / found[1]
            if _has_tokenizer(local):
                return local, f"hyper_parameters.{found[0]}"
    return base, BASE


NO_TOKENIZER = "none: neither the run nor its base model has tokenizer files; the export ships no tokenizer"


def has_tokenizer(folder: Path | None) -> bool:
    """Whether ``folder`` holds a tokenizer (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return _has_tokenizer(folder)


def no_tokenizer(where: str, base: Path) -> None:
    """Neither the run nor the base has a tokenizer (a checkpoint-only base): nothing to ship, nothing to check
    against the embeddings. Not an error: the weights are whole; the warning says what the export lacks."""
    log.warning(
        "%s: no tokenizer: neither the run (--tokenizer, the adapter folder, RUN/tokenizer/, hyper_parameters.%s) "
        "nor the base model (%s) has one; the export ships none: add the tokenizer the model was trained with before "
        "release",
        where,
        "/".join(TOKENIZER_HPARAMS),
        base,
    )


def check_tokenizer(folder: Path, found_by: str, rows: int | None, base_vocab: int | None, where: str) -> Tokenizer:
    """Load the tokenizer (transformers, local files only) and check it against the embeddings' rows."""
    from transformers import AutoTokenizer

    with untrusted(folder, "the tokenizer does not load", "pass --tokenizer PATH"):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        size = len(tokenizer)
        added = {t: i for t, i in sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])}
    if base_vocab is not None:  # the tokens added in training, beyond the base's vocabulary
        added = {t: i for t, i in added.items() if i >= base_vocab}
    if rows is not None:
        if base_vocab is not None and rows > base_vocab and found_by == BASE:
            raise ConvertError(
                f"{where}: the embeddings grew from {base_vocab} to {rows} rows in training, but the run's tokenizer "
                f"was not found (looked for --tokenizer, the adapter folder, RUN/tokenizer/, "
                f"hyper_parameters.{'/'.join(TOKENIZER_HPARAMS)}); the base's cannot produce the added tokens; pass "
                "--tokenizer PATH (the base's own, if no tokens were added)"
            )
        beyond = [f"{t} ({i})" for t, i in added.items() if i >= rows]
        if size > rows or beyond:
            raise ConvertError(
                f"{folder}: the tokenizer has {size} tokens ({preview(beyond, 3) or 'none added beyond'}) but the "
                f"embeddings {rows} rows; it is not the tokenizer this model was trained with; pass --tokenizer PATH"
            )
    files = tuple(n for n in TOKENIZER_FILES if (folder / n).is_file())
    padding = (rows - size) if rows is not None else 0
    return Tokenizer(folder, found_by, files, size, added, rows, padding, base_vocab)
