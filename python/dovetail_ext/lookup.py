"""Prompt lookup: draft tokens copied from the context itself.

Text often repeats what came before it: code re-uses its identifiers and its own lines, an
answer quotes the question. When the last ``n`` tokens of the context occurred earlier, the
tokens that followed them then are a cheap guess of what follows now (and where that
earlier occurrence overlaps the end, as in a loop, the guess repeats the loop). Such a chain is
verified by the target in one call like a drafted tree, and accepted by the same greedy or
lossless sampled rule (a proposal made without probabilities is a deterministic draft), so
the output does not change; the draft model does not run for it.

:class:`NgramLookup` keeps, for every n-gram of the context (``min_n <= n <= max_n``), the
position after its latest occurrence (natively, in a hash map: adding a token and proposing
a chain each cost a few lookups). The C API's speculator runs the same lookup inside its
steps (``dt_speculator_set_lookup``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import _core
from .errors import check_positive_ints

__all__ = ["LookupParams", "NgramLookup"]


@dataclass(frozen=True)
class LookupParams:
    """``min_n`` / ``max_n``: the suffix lengths matched (the longest match wins, the latest
    occurrence of it); ``max_tokens``: the longest chain proposed."""

    min_n: int = 3
    max_n: int = 4
    max_tokens: int = 6

    def __post_init__(self) -> None:
        check_positive_ints("lookup", self, ("min_n", "max_n", "max_tokens"))
        if self.max_n < self.min_n:
            raise ValueError(f"lookup max_n ({self.max_n}) must be at least min_n ({self.min_n})")
        if self.max_n > 64:
            raise ValueError(f"lookup max_n must be at most 64, got {self.max_n}")


class NgramLookup:
    """The context's n-grams and where each last continued (the native
    ``_core.NgramLookup``, which the C API's speculator uses too).

    Args:
        tokens: the context so far (prompt and emitted tokens; the last one is the next
            step's root).
        params: match lengths and chain length.
    """

    def __init__(self, tokens: Iterable[int] = (), params: LookupParams | None = None) -> None:
        self.params = params or LookupParams()
        self._native = _core.NgramLookup(self.params.min_n, self.params.max_n, self.params.max_tokens)
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the context."""
        self._native.extend(np.fromiter(tokens, dtype=np.int32))

    def propose(self, limit: int | None = None) -> list[int]:
        """The chain following the latest earlier occurrence of the longest matching suffix
        (``max_tokens`` tokens, at most ``limit``); empty when no suffix of at least
        ``min_n`` tokens occurred before. Where that occurrence overlaps the suffix (a run
        or a loop in the text), the chain continues with the same period, as an
        overlapping copy does."""
        return self._native.propose(self.params.max_tokens if limit is None else limit).tolist()

    @property
    def tokens(self) -> list[int]:
        """The context."""
        return self._native.tokens.tolist()
