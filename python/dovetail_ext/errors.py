"""Exceptions raised by dovetail_ext.

Bad files raise :class:`FormatError` (a ``ValueError``); a missing default model raises
:class:`ModelNotFoundError` (a ``FileNotFoundError``) whose message says how to install it.
Native checks surface as ``ValueError`` / ``IndexError`` with the problem named.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FormatError", "ModelNotFoundError", "DraftMismatchError"]


class FormatError(ValueError):
    """A model, tokenizer or draft file is malformed, truncated or unsupported."""


class ModelNotFoundError(FileNotFoundError):
    """The requested model (or the default model package) is not installed."""


class DraftMismatchError(ValueError):
    """A draft checkpoint was trained for a different target model."""


def check_positive_ints(what: str, obj: Any, names: tuple[str, ...]) -> None:
    """ValueError naming ``what name`` unless each attribute is an int >= 1 (not a bool)."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} {name} must be a positive integer, got {v!r}")
