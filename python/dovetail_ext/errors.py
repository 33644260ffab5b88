"""Exceptions raised by dovetail_ext.

Bad files raise :class:`FormatError` (a ``ValueError``); a missing default model raises
:class:`ModelNotFoundError` (a ``FileNotFoundError``) whose message says how to install it.
Native checks surface as ``ValueError`` / ``IndexError`` with the problem named.
"""

from __future__ import annotations

__all__ = ["FormatError", "ModelNotFoundError", "DraftMismatchError"]


class FormatError(ValueError):
    """A model, tokenizer or draft file is malformed, truncated or unsupported."""


class ModelNotFoundError(FileNotFoundError):
    """The requested model (or the default model package) is not installed."""


class DraftMismatchError(ValueError):
    """A draft checkpoint was trained for a different target model."""
