"""The one exception type the library raises for bad input; the CLI prints its message as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ConvertError(Exception):
    """A problem with the user's input or environment, explained in one line that says what to do.

    The message names the file (or option) at fault. ``exit_code`` is what the CLI exits with.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line


def preview(items: list[str], limit: int = 5) -> str:
    """Render a list for an error message: the first few items and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"


@contextlib.contextmanager
def untrusted(path: object, what: str, advice: str) -> Iterator[None]:
    """The boundary around parsing bytes that came from a run (a checkpoint, an adapter, a tokenizer, a manifest).

    Any failure inside -- whatever a parser raises on damaged input (zipfile, pickle, json, safetensors,
    tokenizers), a field of the wrong type, a length that points nowhere -- becomes one ConvertError:
    ``"{path}: {what} ({reason}); {advice}"``. ConvertErrors raised inside pass unchanged. Only readers use it, so
    that a bug elsewhere still shows as a bug.
    """
    try:
        yield
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: damaged input can make a parser raise anything
        reason = " ".join(str(exc).split())[:120]
        reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise ConvertError(f"{path}: {what} ({reason}); {advice}") from exc
