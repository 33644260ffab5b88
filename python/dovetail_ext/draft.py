"""The Dovetail draft at inference: a wrapper over the native draft engine and the
EAGLE-2 tree growth that drives it.

The draft shares the target engine's embedding table and LM head (the same packed memory).
Per speculative step it makes one call over the newly accepted positions (committed) and
one call per tree level over the frontier (scratch rows, dropped at the next step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .target import TargetEngine
from .tree import CandidatePool, Tree, TreeParams

__all__ = ["Draft"]


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


def _parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` / ``"emulated"`` -> (backend, device index)."""
    if device == "cpu":
        return "cpu", 0
    if device == "emulated":
        return "host", 0
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        index = device[5:] or "0"
        if not index.isdigit():
            raise ValueError(f"bad CUDA device {device!r}: use 'cuda' or 'cuda:N'")
        if not _core.cuda_compiled():
            raise ValueError(f"device={device!r} needs a build with CUDA (DOVETAIL_CUDA=ON); this build has none")
        if int(index) >= _core.cuda_device_count():
            raise ValueError(f"device={device!r}: {_core.cuda_device_count()} CUDA device(s) visible")
        return "cuda", int(index)
    raise ValueError(f"unsupported draft device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'emulated'")


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
        weights_dtype: storage of the draft's matrices on the CPU (``"f32"``, ``"bf16"``,
            ``"q8_0"``, ...); norms stay fp32. Ignored on the device engines (bf16).
        max_batch: scratch rows (the largest prompt chunk or tree the draft handles).
        graphs: record each call shape's GPU work once as a CUDA graph and replay it.
    """

    def __init__(self, config, weights: dict[str, np.ndarray], target: TargetEngine, *, device: str = "cpu",
                 weights_dtype: str = "f32", max_batch: int = 128, threads: int | None = None,
                 check_target: bool = True, graphs: bool = True) -> None:
        backend, device_index = _parse_device(device)
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

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, target: TargetEngine, **kw: Any) -> Draft:
        """Load a draft checkpoint directory (draft.json + draft.safetensors)."""
        from .draft_model import load_draft_weights
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
        """A draft call whose features are rows of the previous call's output: on a device
        engine they never leave the device (and no hidden state comes back)."""
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

    def check_tree(self, params: TreeParams) -> None:
        """Refuse trees that do not fit the engines (a clear error instead of a failed call)."""
        limit = min(self.target.max_batch, self._engine.max_batch)
        if params.total_tokens > self.target.max_batch:
            raise ValueError(f"tree of {params.total_tokens} tokens exceeds the target engine's max_batch "
                             f"{self.target.max_batch}")
        if params.scratch_rows > self._engine.max_batch:
            raise ValueError(f"tree top_k {params.top_k} x depth {params.depth} needs {params.scratch_rows} draft "
                             f"scratch rows, more than the draft engine's max_batch {self._engine.max_batch}")
        if params.top_k > self._engine.draft_vocab:
            raise ValueError(f"tree top_k {params.top_k} exceeds the draft's vocabulary of {self._engine.draft_vocab}")
        del limit

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
        n, k, start = len(tokens), params.top_k, self.n_past
        # 1. The new pairs (f_j, x_{j+1}) at positions start .. start+n-1, committed; the
        #    last output predicts the root's successor: the first frontier.
        for s in range(0, n, self.max_batch):
            e = min(n, s + self.max_batch)
            hidden, ids, logp = self.forward(features[s:e], tokens[s:e], np.arange(start + s, start + e),
                                             topk_rows=[e - s - 1] if e == n else None, k=k,
                                             return_hidden=not self._on_device)
            self.commit()
        root_pos = self.n_past  # the root's position; frontier level d runs at root_pos + d - 1

        pool = CandidatePool(int(tokens[-1]))
        frontier = pool.add(ids[0], np.zeros(k, dtype=np.int64), logp[0])
        # Each node's input feature is its parent's output: rows of the previous call.
        frontier_src = np.full(k, e - s - 1, dtype=np.int64)
        scratch_anc = np.zeros((0, 0), dtype=bool)  # ancestor sets among expanded (scratch) nodes
        row_of = np.full(1 + k + k * k * params.depth, -1, dtype=np.int64)  # pool index -> scratch row
        # 2. Expand level by level: every child of every frontier node joins the pool; the
        #    best top_k of them form the next frontier.
        for level in range(1, params.depth):
            # Children score at most their parent: once the frontier cannot beat the pool's
            # (total_tokens-1)-th best, no later candidate can enter the tree.
            best = pool.scores[frontier].max()
            if best < pool.kth_best_score(params.total_tokens - 1) or best < params.min_score:
                break
            P = scratch_anc.shape[0]
            anc = np.zeros((k, P + k), dtype=bool)
            parent_rows = row_of[pool.parents[frontier]]
            has_parent = parent_rows >= 0
            anc[has_parent, :P] = scratch_anc[parent_rows[has_parent]]
            anc[np.arange(k), P + np.arange(k)] = True
            hidden, ids, logp = self._forward_rows(frontier_src, hidden, pool.tokens[frontier],
                                                   np.full(k, root_pos + level - 1), anc, P > 0, np.arange(k), k)
            scratch_anc = np.block([[scratch_anc, np.zeros((P, k), dtype=bool)], [anc]])
            row_of[frontier] = P + np.arange(k)
            cum = pool.scores[frontier][:, None] + logp  # [k, k] cumulative log-probabilities
            cand = pool.add(ids.reshape(-1), np.repeat(frontier, k), cum.reshape(-1))
            best = np.lexsort((np.arange(cum.size), -cum.reshape(-1)))[:k]
            frontier, frontier_src = cand[best], best // k
        # 3. The best total_tokens - 1 candidates, ancestors first.
        return pool.select(params.total_tokens, params.min_score)
