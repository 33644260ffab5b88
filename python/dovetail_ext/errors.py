"""Exceptions raised by dovetail_ext.

Bad files raise :class:`FormatError` (a ``ValueError``); a missing default model raises
:class:`ModelNotFoundError` (a ``FileNotFoundError``) whose message says how to install it.
Native checks surface as ``ValueError`` / ``IndexError`` with the problem named.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["FormatError", "ModelNotFoundError", "DraftMismatchError"]


class FormatError(ValueError):
    """A model, tokenizer or draft file is malformed, truncated or unsupported."""


class ModelNotFoundError(FileNotFoundError):
    """The requested model (or the default model package) is not installed."""


class DraftMismatchError(ValueError):
    """A draft checkpoint was trained for a different target model."""


def as_int(what: str, v: Any, lo: int = 1, bits: int = 64) -> int:
    """``int(v)`` for an integer (Python's or numpy's, not a bool) in [lo, 2**(bits - 1)): what
    a native call takes; otherwise a ValueError naming ``what`` (rather than a TypeError from
    deep inside that call)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v < 2 ** (bits - 1):
        raise ValueError(f"{what} must be an integer >= {lo} (and below 2**{bits - 1}), got {v!r}")
    return int(v)


def check_text(s: str, what: str = "the prompt") -> str:
    """``s``, refused when it holds a lone surrogate: undecodable bytes that Python kept as
    U+DC80-U+DCFF (from the command line or a file read with surrogateescape), or a "\\ud800"
    escape in JSON. No tokenizer can encode them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate ({s[e.start]!r} at character {e.start}): not "
                         "valid text (bytes that are not UTF-8?)") from None
    return s


def as_bool(what: str, v: Any, none: bool = False) -> bool | None:
    """``v`` when it is a bool (or None when ``none``); otherwise a ValueError naming ``what``:
    a string such as "no" would otherwise count as true."""
    if v is None and none:
        return None
    if not isinstance(v, bool):
        raise ValueError(f"{what} must be True or False{' or None' if none else ''}, got {v!r}")
    return v


def check_positive_ints(what: str, obj: Any, names: tuple[str, ...]) -> None:
    """ValueError naming ``what name`` unless each attribute is an integer >= 1 (not a bool);
    numpy integers are stored as ints."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v < 2 ** 63:
            raise ValueError(f"{what} {name} must be a positive integer, got {v!r}")
        object.__setattr__(obj, name, int(v))
