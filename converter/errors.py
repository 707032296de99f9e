"""The one exception type the library raises for bad input; the CLI prints its message as one line."""

from __future__ import annotations


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
