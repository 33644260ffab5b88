"""Token trees for speculative decoding: parameters, the EAGLE-2 candidate pool, and the
structures the target's one-pass verification needs.

A tree is ``tokens[K]`` (root first) and ``parents[K]`` (``parents[0] = -1``, a parent
always before its child). :func:`build_tree` derives, in one pass over the parents,
depths and the ancestor-or-self matrix (what each node may attend to), then positions
(prefix length + depth) and root-to-leaf paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import check_positive_ints

#: The most candidates a draft call ranks per row (the native top-k's limit).
MAX_TOP_K = 256

__all__ = ["TreeParams", "AutoTree", "Tree", "build_tree", "CandidatePool"]


@dataclass(frozen=True)
class TreeParams:
    """EAGLE-2 dynamic tree shape: each expansion keeps the ``top_k`` best candidates,
    the tree is at most ``depth`` drafted levels deep, and holds ``total_tokens`` nodes
    including the root (so ``total_tokens - 1`` drafted tokens are verified).

    ``min_prob`` drops candidates whose path probability under the draft (the product of
    the draft's probabilities from the root) is below it, and stops expanding once no
    frontier node reaches it: when the draft is unsure the tree shrinks, down to the root
    alone (a plain decoding step). Verification cost on a CPU grows with the tree, so
    tokens the draft itself doubts are not worth verifying there.
    """

    # Defaults: the best shape measured on the 2-core reference machine with the shipped
    # draft, prompt lookup and corpus (the default mode), where a target call's cost grows
    # with every verified token: the draft's two best guesses for the next token, the
    # second only when the draft gives it at least 10%, and no drafted token at all below
    # that (the step verifies the root alone). Against one guess, (1, 1, 2), it ran 1-3%
    # faster on five prompt sets (all 164 HumanEval tasks: 1.71x against 1.68x plain
    # decoding) and the same with sampling. With a cheaper verification (a GPU draft,
    # more cores) wider trees such as (10, 7, 16) pay instead.
    top_k: int = 2
    depth: int = 1
    total_tokens: int = 3
    min_prob: float = 0.1

    def __post_init__(self) -> None:
        check_positive_ints("tree", self, ("top_k", "depth", "total_tokens"))
        if self.total_tokens < 2:
            raise ValueError(f"tree total_tokens must be at least 2 (the root and one drafted token), "
                             f"got {self.total_tokens}")
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"tree top_k must be at most {MAX_TOP_K}, got {self.top_k}")
        if not isinstance(self.min_prob, (int, float)) or isinstance(self.min_prob, bool) \
                or not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"tree min_prob must be a number in [0, 1), got {self.min_prob!r}")

    @property
    def min_score(self) -> float:
        """``log(min_prob)``: the lowest cumulative log-probability a drafted node may have."""
        return float(np.log(self.min_prob)) if self.min_prob > 0 else -np.inf

    @property
    def scratch_rows(self) -> int:
        """Draft KV scratch rows one tree build uses (every expanded frontier node)."""
        return self.top_k * (self.depth - 1)


@dataclass(frozen=True)
class AutoTree:
    """Tree shapes for the generator to choose from while it decodes, by measured speed
    (:class:`dovetail_ext.speculative.TreeSelector`): it starts at ``shapes[start]`` and
    every so often tries a neighbouring shape for a few steps, moving when that one emits
    tokens faster. ``shapes`` go from the smallest tree to the largest. Where one more
    verified token costs little (weights bound by memory traffic, a GPU draft) it climbs to
    deeper trees; where verification is compute-bound it stays near the smallest.
    ``interval`` drafting steps pass between tries (doubling while tries lose), and a try
    is ``probe_len`` steps.
    """

    shapes: tuple[TreeParams, ...] = (TreeParams(1, 1, 2), TreeParams(), TreeParams(1, 2, 3), TreeParams(1, 3, 4),
                                      TreeParams(4, 4, 8), TreeParams(6, 5, 10), TreeParams(10, 7, 16))
    start: int = 0
    interval: int = 32
    probe_len: int = 12

    def __post_init__(self) -> None:
        shapes = tuple(self.shapes) if isinstance(self.shapes, (tuple, list)) else ()
        if not shapes or not all(isinstance(t, TreeParams) for t in shapes):
            raise ValueError(f"AutoTree shapes must be a non-empty sequence of TreeParams, got {self.shapes!r}")
        object.__setattr__(self, "shapes", shapes)
        if not isinstance(self.start, int) or isinstance(self.start, bool) or not 0 <= self.start < len(shapes):
            raise ValueError(f"AutoTree start must index shapes (0 .. {len(shapes) - 1}), got {self.start!r}")
        check_positive_ints("AutoTree", self, ("interval", "probe_len"))


@dataclass
class Tree:
    tokens: np.ndarray     # int64 [K], root first
    parents: np.ndarray    # int64 [K], -1 for the root
    depths: np.ndarray     # int64 [K], 0 for the root
    ancestors: np.ndarray  # bool [K, K], row i marks i and its ancestors
    leaves: np.ndarray     # int64 [n_leaves] node indices with no child

    @property
    def size(self) -> int:
        return len(self.tokens)

    def positions(self, n_past: int) -> np.ndarray:
        """Sequence positions when the root sits right after ``n_past`` committed tokens."""
        return n_past + self.depths

    def path_to(self, node: int) -> np.ndarray:
        """Node indices from the root to ``node``, in order."""
        return np.flatnonzero(self.ancestors[node])

    def children(self, node: int) -> np.ndarray:
        """Children of ``node`` in tree order (the draft's ranking among siblings)."""
        return np.flatnonzero(self.parents == node)


def build_tree(tokens, parents) -> Tree:
    """Validate a (tokens, parents) tree and derive depths, ancestor sets and leaves."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    parents = np.asarray(parents, dtype=np.int64).reshape(-1)
    K = len(tokens)
    if K == 0:
        raise ValueError("a tree needs at least its root")
    if parents.shape != (K,):
        raise ValueError(f"parents has {parents.shape[0]} entries for {K} tokens")
    if parents[0] != -1:
        raise ValueError("parents[0] must be -1: node 0 is the root")
    idx = np.arange(K)
    if K > 1 and not np.all((parents[1:] >= 0) & (parents[1:] < idx[1:])):
        raise ValueError("every non-root node's parent must be an earlier node")
    # Depths and ancestor sets in one pass (a parent always comes first): a node's set is
    # its parent's plus itself, held as a bitmask in a Python int, then unpacked at once
    # (a few numpy calls whatever the size: per-call overhead dominates at drafting sizes).
    par = parents.tolist()
    depth_list, masks = [0] * K, [1] * K
    for i in range(1, K):
        depth_list[i] = depth_list[par[i]] + 1
        masks[i] = masks[par[i]] | (1 << i)
    nb = (K + 7) // 8
    packed = np.frombuffer(b"".join(m.to_bytes(nb, "little") for m in masks), dtype=np.uint8).reshape(K, nb)
    anc = np.unpackbits(packed, axis=1, count=K, bitorder="little").view(bool)
    depths = np.array(depth_list, dtype=np.int64)
    has_child = np.zeros(K, dtype=bool)
    has_child[parents[1:]] = True
    return Tree(tokens=tokens, parents=parents, depths=depths, ancestors=anc,
                leaves=np.flatnonzero(~has_child))


class CandidatePool:
    """The EAGLE-2 pool: every drafted candidate with its parent and cumulative
    log-probability. The final tree keeps the best ``total_tokens - 1`` of them; a child
    never outscores its parent (log-probabilities are <= 0, ties rank the earlier, i.e.
    the parent, first), so the kept set is closed under ancestors.

    Index 0 is the root; ``tokens``, ``parents`` (pool indices) and ``scores`` are arrays
    over the whole pool.
    """

    def __init__(self, root_token: int) -> None:
        self.tokens = np.array([root_token], dtype=np.int64)
        self.parents = np.array([-1], dtype=np.int64)
        self.scores = np.array([0.0])

    @classmethod
    def of(cls, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray) -> CandidatePool:
        """A pool holding these candidates (index 0 the root, parents as pool indices)."""
        pool = cls.__new__(cls)
        pool.tokens = np.asarray(tokens, dtype=np.int64)
        pool.parents = np.asarray(parents, dtype=np.int64)
        pool.scores = np.asarray(scores, dtype=np.float64)
        return pool

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add(self, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Append candidates (parents are pool indices); returns their pool indices."""
        start = self.size
        self.tokens = np.concatenate([self.tokens, np.asarray(tokens, dtype=np.int64)])
        self.parents = np.concatenate([self.parents, np.asarray(parents, dtype=np.int64)])
        self.scores = np.concatenate([self.scores, np.asarray(scores, dtype=np.float64)])
        return np.arange(start, self.size)

    def kth_best_score(self, k: int) -> float:
        """The k-th best drafted score so far (-inf when fewer than k candidates)."""
        s = self.scores[1:]
        return float(np.partition(s, -k)[-k]) if len(s) >= k else -np.inf

    def selected(self, total_tokens: int, min_score: float = -np.inf) -> np.ndarray:
        """Pool indices of :meth:`select`'s tree nodes, in tree order (root first)."""
        n = min(total_tokens - 1, int(np.count_nonzero(self.scores[1:] >= min_score)))
        order = np.lexsort((np.arange(1, self.size), -self.scores[1:])) + 1  # best first, ties by index
        return np.sort(np.concatenate([[0], order[:n]]))

    def select(self, total_tokens: int, min_score: float = -np.inf, keep: np.ndarray | None = None) -> Tree:
        """The tree of the root and the best ``total_tokens - 1`` candidates scoring at
        least ``min_score`` (still closed under ancestors: a parent scores at least as
        much as its child)."""
        if keep is None:  # (or the caller's :meth:`selected` for the same arguments)
            keep = self.selected(total_tokens, min_score)
        remap = np.full(self.size, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        parents = self.parents[keep]
        return build_tree(self.tokens[keep], np.where(parents >= 0, remap[np.maximum(parents, 0)], -1))
