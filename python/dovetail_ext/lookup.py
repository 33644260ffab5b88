"""Prompt lookup: draft tokens copied from the context itself.

Text often repeats what came before it: code re-uses its identifiers and its own lines, an
answer quotes the question. When the last ``n`` tokens of the context occurred earlier, the
tokens that followed them then are a cheap guess of what follows now. Such a chain is
verified by the target in one call like a drafted tree, and accepted by the same greedy or
lossless sampled rule (a proposal made without probabilities is a deterministic draft), so
the output does not change; the draft model does not run for it.

:class:`NgramLookup` keeps, for every n-gram of the context (``min_n <= n <= max_n``), the
position after its latest occurrence: adding a token and proposing a chain each cost a few
dictionary operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LookupParams", "NgramLookup"]


@dataclass(frozen=True)
class LookupParams:
    """``min_n`` / ``max_n``: the suffix lengths matched (the longest match wins, the latest
    occurrence of it); ``max_tokens``: the longest chain proposed."""

    min_n: int = 3
    max_n: int = 4
    max_tokens: int = 6

    def __post_init__(self) -> None:
        for name in ("min_n", "max_n", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"lookup {name} must be a positive integer, got {v!r}")
        if self.max_n < self.min_n:
            raise ValueError(f"lookup max_n ({self.max_n}) must be at least min_n ({self.min_n})")


class NgramLookup:
    """The context's n-grams and where each last continued.

    Args:
        tokens: the context so far (prompt and emitted tokens; the last one is the next
            step's root).
        params: match lengths and chain length.
    """

    def __init__(self, tokens: Iterable[int] = (), params: LookupParams | None = None) -> None:
        self.params = params or LookupParams()
        self.tokens: list[int] = []
        # (n-gram) -> index of the token that followed its latest occurrence. An n-gram is
        # entered once its continuation exists, so the context's own last n tokens (the
        # suffix being matched) never match themselves.
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the context."""
        lo, hi = self.params.min_n, self.params.max_n
        toks, index = self.tokens, self._next
        for t in tokens:
            p = len(toks)
            toks.append(int(t))
            for n in range(lo, min(hi, p) + 1):  # the n-grams ending just before t
                index[tuple(toks[p - n:p])] = p

    def propose(self, limit: int | None = None) -> list[int]:
        """The chain following the latest earlier occurrence of the longest matching suffix
        (at most ``max_tokens`` and ``limit`` tokens); empty when no suffix of at least
        ``min_n`` tokens occurred before."""
        cap = self.params.max_tokens if limit is None else min(limit, self.params.max_tokens)
        toks = self.tokens
        if cap <= 0:
            return []
        for n in range(min(self.params.max_n, len(toks)), self.params.min_n - 1, -1):
            j = self._next.get(tuple(toks[len(toks) - n:]))
            if j is not None:
                return toks[j:j + cap]
        return []
