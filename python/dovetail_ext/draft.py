"""The Dovetail draft at inference: a wrapper over the native draft engine and the
EAGLE-2 tree growth that drives it.

The draft shares the target engine's embedding table and LM head (the same packed memory).
Per speculative step it makes one call over the newly accepted positions (committed) and
one call per tree level over the frontier (scratch rows, dropped at the next step).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .target import TargetEngine, parse_device
from .tree import MAX_TOP_K, AutoTree, CandidatePool, Tree, TreeParams, build_tree

__all__ = ["Draft", "Predraft", "DEFAULT_DRAFT_WEIGHTS"]

#: How the draft's matrices are stored on the CPU unless asked otherwise. The draft only
#: decides which tokens are proposed, never the output, and it runs at every step, after a
#: target call has pushed its weights out of the caches: fewer bytes, a faster step. One
#: call of the shipped draft over 2 rows with top-k, 1 thread: 0.85 ms with f32 matrices,
#: 0.18 ms with q8_0. In the default mode (2 threads, one process, the drafts alternating
#: prompt by prompt) q4_1 against q8_0: draft time per step 0.269 -> 0.225 ms, 1.505x ->
#: 1.537x plain on 12 HumanEval prompts and 1.207x -> 1.240x on 8 chat prompts, tau the
#: same (2.14 and 1.64-1.65); q4_0 lost a little tau on code (2.11).
DEFAULT_DRAFT_WEIGHTS = "q4_1"


@dataclass
class Predraft:
    """A tree drafted ahead for one guessed verification outcome (see Draft.predraft)."""
    accepted: list[int]   # the guessed accepted drafted tokens, in order
    bonus: int            # the guessed bonus token: the next tree's root
    tree: Tree            # the next tree, for that guess
    n_before: int         # the draft's n_past before the guess (truncate here to undo it)


@functools.lru_cache(maxsize=64)
def _star_structure(size: int) -> dict[str, np.ndarray]:
    """Parents, depths, ancestor sets and leaves of a tree of a root and ``size - 1``
    children (read-only arrays, shared by every such tree)."""
    t = build_tree(np.zeros(size, dtype=np.int64), [-1] + [0] * (size - 1))
    fields = dict(parents=t.parents, depths=t.depths, ancestors=t.ancestors, leaves=t.leaves)
    for a in fields.values():
        a.flags.writeable = False
    return fields


def _check_vocab_map(config, vocab_map) -> np.ndarray | None:
    """The draft vocabulary (ascending target ids, int32) or None for the full vocabulary."""
    size = getattr(config, "draft_vocab_size", 0) or 0
    if vocab_map is None:
        if size:
            raise ValueError(f"the draft's config has draft_vocab_size {size} but no vocab_map tensor")
        return None
    vm = np.asarray(vocab_map)
    if vm.ndim != 1 or not np.issubdtype(vm.dtype, np.integer):
        raise ValueError(f"vocab_map must be a 1-D integer array, got {vm.dtype} of shape {vm.shape}")
    if size and len(vm) != size:
        raise ValueError(f"vocab_map has {len(vm)} entries, the config says draft_vocab_size {size}")
    if len(vm) == 0 or vm.min() < 0 or vm.max() >= config.vocab_size:
        raise ValueError(f"vocab_map entries must lie in [0, {config.vocab_size})")
    if np.any(np.diff(vm) <= 0):
        raise ValueError("vocab_map must be strictly ascending")
    return vm.astype(np.int32)


class Draft:
    """A Dovetail draft bound to one target engine.

    Args:
        config: a :class:`dovetail_ext.draft_model.DraftConfig`.
        weights: canonical draft weight name -> float32 array (see draft_model).
        target: the engine whose embedding and LM head the draft uses.
        device: ``"cpu"`` (native CPU engine, the draft's matrices in ``weights_dtype``);
            ``"cuda"`` or ``"cuda:N"`` (the CUDA engine: bf16 weights, fp32 activations,
            the target's embedding and the draft's head rows copied to the GPU once; only
            token ids, positions, ancestor bits and the accepted features cross the bus);
            ``"emulated"`` (the CUDA engine's orchestration on the CPU with scalar kernels:
            a slow test double that runs where no GPU is).
        weights_dtype: storage of the draft's matrices on the CPU (``"q4_1"``, the default:
            a sixth of f32's memory traffic per draft call; ``"q8_0"``, ``"f32"``, ...);
            norms stay fp32. Ignored on the device engines (bf16).
        max_batch: scratch rows (the largest prompt chunk or tree the draft handles).
        graphs: record each call shape's GPU work once as a CUDA graph and replay it.
    """

    def __init__(self, config, weights: dict[str, np.ndarray], target: TargetEngine, *, device: str = "cpu",
                 weights_dtype: str = DEFAULT_DRAFT_WEIGHTS, max_batch: int = 128, threads: int | None = None,
                 check_target: bool = True, graphs: bool = True) -> None:
        backend, device_index = parse_device(device)
        from .draft_model import TargetSignature, expected_draft_shapes
        from .errors import DraftMismatchError
        from .quant import quantize

        if check_target:
            want = TargetSignature.from_source(target.source)
            diff = config.target.differences(want)
            if diff:
                raise DraftMismatchError(
                    f"this draft was trained for another target model ({'; '.join(diff)}); "
                    f"the loaded model is {target.source.name or target.source.path}")
        weights = dict(weights)
        vocab_map = _check_vocab_map(config, weights.pop("vocab_map", None))
        shapes = {n: s for n, s in expected_draft_shapes(config).items() if n != "vocab_map"}
        missing = sorted(set(shapes) - set(weights))
        unknown = sorted(set(weights) - set(shapes))
        if missing or unknown:
            raise ValueError(f"draft weights do not match its config: missing {missing}, unexpected {unknown}")
        packed: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
        for name, arr in weights.items():
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if arr.shape != tuple(shapes[name]):
                raise ValueError(f"draft weight {name} has shape {arr.shape}, expected {tuple(shapes[name])}")
            dtype = "f32" if arr.ndim == 1 or backend != "cpu" else weights_dtype
            w = quantize(arr, dtype)
            packed[name] = (w.dtype, w.shape, np.ascontiguousarray(w.data))
        self.config = config
        self.target = target
        self._device = device
        cfg = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
               "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
               "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
               "num_layers": config.num_layers}
        # Committed draft positions never outnumber the target's; the tree adds scratch rows.
        if backend == "cpu":
            self._engine = _core.DraftEngine(cfg, packed, target._engine, context=target.context + max_batch,
                                             max_batch=max_batch, threads=threads or target.threads,
                                             vocab_map=vocab_map)
        else:
            self._engine = _core.DeviceDraftEngine(cfg, packed, target._engine, context=target.context + max_batch,
                                                   max_batch=max_batch, backend=backend, device=device_index,
                                                   graphs=graphs, vocab_map=vocab_map)
        self._on_device = backend != "cpu"
        # Greedy steps in one native call (a target wholly on the CPU); setting
        # native_greedy to False runs them through propose() and Python instead.
        self._native = _core.GreedySpeculator(target._engine, self._engine) if target.gpu_layers == 0 else None
        self.native_greedy = self._native is not None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, target: TargetEngine, **kw: Any) -> Draft:
        """Load a draft checkpoint directory (draft.json + draft.safetensors)."""
        from .draft_model import load_draft_weights
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"a draft is a checkpoint directory (a path) or a Draft, got {path!r}")
        config, weights = load_draft_weights(path)
        return cls(config, weights, target, **kw)

    @classmethod
    def from_module(cls, module, target: TargetEngine, **kw: Any) -> Draft:
        """From a :class:`dovetail_ext.draft_model.DovetailDraft` (e.g. freshly trained)."""
        weights = {k: v.detach().float().cpu().numpy() for k, v in module.state_weights().items()
                   if k != "vocab_map"}
        vocab_map = getattr(module, "vocab_map", None)
        if vocab_map is not None:
            weights["vocab_map"] = vocab_map.detach().cpu().numpy().astype(np.int64)
        return cls(module.config, weights, target, **kw)

    # -- the engine ------------------------------------------------------------------------
    def forward(self, features, tokens, positions, ancestors=None, append: bool = False, topk_rows=None,
                k: int = 1, return_hidden: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """One draft call: returns (hidden [T, D], top-k ids [R, k], top-k log-probs [R, k]).
        A device engine skips copying hidden back when ``return_hidden`` is false (None)."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        tokens, positions = np.asarray(tokens, dtype=np.int32), np.asarray(positions, dtype=np.int32)
        rows = None if topk_rows is None else np.asarray(topk_rows)
        if self._on_device:
            return self._engine.forward(features, None, tokens, positions, ancestors, append, rows, k,
                                        return_hidden=return_hidden)
        return self._engine.forward(features, tokens, positions, ancestors, append, rows, k)

    def _forward_rows(self, src_rows, prev_hidden, tokens, positions, ancestors, append, topk_rows, k):
        """A draft call whose features are rows of the output history (the outputs since the
        last call with append=False): on a device engine they never leave the device (and no
        hidden state comes back); on the CPU ``prev_hidden`` holds that history."""
        tokens, positions = np.asarray(tokens, dtype=np.int32), np.asarray(positions, dtype=np.int32)
        if self._on_device:
            _, ids, logp = self._engine.forward(None, np.asarray(src_rows, dtype=np.int32), tokens, positions,
                                                ancestors, append, np.asarray(topk_rows), k, return_hidden=False)
            return None, ids, logp
        return self._engine.forward(np.ascontiguousarray(prev_hidden[src_rows]), tokens, positions, ancestors,
                                    append, np.asarray(topk_rows), k)

    @property
    def device(self) -> str:
        return self._device

    @property
    def stats(self) -> dict | None:
        """Device engines: transfer bytes each way, copy time and graph replays."""
        return self._engine.stats if self._on_device else None

    def commit(self, kept=None) -> None:
        self._engine.commit(np.arange(self._engine.pending) if kept is None else np.asarray(kept, dtype=np.int64))

    def truncate(self, n: int) -> None:
        self._engine.truncate(n)

    @property
    def n_past(self) -> int:
        return self._engine.n_past

    @property
    def max_batch(self) -> int:
        return self._engine.max_batch

    def check_tree(self, params: TreeParams | AutoTree) -> None:
        """Refuse trees that do not fit the engines (a clear error instead of a failed call);
        for an :class:`AutoTree`, every shape."""
        if isinstance(params, AutoTree):
            for shape in params.shapes:
                self.check_tree(shape)
            return
        if params.total_tokens > self.target.max_batch:
            raise ValueError(f"tree of {params.total_tokens} tokens exceeds the target engine's max_batch "
                             f"{self.target.max_batch}")
        if params.scratch_rows > self._engine.max_batch:
            raise ValueError(f"tree top_k {params.top_k} x depth {params.depth} needs {params.scratch_rows} draft "
                             f"scratch rows, more than the draft engine's max_batch {self._engine.max_batch}")
        if params.top_k > self._engine.draft_vocab:
            raise ValueError(f"tree top_k {params.top_k} exceeds the draft's vocabulary of {self._engine.draft_vocab}")

    # -- one tree --------------------------------------------------------------------------
    def propose(self, features: np.ndarray, tokens: np.ndarray, params: TreeParams) -> Tree:
        """Take the newly accepted positions and grow a tree rooted at the last token.

        Args:
            features: target features [n, D] of the newly committed positions j.
            tokens: the next tokens x_{j+1} [n]; ``tokens[-1]`` is the root (the last
                accepted or bonus token, not yet seen by the target).
            params: tree shape.
        Returns:
            the tree (root first) whose drafted nodes are the best candidates.
        """
        n, start = len(tokens), self.n_past
        # 1. The new pairs (f_j, x_{j+1}) at positions start .. start+n-1, committed; the
        #    last output predicts the root's successor: the first frontier.
        for s in range(0, n, self.max_batch):
            e = min(n, s + self.max_batch)
            hidden, ids, logp = self.forward(features[s:e], tokens[s:e], np.arange(start + s, start + e),
                                             topk_rows=[e - s - 1] if e == n else None, k=self._root_k(params),
                                             return_hidden=not self._on_device)
            self.commit()
        self._hist = hidden  # the output history (rows since the last call with append=False)
        self._hist_len = e - s
        return self._grow(int(tokens[-1]), e - s - 1, ids[0], logp[0], params)

    def step_greedy(self, features: np.ndarray, tokens: np.ndarray, params: TreeParams,
                    rows: bool = False) -> tuple | None:
        """A whole greedy step in one native call: :meth:`propose`, the target's verification
        of the tree, greedy acceptance and the target's commit (the same trees and tokens as
        those steps in Python). Returns (emitted tokens: accepted + bonus, target features of
        the committed rows, tree size, draft / verify / accept seconds), with ``rows`` also
        the target's logits row each emitted token was chosen from [len(emitted), V]; or None
        where the native step does not apply (a partly offloaded target, or native_greedy off)."""
        if self._native is None or not self.native_greedy:
            return None
        self._last = None  # no tree for predraft
        return self._native.step(np.ascontiguousarray(features, dtype=np.float32), tokens, params.top_k,
                                 params.depth, params.total_tokens, params.min_score, rows)

    def _root_k(self, params: TreeParams) -> int:
        """Successors asked for at the root: top_k, plus the runner-up that only
        :meth:`predraft` uses (a guess when the draft's first choice is rejected)."""
        return min(params.top_k + 1, MAX_TOP_K, self._engine.draft_vocab)

    def _grow(self, root: int, root_row: int, ids: np.ndarray, logp: np.ndarray, params: TreeParams) -> Tree:
        """EAGLE-2 growth from a committed root whose output is history row ``root_row``
        and whose top-k successors are (ids, logp)."""
        k = params.top_k
        if params.depth == 1:
            return self._grow_one_level(root, root_row, ids, logp, params)
        root_pos = self.n_past  # the root's position; frontier level d runs at root_pos + d - 1
        pool = CandidatePool(root)
        frontier = pool.add(ids[:k], np.zeros(k, dtype=np.int64), logp[:k])
        runner_up = (float(logp[k]), int(ids[k])) if len(ids) > k else None
        cap = 2 + 2 * k + k * k * params.depth
        row_of = np.full(cap, -1, dtype=np.int64)   # pool index -> scratch row (expanded nodes)
        hist_of = np.full(cap, -1, dtype=np.int64)  # pool index -> output history row
        hist_of[0] = root_row
        scratch_anc = np.zeros((0, 0), dtype=bool)  # ancestor sets among expanded (scratch) nodes
        # Expand level by level: every child of every frontier node joins the pool; the best
        # top_k of them form the next frontier. Each node's input feature is its parent's
        # output (a history row).
        for level in range(1, params.depth):
            # Children score at most their parent: once the frontier cannot beat the pool's
            # (total_tokens-1)-th best, no later candidate can enter the tree.
            best = pool.scores[frontier].max()
            if best < pool.kth_best_score(params.total_tokens - 1) or best < params.min_score:
                break
            ids, logp, scratch_anc = self._expand(pool, frontier, root_pos + level - 1, row_of, hist_of,
                                                  scratch_anc, k)
            cum = pool.scores[frontier][:, None] + logp  # [k, k] cumulative log-probabilities
            cand = pool.add(ids.reshape(-1), np.repeat(frontier, k), cum.reshape(-1))
            best = np.lexsort((np.arange(cum.size), -cum.reshape(-1)))[:k]
            frontier = cand[best]
        # The best total_tokens - 1 candidates, ancestors first.
        keep = pool.selected(params.total_tokens, params.min_score)
        tree = pool.select(params.total_tokens, params.min_score, keep)
        self._last = dict(tree=tree, pool=pool, keep=keep, row_of=row_of, hist_of=hist_of, scratch_anc=scratch_anc,
                          root_pos=root_pos, params=params, runner_up=runner_up)
        return tree

    def _grow_one_level(self, root: int, root_row: int, ids: np.ndarray, logp: np.ndarray,
                        params: TreeParams) -> Tree:
        """:meth:`_grow` for depth 1, without the pool's machinery: the tree is the root and
        its best successors. The draft's top-k comes best first, which is the pool's ranking
        (ties keep that order), so the kept candidates are a prefix of it."""
        k = params.top_k
        scores = np.asarray(logp[:k], dtype=np.float64)
        n = min(params.total_tokens - 1, k, int(np.count_nonzero(scores >= params.min_score)))
        if k > 1 and not np.all(scores[:-1] >= scores[1:]):  # not best first: the general rule
            pool = CandidatePool(root)
            pool.add(ids[:k], np.zeros(k, dtype=np.int64), scores)
            keep = pool.selected(params.total_tokens, params.min_score)
        else:
            keep = np.arange(n + 1)
        tokens = np.concatenate([[root], np.asarray(ids[:k], dtype=np.int64)])
        tree = Tree(tokens=tokens[keep], **_star_structure(len(keep)))
        pool = CandidatePool.of(tokens, np.concatenate([[-1], np.zeros(k, dtype=np.int64)]),
                                np.concatenate([[0.0], scores]))
        cap = 2 + 2 * k + k * k  # as _grow's, for predraft
        hist_of = np.full(cap, -1, dtype=np.int64)
        hist_of[0] = root_row
        self._last = dict(tree=tree, pool=pool, keep=keep, row_of=np.full(cap, -1, dtype=np.int64),
                          hist_of=hist_of, scratch_anc=np.zeros((0, 0), dtype=bool), root_pos=self.n_past,
                          params=params, runner_up=(float(logp[k]), int(ids[k])) if len(ids) > k else None)
        return tree

    def _expand(self, pool, nodes, position, row_of, hist_of, scratch_anc, k):
        """One draft call over ``nodes`` (pool indices, all at one depth) as new scratch
        rows; records their rows; returns their top-k (ids, logp) and the new ancestor sets."""
        m, P = len(nodes), scratch_anc.shape[0]
        anc = np.zeros((m, P + m), dtype=bool)
        parent_rows = row_of[pool.parents[nodes]]
        has_parent = parent_rows >= 0
        anc[has_parent, :P] = scratch_anc[parent_rows[has_parent]]
        anc[np.arange(m), P + np.arange(m)] = True
        hidden, ids, logp = self._forward_rows(hist_of[pool.parents[nodes]], self._hist, pool.tokens[nodes],
                                               np.full(m, position), anc, True, np.arange(m), k)
        if not self._on_device:
            self._hist = np.concatenate([self._hist, hidden])
        row_of[nodes] = P + np.arange(m)
        hist_of[nodes] = self._hist_len + np.arange(m)
        self._hist_len += m
        return ids, logp, np.block([[scratch_anc, np.zeros((P, m), dtype=bool)], [anc]])

    # -- drafting ahead (overlap) -------------------------------------------------------------
    def predraft(self, tree: Tree) -> Predraft | None:
        """Guess the verification of ``tree`` (the last proposed one) and draft the next tree
        for that guess, while the target verifies.

        An outcome is an accepted path (root to some tree node u) and a bonus token x, a
        successor of u outside the tree; under the draft it has probability exp(score of x).
        The guess is the most likely outcome among the successors the draft has scored: the
        pool's candidates outside the tree, the root's runner-up, and the successors of the
        leaf ending the chain of best-scored children (one draft call, if that leaf was never
        expanded). The draft's own outputs stand in for the target features of the guessed
        positions.

        The draft then holds the guessed positions as committed; if verification disagrees,
        ``truncate(result.n_before)`` restores it. Returns None for a root-only tree or when
        the scratch space is full.
        """
        last = getattr(self, "_last", None)
        if last is None or last["tree"] is not tree or tree.size < 2:
            return None
        pool, keep, row_of, hist_of, params = last["pool"], last["keep"], last["row_of"], last["hist_of"], \
            last["params"]
        k = params.top_k
        in_tree = np.zeros(pool.size, dtype=bool)
        in_tree[keep] = True
        # Scored successors outside the tree whose parent is in it: (score, parent, token).
        outs = np.flatnonzero(~in_tree & in_tree[np.maximum(pool.parents, 0)])
        cands = [(float(pool.scores[c]), int(pool.parents[c]), int(pool.tokens[c])) for c in outs]
        if last["runner_up"] is not None:
            cands.append((last["runner_up"][0], 0, last["runner_up"][1]))
        # The chain of best-scored children from the root down to a leaf; expand that leaf.
        node = 0
        while True:
            kids = tree.children(node)
            if len(kids) == 0:
                break
            node = int(kids[np.argmax(pool.scores[keep[kids]])])
        leaf = int(keep[node])
        scratch = last["scratch_anc"]
        n_before = self.n_past
        if row_of[leaf] < 0 and scratch.shape[0] < self.max_batch and self._hist_len < 2 * self.max_batch:
            depth = int(tree.depths[node])
            ids, logp, scratch = self._expand(pool, np.array([leaf]), last["root_pos"] + depth - 1, row_of, hist_of,
                                              scratch, k)
            cands += [(float(pool.scores[leaf] + lp), leaf, int(t)) for t, lp in zip(ids[0], logp[0])]
        if not cands:
            return None
        _, u, bonus = max(cands, key=lambda c: c[0])
        u_node = int(np.searchsorted(keep, u))
        nodes = keep[tree.path_to(u_node)[1:]]  # pool indices of the guessed accepted tokens
        # Commit the guessed positions (their scratch rows, in order) ...
        self.commit(row_of[nodes])
        # ... then the pair (f_u, bonus) as the next tree's committed root pair, and grow.
        hidden, ids, logp = self._forward_rows(np.array([hist_of[u]]), self._hist, [bonus], [self.n_past], None,
                                               False, np.array([0]), self._root_k(params))
        self.commit()
        self._hist = hidden
        self._hist_len = 1
        nxt = self._grow(bonus, 0, ids[0], logp[0], params)
        return Predraft(accepted=[int(t) for t in pool.tokens[nodes]], bonus=bonus, tree=nxt, n_before=n_before)
