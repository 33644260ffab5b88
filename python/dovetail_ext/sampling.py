"""Choosing tokens from the target's logits: greedy, and seeded sampling with
temperature, top-k and top-p applied to the target distribution.

The same :func:`target_probs` feeds plain sampling and the lossless speculative
acceptance, so both sample from exactly one distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SamplingParams", "target_probs", "TokenChooser", "accept_greedy", "accept_sampled"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution to sample from, float64 [..., V].

    logits / temperature, then keep the top_k largest, then the smallest set of the most
    likely tokens whose mass reaches top_p (ties at the boundary are kept), renormalized.
    """
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution (temperature is 0)")
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    # Filters multiply by their 0/1 mask: the kept values stay bit for bit what they were
    # (every value is finite), and a multiply costs less than a select.
    if params.top_k and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k, axis=-1)[..., -params.top_k, None]
        p *= z >= kth
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        rows = p.reshape(-1, p.shape[-1])
        if params.top_k:  # past top-k most of a row is zero: the head lies among the rest
            rows = [r[r > 0] for r in rows]
        threshold = np.array([_top_p_threshold(r, params.top_p) for r in rows]).reshape(p.shape[:-1] + (1,))
        p *= p >= threshold
        p /= p.sum(axis=-1, keepdims=True)
    return p


def target_probs_by_full_sort(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """:func:`target_probs`'s rule written plainly: the filters as selects and top-p over
    the whole row sorted. The specification the tests and the sampling benchmark hold
    :func:`target_probs` to (bit for bit); several times slower."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    z = z - z.max(axis=-1, keepdims=True)
    if params.top_k and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k, axis=-1)[..., -params.top_k, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        sorted_p = -np.sort(-p, axis=-1)
        keep = np.cumsum(sorted_p, axis=-1) - sorted_p < params.top_p
        threshold = np.min(np.where(keep, sorted_p, np.inf), axis=-1, keepdims=True)
        p = np.where(p >= threshold, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def _top_p_threshold(p: np.ndarray, top_p: float) -> float:
    """The smallest probability top-p keeps in one row: the most likely tokens are kept
    while the mass before them is below top_p; everything at least as likely as the last
    of them stays too (ties). Only the head of the sorted row decides it, so the row is
    sorted a slice at a time (64 tokens, then 4x more while all of them are kept) instead
    of whole: the values and their running sums are those of a full descending sort."""
    V = p.shape[-1]
    m = min(V, 64)
    while True:
        head = p if m == V else p[np.argpartition(p, V - m)[V - m:]]
        head = np.sort(head)[::-1]
        keep = (np.cumsum(head) - head) < top_p
        if not keep[-1] or m == V:
            return float(head[np.count_nonzero(keep) - 1])
        m = min(V, 4 * m)


class TokenChooser:
    """Picks the next token from one row of logits: argmax, or a seeded draw."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        return self.draw(target_probs(logits, self.params))

    def draw(self, probs: np.ndarray) -> int:
        """One token from a probability vector (inverse CDF on one uniform draw). After
        top-k / top-p most entries are zero: the CDF is then summed over the others only
        (the same running sums: adding a zero changes nothing)."""
        support = np.flatnonzero(probs) if np.count_nonzero(probs) * 4 < len(probs) else None
        cdf = np.cumsum(probs if support is None else probs[support])
        u = self.rng.random() * cdf[-1]
        i = int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))
        return i if support is None else int(support[i])


def accept_greedy(tree, logits: np.ndarray) -> tuple[np.ndarray, int]:
    """Greedy verification of a tree against the target's logits [K, V] at its nodes.

    A drafted node is accepted when its token is the target's argmax at its parent and its
    parent is accepted; siblings hold distinct tokens, so the accepted nodes form one
    root-to-node path. Returns (path of node indices from the root, bonus token = the
    target's argmax after the path's last node).
    """
    best = np.argmax(logits, axis=-1).tolist()
    # One pass in node order (a parent comes before its children): the accepted nodes form
    # one chain from the root, so the last one accepted ends the path.
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    path = [0]
    for c in range(1, len(tokens)):
        if parents[c] == path[-1] and tokens[c] == best[path[-1]]:
            path.append(c)
    return np.asarray(path, dtype=np.int64), int(best[path[-1]])


def accept_sampled(tree, logits: np.ndarray, params: SamplingParams, chooser: TokenChooser) -> tuple[np.ndarray, int]:
    """Lossless verification for sampling (recursive rejection with deterministic drafts).

    At node u with target distribution p (temperature / top-k / top-p applied), try u's
    children in the draft's order: a drafted token x was proposed with probability q(x) = 1,
    so accept it with probability min(1, p(x) / q(x)) = p(x); on rejection the residual is
    norm(max(p - q, 0)), i.e. p with p(x) set to 0, renormalized, and the next child is
    tried against it. If no child is accepted (or u is a leaf) the bonus token is drawn from
    what remains of p. The emitted tokens then follow the target's distribution exactly.
    """
    u = 0
    path = [0]
    while True:
        p = target_probs(logits[u], params)
        moved = False
        for c in tree.children(u):
            x = int(tree.tokens[c])
            if chooser.rng.random() < p[x]:
                u, moved = int(c), True
                path.append(u)
                break
            rest = p.sum() - p[x]
            if rest <= 0.0:  # p(x) was 1 up to rounding: nothing else can be drawn
                u, moved = int(c), True
                path.append(u)
                break
            p[x] = 0.0
            p /= rest
        if not moved:
            return np.asarray(path, dtype=np.int64), chooser.draw(p)
