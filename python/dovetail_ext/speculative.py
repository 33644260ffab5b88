"""One Dovetail speculative decoding step: draft -> verify -> accept -> commit.

    state: committed tokens in the target's KV, the draft's KV, the root (the last
           emitted token, not yet seen by the target), and the target features of the
           positions the draft has not consumed yet.
    1. draft.propose(features, tokens)             -> tree: tokens[K], parents[K]
    2. tree: ancestors, positions = n_past + depth  (tree.py)
    3. target.forward(tree tokens, positions, ancestors) -> logits[K], features[K]
    4. accept (greedy or lossless sampling)         -> path, bonus token
    5. target.commit(path); the path's features go to the draft with the next tokens
    6. emit the accepted drafted tokens and the bonus
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .draft import Draft
from .sampling import SamplingParams, TokenChooser, accept_greedy, accept_sampled
from .target import TargetEngine
from .tree import TreeParams, build_tree

__all__ = ["SpecState", "SpecTimes", "speculative_step"]


@dataclass
class SpecState:
    root: int                  # last emitted token; the next tree's root
    features: np.ndarray       # [n, D] target features the draft has not consumed
    next_tokens: np.ndarray    # [n] the token after each of those positions (ends with root)


@dataclass
class SpecTimes:
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    steps: int = 0
    drafted: int = 0           # drafted tokens verified
    accepted: int = 0          # drafted tokens accepted
    history: list[int] = field(default_factory=list)  # tokens emitted per step


def speculative_step(state: SpecState, target: TargetEngine, draft: Draft, params: TreeParams,
                     sampling: SamplingParams, chooser: TokenChooser,
                     times: SpecTimes) -> tuple[list[int], np.ndarray]:
    """Run one step. Returns the tokens it emits (accepted drafted tokens + bonus) and the
    target features [len(path), D] of the positions it committed (the root and the
    accepted tokens)."""
    t0 = time.perf_counter()
    room = target.context - target.n_past  # KV slots left for the tree
    drafted = room >= 2
    if drafted:
        shape = params if room >= params.total_tokens else TreeParams(params.top_k, params.depth, room)
        tree = draft.propose(state.features, state.next_tokens, shape)
    else:  # one slot left: verify the root alone; the draft's pairs wait
        tree = build_tree([state.root], [-1])
    t1 = time.perf_counter()

    # One target call over the whole tree: every node sees the prefix and its ancestors.
    rows = np.arange(tree.size)
    logits, feats = target.forward(tree.tokens, tree.positions(target.n_past), tree.ancestors,
                                   logit_rows=rows, feature_rows=rows)
    t2 = time.perf_counter()

    if sampling.greedy:
        path, bonus = accept_greedy(tree, logits)
    else:
        path, bonus = accept_sampled(tree, logits, sampling, chooser)
    target.commit(path)
    accepted = tree.tokens[path[1:]].tolist()
    # The draft consumes pairs (f_j, x_{j+1}) for the committed path: features of the path
    # rows, each followed by the next path token and finally the bonus (the new root).
    new_tokens = np.array(accepted + [bonus], dtype=np.int64)
    if drafted:
        state.features, state.next_tokens = feats[path], new_tokens
    else:
        state.features = np.concatenate([state.features, feats[path]])
        state.next_tokens = np.concatenate([state.next_tokens, new_tokens])
    state.root = bonus
    t3 = time.perf_counter()

    times.draft_s += t1 - t0
    times.verify_s += t2 - t1
    times.accept_s += t3 - t2
    times.steps += 1
    times.drafted += tree.size - 1
    times.accepted += len(accepted)
    times.history.append(len(accepted) + 1)
    return accepted + [bonus], feats[path]
