"""User-facing errors.

Every failure a user can cause (a bad recipe, a broken checkpoint, a tensor that does not fit) raises an
:class:`OmniMergeError` whose message names the file or tensor, what was expected and what was found. The CLI
prints the message (no traceback) and exits with status 2.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """``text`` with newlines and other control characters (terminal escapes included) written as escapes:
    names and values from inputs cannot break a message into several lines or drive the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class OmniMergeError(Exception):
    """An error caused by the user's inputs; its message is meant to be read by them (always one line)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(str(message)), *args)


class RecipeError(OmniMergeError):
    """The recipe (or a --set override) is invalid."""


class MethodParameterError(RecipeError):
    """A merge method's hyper-parameter is unknown, of the wrong type, or out of range."""


class CheckpointError(OmniMergeError):
    """A checkpoint cannot be found, read, or does not match the others."""


class TensorMismatchError(CheckpointError):
    """Tensors that must agree (names, shapes) do not."""


class NonFiniteTensorError(CheckpointError):
    """An input tensor holds NaN or Inf values."""


class OutputError(OmniMergeError):
    """The output cannot be written (exists, disk full, ...)."""


def quoted(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: values from inputs are quoted in messages, never echoed whole
    (a recipe's alias bomb or a 100 MB tensor name must not become the message)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a self-referencing structure; an int too long for str()
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
