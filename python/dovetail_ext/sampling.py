"""Choosing tokens from the target's logits: greedy, and seeded sampling with
temperature, top-k and top-p applied to the target distribution.

The same :func:`target_dist` feeds plain sampling and the lossless speculative
acceptance, so both sample from exactly one distribution.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _core

__all__ = ["SamplingParams", "LogitAdjuster", "LogitShaper", "target_dist", "target_probs", "TokenChooser",
           "accept_greedy", "accept_sampled"]


# Weights exp(z) below exp(-87.3) (about 1e-38 of the most likely token's) are exactly 0:
# the float32 exponent's range.
EXP_CUTOFF = -87.3


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0, top_p 1.0 and min_p 0.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):  # real numbers (numpy's too), stored as floats
            v = getattr(self, name)
            try:
                f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
            except OverflowError:  # an int beyond the float range
                f = float("inf")
            if f is None:
                raise ValueError(f"{name} must be a number, got {v!r}")
            object.__setattr__(self, name, f)
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature > 0:  # the native kernels scale by 1 / temperature in float32
            with np.errstate(over="ignore", under="ignore"):
                inv = np.float32(1.0 / self.temperature)
            if not np.isfinite(inv):
                raise ValueError(f"temperature {self.temperature!r} is too small to sample with (1 / temperature "
                                 "overflows float32); temperature 0 decodes greedily")
            if inv == 0:
                raise ValueError(f"temperature {self.temperature!r} is too large to sample with (1 / temperature "
                                 "underflows float32)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) \
                or not 0 <= self.top_k < 2 ** 63:
            raise ValueError(f"top_k must be an integer in [0, 2**63), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
                raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_dist(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution to sample from for one row of logits [V], as its support: (ids,
    probs), the tokens of nonzero probability in increasing id order (int32) and their
    probabilities (float64), computed natively (``_core.sampling_dist``).

    min_p first drops the tokens whose probability is below min_p times the most likely
    one's (:func:`min_p_cut`). Weights e = exp((logits - max) / temperature) (float32,
    exactly 0 below exp(-87.3)); top_k keeps the top_k largest (ties at the k-th kept);
    top_p then keeps, from the most likely down, each token whose preceding mass is below
    top_p, and every token tied with the last one kept; the kept weights are renormalized.
    Only the head of the vocabulary is sorted, so filtered sampling costs one vector pass
    over the logits.
    """
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution (temperature is 0)")
    return _core.sampling_dist(min_p_cut(logits, params), params.temperature, params.top_k, params.top_p)


def min_p_cut(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """``logits`` (float32) with -inf for the tokens whose probability at this temperature is
    below ``min_p`` times the most likely one's: logit < max + temperature * ln(min_p),
    compared in float64. The row itself when min_p is 0."""
    x = np.asarray(logits, dtype=np.float32)
    if not params.min_p or params.greedy:
        return x
    floor = float(x.max()) + params.temperature * math.log(params.min_p)
    return np.where(x >= floor, x, np.float32(-np.inf))


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """:func:`target_dist` as dense float64 rows [..., V] (zeros outside the support)."""
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution (temperature is 0)")
    x = np.asarray(logits, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros(rows.shape, dtype=np.float64)
    for r, row in enumerate(rows):
        ids, p = target_dist(row, params)
        out[r, ids] = p
    return out.reshape(x.shape)


def target_probs_by_full_sort(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """:func:`target_dist`'s rule written plainly in float64 numpy: the filters as selects
    and top-p over the whole row sorted. The specification the native distribution is
    tested against (the same support; probabilities within float32 rounding of the
    exponent) and the baseline of the sampling benchmark; several times slower."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    z = z - z.max(axis=-1, keepdims=True)
    if params.min_p:  # p / p_max = exp(z) >= min_p
        z = np.where(z >= math.log(params.min_p), z, -np.inf)
    if params.top_k and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k, axis=-1)[..., -params.top_k, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.where(z >= EXP_CUTOFF, np.exp(z), 0.0)
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        sorted_p = -np.sort(-p, axis=-1)
        keep = np.cumsum(sorted_p, axis=-1) - sorted_p < params.top_p
        threshold = np.min(np.where(keep, sorted_p, np.inf), axis=-1, keepdims=True)
        p = np.where(p >= threshold, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


class LogitAdjuster:
    """OpenAI's presence and frequency penalties and logit bias, applied to a row of logits
    before the token is chosen: logits[t] += bias[t] - presence * (count[t] > 0) - frequency *
    count[t], where count[t] is how often t was generated so far (``add`` each token).
    Penalties are in [-2, 2]; biases in [-100, 100], keyed by token ids below ``vocab_size``."""

    def __init__(self, vocab_size: int, presence: float = 0.0, frequency: float = 0.0,
                 bias: dict | None = None) -> None:
        for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if bias is None:
            bias = {}
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        for t, b in bias.items():
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias: token id {t!r} is not an integer in [0, {vocab_size})")
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {t} must be a number in [-100, 100], got {b!r}")
        self.presence, self.frequency = float(presence), float(frequency)
        self.bias_ids = np.array([int(t) for t, b in bias.items() if b], dtype=np.int64)
        self.bias_values = np.array([b for b in bias.values() if b], dtype=np.float32)
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self._added: list[int] = []

    @property
    def active(self) -> bool:
        """Whether it changes anything (a zero adjuster is skipped)."""
        return bool(self.presence or self.frequency or self.bias_ids.size)

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self._added.append(int(token))

    def rollback(self, tokens: int) -> None:
        """Undo the last ``tokens`` calls of :meth:`add`."""
        for _ in range(tokens):
            self.counts[self._added.pop()] -= 1

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, dtype=np.float32)
        if self.presence or self.frequency:
            seen = np.flatnonzero(self.counts)
            out[seen] -= (self.presence + self.frequency * self.counts[seen]).astype(np.float32)
        out[self.bias_ids] += self.bias_values
        return out


class LogitShaper:
    """What a row of target logits becomes before a token is chosen, where that depends on
    the tokens chosen before it: OpenAI's adjustments (:class:`LogitAdjuster`), then a
    grammar's mask (:class:`~dovetail_ext.grammar.Constraint`). :meth:`consume` takes a
    chosen token and :meth:`rollback` undoes the last ones, so that speculative acceptance
    can walk a tree's paths and judge each node by the distribution plain decoding would
    have there."""

    def __init__(self, adjust: LogitAdjuster | None = None, constraint=None) -> None:
        self.adjust, self.constraint = adjust, constraint

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.adjust is not None:
            logits = self.adjust(logits)
        if self.constraint is not None:
            logits = self.constraint(logits)
        return logits

    def consume(self, token: int) -> None:
        if self.adjust is not None:
            self.adjust.add(token)
        if self.constraint is not None:
            self.constraint.consume(token)

    def rollback(self, tokens: int) -> None:
        if self.adjust is not None:
            self.adjust.rollback(tokens)
        if self.constraint is not None:
            self.constraint.rollback(tokens)


class TokenChooser:
    """Picks the next token from one row of logits: argmax, or a seeded draw."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        p = self.params  # target_dist and draw_from in one native call (the same token)
        return _core.sample(min_p_cut(logits, p), p.temperature, p.top_k, p.top_p, self.rng.random())

    def draw_from(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """One token of a distribution given by its support (ids in increasing order, their
        probabilities): inverse CDF on one uniform draw."""
        cdf = np.cumsum(probs)
        u = self.rng.random() * cdf[-1]
        return int(ids[min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)])

    def draw(self, probs: np.ndarray) -> int:
        """One token from a dense probability vector: the same draw as :meth:`draw_from` on
        its nonzero entries (zeros add nothing to the CDF)."""
        support = np.flatnonzero(probs)
        return self.draw_from(support, probs[support])


def accept_greedy(tree, logits: np.ndarray, shaper=None) -> tuple[np.ndarray, int]:
    """Greedy verification of a tree against the target's logits [K, V] at its nodes.

    A drafted node is accepted when its token is the target's argmax at its parent and its
    parent is accepted; siblings hold distinct tokens, so the accepted nodes form one
    root-to-node path. Returns (path of node indices from the root, bonus token = the
    target's argmax after the path's last node).

    With a ``shaper`` (:class:`LogitShaper`, at the root) the argmax at each node is taken
    over the logits it shapes after the path to it (penalties counting the path's tokens,
    a grammar's mask after them), which the walk consumes; the shaper is back at the root
    when this returns.
    """
    if shaper is not None:
        path, taken = [0], 0
        try:
            while True:
                best = int(np.argmax(shaper(logits[path[-1]])))
                child = next((int(c) for c in tree.children(path[-1]) if tree.tokens[c] == best), None)
                if child is None:
                    return np.asarray(path, dtype=np.int64), best
                shaper.consume(best)
                taken += 1
                path.append(child)
        finally:
            shaper.rollback(taken)
    best = np.argmax(logits, axis=-1).tolist()
    # One pass in node order (a parent comes before its children): the accepted nodes form
    # one chain from the root, so the last one accepted ends the path.
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    path = [0]
    for c in range(1, len(tokens)):
        if parents[c] == path[-1] and tokens[c] == best[path[-1]]:
            path.append(c)
    return np.asarray(path, dtype=np.int64), int(best[path[-1]])


def accept_sampled(tree, logits: np.ndarray, params: SamplingParams, chooser: TokenChooser,
                   shaper=None) -> tuple[np.ndarray, int]:
    """Lossless verification for sampling (recursive rejection with deterministic drafts).

    At node u with target distribution p (temperature / top-k / top-p applied), try u's
    children in the draft's order: a drafted token x was proposed with probability q(x) = 1,
    so accept it with probability min(1, p(x) / q(x)) = p(x); on rejection the residual is
    norm(max(p - q, 0)), i.e. p with p(x) set to 0, renormalized, and the next child is
    tried against it. If no child is accepted (or u is a leaf) the bonus token is drawn from
    what remains of p. The emitted tokens then follow the target's distribution exactly.

    With a ``shaper`` (at the root), p at each node is the distribution of the logits it
    shapes after the path to it (as in :func:`accept_greedy`).
    """
    u = 0
    path = [0]
    try:
        while True:
            ids, p = target_dist(logits[u] if shaper is None else shaper(logits[u]), params)
            moved = False
            for c in tree.children(u):
                x = int(tree.tokens[c])
                k = int(np.searchsorted(ids, x))
                px = float(p[k]) if k < len(ids) and ids[k] == x else 0.0
                if chooser.rng.random() < px:
                    u, moved = int(c), True
                    break
                rest = p.sum() - px
                if rest <= 0.0:  # p(x) was 1 up to rounding: nothing else can be drawn
                    u, moved = int(c), True
                    break
                if px:
                    p[k] = 0.0
                p /= rest
            if not moved:
                return np.asarray(path, dtype=np.int64), chooser.draw_from(ids, p)
            path.append(u)
            if shaper is not None:
                shaper.consume(int(tree.tokens[u]))
    finally:
        if shaper is not None:
            shaper.rollback(len(path) - 1)
