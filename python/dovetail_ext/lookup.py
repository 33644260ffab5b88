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

import json
import numbers
import os

import numpy as np

from . import _core
from .errors import FormatError, check_positive_ints

__all__ = ["CorpusParams", "LookupParams", "NgramLookup", "TokenCorpus", "CORPUS_FILE"]

CORPUS_FILE = "corpus.safetensors"  # a corpus shipped next to a draft


@dataclass(frozen=True)
class LookupParams:
    """``min_n`` / ``max_n``: the suffix lengths matched (the longest match wins, the latest
    occurrence of it); ``max_tokens``: the longest chain proposed."""

    min_n: int = 3
    max_n: int = 4
    max_tokens: int = 6

    def __post_init__(self) -> None:
        _check_suffix_lengths("lookup", self, ("max_tokens",))


def _check_suffix_lengths(what: str, params, more: tuple[str, ...]) -> None:
    """ValueError naming ``what`` unless min_n, max_n and ``more`` are positive integers
    and min_n <= max_n <= 64."""
    check_positive_ints(what, params, ("min_n", "max_n") + more)
    if params.max_n < params.min_n:
        raise ValueError(f"{what} max_n ({params.max_n}) must be at least min_n ({params.min_n})")
    if params.max_n > 64:
        raise ValueError(f"{what} max_n must be at most 64, got {params.max_n}")


@dataclass(frozen=True)
class CorpusParams:
    """How a :class:`TokenCorpus` proposes: the context's longest suffix of ``min_n`` to
    ``max_n`` tokens that occurred at least ``min_count`` times in the corpus (with a token
    after it) is matched; then each next token is the one most of the matching occurrences
    continued with (the smallest id on a tie), while at least ``min_count`` of them and at
    least ``min_frac`` of those that go on agree, and only those go on; ``max_tokens``:
    the longest chain."""

    min_n: int = 3
    max_n: int = 6
    max_tokens: int = 4
    min_count: int = 4
    min_frac: float = 0.7

    def __post_init__(self) -> None:
        _check_suffix_lengths("corpus", self, ("max_tokens", "min_count"))
        if self.max_tokens > 64:
            raise ValueError(f"corpus max_tokens must be at most 64, got {self.max_tokens}")
        f = self.min_frac
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 <= f <= 1.0:
            raise ValueError(f"corpus min_frac must be a number in [0, 1], got {f!r}")
        object.__setattr__(self, "min_frac", float(f))


class TokenCorpus:
    """A body of tokens indexed for corpus lookup (the native ``_core.TokenCorpus``: its
    windows of ``max_n + max_tokens`` tokens sorted once: 0.16 s for 1.3M tokens on 2 cores).

    Args:
        tokens: the corpus, documents joined (an end token between them keeps a match from
            running across).
        params: how it proposes.
        target: the :class:`~dovetail_ext.draft_model.TargetSignature` of the target whose
            text it is (checked when it is loaded next to a target), or None.
        card: what it was made from (kept in the file).
    """

    def __init__(self, tokens: Iterable[int] | np.ndarray, params: CorpusParams | None = None,
                 target=None, card: dict | None = None) -> None:
        self.params = params or CorpusParams()
        if not isinstance(self.params, CorpusParams):
            raise ValueError(f"corpus params must be CorpusParams, got {self.params!r}")
        arr = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens))
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"corpus tokens must be a 1-D sequence of integers, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 31):
            raise ValueError(f"corpus token ids must lie in [0, 2^31), got {int(arr.min())} .. {int(arr.max())}")
        self.target = target
        self.card = dict(card or {})
        p = self.params
        self._native = _core.TokenCorpus(arr.astype(np.int32), p.min_n, p.max_n, p.max_tokens, p.min_count,
                                         p.min_frac)

    def __len__(self) -> int:
        return len(self._native)

    @property
    def tokens(self) -> np.ndarray:
        """The corpus (int32)."""
        return self._native.tokens

    def propose(self, context: Iterable[int], limit: int | None = None) -> list[int]:
        """The chain for a context (at most ``max_tokens`` tokens, at most ``limit``);
        empty when no suffix qualifies."""
        ctx = np.asarray(list(context), dtype=np.int64)
        if ctx.size and (ctx.min() < 0 or ctx.max() >= 2 ** 31):
            raise ValueError("context token ids must lie in [0, 2^31)")
        return self._native.propose(ctx.astype(np.int32), self.params.max_tokens if limit is None else limit).tolist()

    def save(self, path: str | os.PathLike) -> None:
        """Write the corpus (safetensors: the tokens as uint16 when they fit, else int32,
        and its target and card as metadata)."""
        from safetensors.numpy import save_file

        toks = self.tokens
        toks = toks.astype(np.uint16) if (toks.size == 0 or toks.max() < 2 ** 16) else toks
        meta = {"format": "dovetail-corpus", "version": "1", "card": json.dumps(self.card)}
        if self.target is not None:
            meta["target"] = json.dumps(self.target.to_dict())
        save_file({"tokens": np.ascontiguousarray(toks)}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, params: CorpusParams | None = None) -> TokenCorpus:
        """Read a corpus written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file. FormatError: not a corpus file.
        """
        from safetensors import SafetensorError, safe_open

        from .draft_model import TargetSignature

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no corpus file at {path!r}")
        try:
            with safe_open(path, "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "dovetail-corpus" or "tokens" not in f.keys():
                    raise FormatError(f"{path!r} is not a dovetail corpus (format {meta.get('format')!r})")
                if meta.get("version") != "1":
                    raise FormatError(f"{path!r}: corpus version {meta.get('version')!r} is not supported (1)")
                tokens = f.get_tensor("tokens")
            target = TargetSignature.from_dict(json.loads(meta["target"])) if "target" in meta else None
            card = json.loads(meta.get("card", "{}"))
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{path!r} is not a readable corpus: {e}") from e
        except ValueError as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{path!r} is not a readable corpus: {e}") from e
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.int32):
            raise FormatError(f"{path!r}: corpus tokens must be 1-D uint16 or int32, got {tokens.dtype} {tokens.shape}")
        return cls(tokens, params, target=target, card=card)

    def check_target(self, source) -> None:
        """ValueError unless the corpus was made for this target (when it names one)."""
        if self.target is None:
            return
        from .draft_model import TargetSignature

        diff = self.target.differences(TargetSignature.from_source(source))
        if diff:
            raise ValueError("the corpus was made for another target: " + "; ".join(diff))


class NgramLookup:
    """The context's n-grams and where each last continued (the native
    ``_core.NgramLookup``, which the C API's speculator uses too).

    Args:
        tokens: the context so far (prompt and emitted tokens; the last one is the next
            step's root).
        params: match lengths and chain length.
        corpus: a :class:`TokenCorpus` that proposes where the context has no match, or None.
    """

    def __init__(self, tokens: Iterable[int] = (), params: LookupParams | None = None,
                 corpus: TokenCorpus | None = None) -> None:
        self.params = params or LookupParams()
        self._native = _core.NgramLookup(self.params.min_n, self.params.max_n, self.params.max_tokens)
        if corpus is not None:
            if not isinstance(corpus, TokenCorpus):
                raise ValueError(f"corpus must be a TokenCorpus or None, got {type(corpus).__name__}")
            self._native.set_corpus(corpus._native)
        self.corpus = corpus
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the context."""
        self._native.extend(np.fromiter(tokens, dtype=np.int32))

    def propose(self, limit: int | None = None) -> list[int]:
        """The chain following the latest earlier occurrence of the longest matching suffix
        (``max_tokens`` tokens, at most ``limit``); when no suffix of at least ``min_n``
        tokens occurred before, the corpus's chain (at most its own ``max_tokens``), or
        empty. Where that occurrence overlaps the suffix (a run
        or a loop in the text), the chain continues with the same period, as an
        overlapping copy does."""
        return self._native.propose(self.params.max_tokens if limit is None else limit).tolist()

    @property
    def from_corpus(self) -> bool:
        """Whether the last chain proposed came from the corpus."""
        return self._native.last_from_corpus

    @property
    def tokens(self) -> list[int]:
        """The context."""
        return self._native.tokens.tolist()
