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

With ``overlap``, the draft works during step 3: it guesses the outcome (the accepted path
and bonus token it finds most likely), commits that guess and drafts the next tree for it
(``Draft.predraft``). When verification agrees, the
next step verifies that tree at once, with no drafting in between; otherwise the guess is
undone. Either way the output is the target's: the tree only decides what is checked.

A :class:`Governor` decides per step whether to draft at all. A step without drafting
verifies the root alone: that is exactly a plain decoding step, so the output does not
change. The target's features for that position are kept, and the draft takes in all of
them at the next step that drafts. Drafting pays only while
(tokens per speculative step) / (time of a speculative step) beats 1 / (time of a plain
step). The governor measures both, keeps them as moving averages, and decodes plainly while
speculation is behind. Every so often it tries speculation again: a burst of steps whose
own mean tokens per step replaces the average (a stretch of hard text must not keep
speculation off after it has passed); the interval doubles while tries keep losing, and a
new generation where speculation was off starts with a try.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .draft import Draft, Predraft
from .sampling import SamplingParams, TokenChooser, accept_greedy, accept_sampled
from .target import TargetEngine
from .tree import AutoTree, Tree, TreeParams, build_tree

__all__ = ["SpecState", "SpecTimes", "Governor", "TreeSelector", "speculative_step", "verify_chain", "native_greedy"]


@dataclass
class SpecState:
    root: int                  # last emitted token; the next tree's root
    features: np.ndarray       # [n, D] target features the draft has not consumed
    next_tokens: np.ndarray    # [n] the token after each of those positions (ends with root)
    ready: Tree | None = None  # a tree drafted ahead for this root (overlap), verified next
    # The (feature rows [k, D], next tokens [k]) of steps the draft sat out (plain steps,
    # prompt-lookup chains), kept per step and joined to features / next_tokens once, when
    # the draft runs next (not copied again at every such step).
    backlog: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def join_backlog(self) -> None:
        if self.backlog:
            self.features = np.concatenate([self.features, *(f for f, _ in self.backlog)])
            self.next_tokens = np.concatenate([self.next_tokens, *(t for _, t in self.backlog)])
            self.backlog.clear()


@dataclass
class SpecTimes:
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    steps: int = 0
    drafted: int = 0           # drafted tokens verified
    accepted: int = 0          # drafted tokens accepted
    history: list[int] = field(default_factory=list)  # tokens emitted per step
    ahead_tries: int = 0       # overlap: trees drafted ahead
    ahead_hits: int = 0        # ... that verification agreed with (used without drafting)
    ahead_wait_s: float = 0.0  # time verification waited for the draft to finish ahead
    lookup_steps: int = 0      # steps that verified a prompt-lookup chain (no draft)
    lookup_drafted: int = 0    # ... tokens those chains held
    lookup_accepted: int = 0   # ... and how many of them were accepted

    def record_step(self, proposed: int = 0, accepted: int = 0, lookup: bool = False) -> None:
        """Counts of one step: the tokens it proposed (drafted or a lookup chain; 0 for a
        plain step) and accepted; it emitted those and one more."""
        self.steps += 1
        self.drafted += proposed
        self.accepted += accepted
        self.history.append(accepted + 1)
        if lookup:
            self.lookup_steps += 1
            self.lookup_drafted += proposed
            self.lookup_accepted += accepted


def _ema(old: float | None, new: float, alpha: float) -> float:
    """A moving average's next value (the first measurement starts it)."""
    return new if old is None else old + alpha * (new - old)


class Governor:
    """Per-step choice between drafting and a plain step, from measured rates.

    One governor serves the generations of one generator, draft and tree in turn (the rates
    carry over). Two kinds of speculative step are not timed, though both count towards the
    tokens per speculative step: the first of each generation (it includes the draft's pass
    over the prompt) and the first after plain steps (the draft catches up on them).

    Args:
        alpha: weight of the newest measurement in the moving averages (small: one step's
            tokens are 1 or more, and a short unlucky run must not end speculation).
        margin: speculation is given up only when it is slower than plain steps by more
            than this fraction (near break-even either choice costs little).
        probe_min, probe_max: the plain steps between two speculative tries; the interval
            starts at ``probe_min`` and doubles up to ``probe_max`` while tries lose.
        probe_len: speculative steps in one try; it is judged when complete, on its own
            mean tokens per step.
    """

    def __init__(self, alpha: float = 0.05, margin: float = 0.05, probe_min: int = 2,
                 probe_max: int = 128, probe_len: int = 8) -> None:
        if not 0.0 < alpha <= 1.0 or not 0.0 <= margin < 1.0 or not 1 <= probe_min <= probe_max or probe_len < 1:
            raise ValueError(f"Governor needs 0 < alpha <= 1, 0 <= margin < 1, 1 <= probe_min <= probe_max and "
                             f"probe_len >= 1, got alpha={alpha}, margin={margin}, probe_min={probe_min}, "
                             f"probe_max={probe_max}, probe_len={probe_len}")
        self.alpha, self.margin, self.probe_min, self.probe_max = alpha, margin, probe_min, probe_max
        self.probe_len = probe_len
        self.tau: float | None = None          # tokens per speculative step
        self.spec_s: float | None = None       # seconds per steady speculative step
        self.plain_s: float | None = None      # seconds per plain step
        self.wait = 0                          # plain steps left before the next try
        self.backoff = probe_min
        self.plain_steps = 0
        self._timed = False                    # the next speculative step is timed
        self._probing = False                  # the current speculative steps are a try
        self._burst = [0, 0]                   # speculative steps in a row, and their tokens

    def new_sequence(self) -> None:
        """A new generation starts: its first speculative step (the draft's pass over the
        prompt) is not timed; the rates and the interval carry over. If speculation was off,
        the generation starts with a try (new text, new acceptance)."""
        self._timed = False
        if self.wait > 0 or self._probing:
            self.wait, self._probing, self._burst = 0, True, [0, 0]

    def _ema(self, old: float | None, new: float) -> float:
        return _ema(old, new, self.alpha)

    def speculation_pays(self) -> bool | None:
        """Whether speculative steps emit tokens at least (1 - margin) times as fast as plain
        steps (None: not measured yet)."""
        if self.tau is None or self.spec_s is None or self.plain_s is None:
            return None
        return self.tau * self.plain_s >= (1.0 - self.margin) * self.spec_s

    def drafting(self) -> bool:
        """Whether the next step drafts."""
        if self.tau is None or self.spec_s is None:
            return True   # measure speculation first
        if self.plain_s is None:
            return False  # then one plain step
        return self.wait == 0

    def sat_out(self) -> None:
        """A step the draft had no part in (a prompt-lookup chain): the rates are left as
        they are, and the next drafting step, which catches up on it, is not timed."""
        self._timed = False

    def record(self, drafted: bool, seconds: float, emitted: int) -> None:
        """One step's outcome: whether it drafted, its time and the tokens it emitted."""
        if not drafted:
            self.plain_s = self._ema(self.plain_s, seconds)
            self.plain_steps += 1
            self.wait = max(0, self.wait - 1)
            self._timed = False
            self._burst = [0, 0]
            return
        self._burst[0] += 1
        self._burst[1] += emitted
        if self._probing and self._burst[0] >= self.probe_len:  # a complete try: its own mean
            self.tau, self._probing = self._burst[1] / self._burst[0], False
        else:
            self.tau = self._ema(self.tau, float(emitted))
        if self._timed:
            self.spec_s = self._ema(self.spec_s, seconds)
        self._timed = True
        if self._probing:
            return  # a try is judged when complete
        pays = self.speculation_pays()
        if pays is False:
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, self.probe_max)
            self._probing = True
        elif pays:
            self.backoff = self.probe_min


class TreeSelector:
    """Per-step choice of the tree shape among ``AutoTree.shapes``, from measured rates.

    Each shape keeps moving averages of the tokens a drafting step with it emits and of
    the step's time. The selector stays on its current shape; every ``auto.interval``
    drafting steps it tries a neighbour (one size up, then one down, alternating) for
    ``auto.probe_len`` steps, and moves there when the try emitted tokens faster, by more
    than ``margin``, than the current shape's averages. The interval doubles (up to
    ``interval_max``) while tries lose and returns to ``auto.interval`` after a move. Only
    timed steps count: a drafting step right after a plain or lookup step (the draft
    catching up) is left out. The output does not depend on the shapes chosen, only the
    speed does.
    """

    def __init__(self, auto: AutoTree, alpha: float = 0.05, margin: float = 0.03, interval_max: int = 512) -> None:
        if not isinstance(auto, AutoTree):
            raise ValueError(f"TreeSelector needs an AutoTree, got {auto!r}")
        if not 0.0 < alpha <= 1.0 or not 0.0 <= margin < 1.0 or interval_max < auto.interval:
            raise ValueError(f"TreeSelector needs 0 < alpha <= 1, 0 <= margin < 1 and interval_max >= the "
                             f"AutoTree's interval {auto.interval}, got alpha={alpha}, margin={margin}, "
                             f"interval_max={interval_max}")
        self.shapes = auto.shapes
        self.current = auto.start
        self.alpha, self.margin, self.probe_len = alpha, margin, auto.probe_len
        self.interval_min, self.interval_max = auto.interval, interval_max
        self.interval = auto.interval
        self.tokens: list[float | None] = [None] * len(self.shapes)   # tokens per timed step
        self.seconds: list[float | None] = [None] * len(self.shapes)  # seconds per timed step
        self.trying: int | None = None
        self.moves = 0
        self._countdown = auto.interval
        self._up = True
        self._burst = [0, 0, 0.0]  # steps, tokens, seconds of the current try

    def shape(self) -> TreeParams:
        """The shape for the next drafting step."""
        return self.shapes[self.current if self.trying is None else self.trying]

    def rate(self, i: int) -> float | None:
        """Tokens per second of drafting steps with shape i (None: not measured)."""
        if self.tokens[i] is None or not self.seconds[i]:
            return None
        return self.tokens[i] / self.seconds[i]

    def record(self, emitted: int, seconds: float, timed: bool) -> None:
        """One drafting step with :meth:`shape`: the tokens it emitted and its time;
        ``timed`` False for a step that also caught the draft up."""
        if not timed:
            return
        if self.trying is None:
            i = self.current
            self.tokens[i] = _ema(self.tokens[i], float(emitted), self.alpha)
            self.seconds[i] = _ema(self.seconds[i], seconds, self.alpha)
            self._countdown -= 1
            if self._countdown <= 0:
                self._start_try()
            return
        b = self._burst
        b[0], b[1], b[2] = b[0] + 1, b[1] + emitted, b[2] + seconds
        if b[0] >= self.probe_len:
            self._judge_try()

    def _start_try(self) -> None:
        up, down = self.current + 1, self.current - 1
        order = [up, down] if self._up else [down, up]
        self._up = not self._up
        j = next((k for k in order if 0 <= k < len(self.shapes)), None)
        if j is None:  # a single shape: nothing to try
            self._countdown = self.interval
            return
        self.trying, self._burst = j, [0, 0, 0.0]

    def _judge_try(self) -> None:
        j, (n, tok, sec) = self.trying, self._burst
        self.trying = None
        self.tokens[j], self.seconds[j] = tok / n, sec / n
        mine = self.rate(self.current)
        if mine is not None and sec > 0 and tok / sec > (1.0 + self.margin) * mine:
            self.current, self.moves, self.interval = j, self.moves + 1, self.interval_min
        else:
            self.interval = min(2 * self.interval, self.interval_max)
        self._countdown = self.interval


class _Ahead(threading.Thread):
    """Draft.predraft on its own thread, while the target verifies on this one."""

    def __init__(self, draft: Draft, tree: Tree) -> None:
        super().__init__(name="dovetail-predraft", daemon=True)
        self.draft, self.tree = draft, tree
        self.result: Predraft | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.draft.predraft(self.tree)
        except BaseException as e:  # handed to the caller
            self.error = e


def speculative_step(state: SpecState, target: TargetEngine, draft: Draft, params: TreeParams,
                     sampling: SamplingParams, chooser: TokenChooser,
                     times: SpecTimes, overlap: bool = False, drafting: bool = True,
                     chain: list[int] | None = None, shaper=None,
                     rows: list | None = None) -> tuple[list[int], np.ndarray]:
    """Run one step. Returns the tokens it emits (accepted drafted tokens + bonus) and the
    target features [len(path), D] of the positions it committed (the root and the
    accepted tokens). With ``drafting`` False (and no tree drafted ahead) the root is
    verified alone, a plain step; the draft takes its features in at the next drafting step.
    A ``chain`` of proposed tokens (prompt lookup, :mod:`.lookup`) is verified after the
    root instead of a drafted tree, the draft sitting the step out in the same way. A
    ``shaper`` (:class:`~dovetail_ext.sampling.LogitShaper`: penalties, a grammar) shapes
    the target's logits at every verified node after the path to it (it is left at the
    root: the caller consumes the emitted tokens). With a ``rows`` list, it is set to the
    target's logits row each emitted token was chosen from (the same bits as plain
    decoding's rows there: the kernels are batch invariant)."""
    t0 = time.perf_counter()
    if state.ready is None and chain:
        return _chain_step(state, target, chain, sampling, chooser, times, t0, shaper, rows)
    if not drafting and state.ready is None:
        return _plain_step(state, target, chooser, times, t0, shaper, rows)
    state.join_backlog()
    room = target.context - target.n_past  # KV slots left for the tree
    if sampling.greedy and not overlap and state.ready is None and room >= params.total_tokens \
            and shaper is None:
        step_greedy = getattr(draft, "step_greedy", None)  # (drafts in tests may lack it)
        native = step_greedy(state.features, state.next_tokens, params, rows is not None) if step_greedy else None
        if native is not None:  # the whole step in one native call
            emitted, feats, size, draft_s, verify_s = native[:5]
            if rows is not None:
                rows[:] = list(native[6])
            state.features, state.next_tokens, state.root = feats, emitted, int(emitted[-1])
            times.draft_s += draft_s
            times.verify_s += verify_s
            times.accept_s += time.perf_counter() - t0 - draft_s - verify_s  # with the call's own overhead
            times.record_step(size - 1, len(emitted) - 1)
            return emitted.tolist(), feats
    tree, state.ready = state.ready, None
    drafted = tree is not None or room >= 2
    if tree is None:
        if drafted:
            shape = params if room >= params.total_tokens else TreeParams(params.top_k, params.depth, room)
            tree = draft.propose(state.features, state.next_tokens, shape)
        else:  # one slot left: verify the root alone; the draft's pairs wait
            tree = build_tree([state.root], [-1])
    t1 = time.perf_counter()

    ahead = _Ahead(draft, tree) if overlap and drafted and tree.size > 1 else None
    try:
        if ahead is not None:
            ahead.start()
        # One target call over the whole tree: every node sees the prefix and its ancestors.
        nodes = np.arange(tree.size)
        logits, feats = target.forward(tree.tokens, tree.positions(target.n_past), tree.ancestors,
                                       logit_rows=nodes, feature_rows=nodes)
    finally:
        if ahead is not None:  # the draft is never left running on its own
            tw = time.perf_counter()
            ahead.join()
            times.ahead_wait_s += time.perf_counter() - tw
    t2 = time.perf_counter()
    if ahead is not None and ahead.error is not None:
        raise ahead.error

    path, accepted, bonus = _accept_and_commit(target, tree, logits, sampling, chooser, shaper)
    if rows is not None:
        rows[:] = list(logits[path])
    # The draft consumes pairs (f_j, x_{j+1}) for the committed path: features of the path
    # rows, each followed by the next path token and finally the bonus (the new root).
    new_tokens = np.array(accepted + [bonus], dtype=np.int64)
    pre = ahead.result if ahead is not None else None
    if pre is not None:
        times.ahead_tries += 1
        if pre.accepted == accepted and pre.bonus == bonus and pre.tree.size <= target.context - target.n_past:
            # The guess held: the draft already holds these positions and the next tree.
            times.ahead_hits += 1
            state.ready = pre.tree
            state.features, state.next_tokens = feats[:0], new_tokens[:0]
        else:
            draft.truncate(pre.n_before)
            pre = None
    if pre is None:
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
    times.record_step(tree.size - 1, len(accepted))
    return accepted + [bonus], feats[path]


def native_greedy(target, tokens, parents, sampling: SamplingParams, shaper, features: bool,
                  rows: bool) -> tuple | None:
    """The tree verified, accepted and committed in one native call
    (:meth:`~dovetail_ext.target.TargetEngine.verify_greedy`) where that gives what the
    Python path would: greedy, nothing shaping the logits, and a target that has it (a
    sequence of a :class:`~dovetail_ext.batching.SequenceBatcher` has not: its one-token
    steps join the batch through ``forward``). None where the caller verifies in Python."""
    verify = getattr(target, "verify_greedy", None)
    if verify is None or not sampling.greedy or shaper is not None:
        return None
    return verify(tokens, parents, features, rows)


def _plain_step(state: SpecState, target: TargetEngine, chooser: TokenChooser, times: SpecTimes,
                t0: float, shaper=None, rows: list | None = None) -> tuple[list[int], np.ndarray]:
    """A step that does not draft: plain decoding of the root (the same call and the same
    choice as plain decoding), keeping its target features for the draft's next step."""
    native = native_greedy(target, [state.root], [-1], chooser.params, shaper, True, rows is not None)
    if native is not None:  # the call, the argmax and the commit in one native call
        (bonus,), feats, _, logits = native
        t1 = time.perf_counter()
    else:
        logits, feats = target.forward([state.root], feature_rows=[0])
        t1 = time.perf_counter()
        bonus = chooser(logits[0] if shaper is None else shaper(logits[0]))
        target.commit()
    if rows is not None:
        rows[:] = [logits[0]]
    state.backlog.append((feats, np.array([bonus], dtype=np.int64)))
    state.root = bonus
    times.verify_s += t1 - t0
    times.accept_s += time.perf_counter() - t1
    times.record_step()
    return [bonus], feats


def verify_chain(target: TargetEngine, root: int, chain: list[int], sampling: SamplingParams,
                 chooser: TokenChooser, features: bool = True,
                 shaper=None, rows: list | None = None) -> tuple[list[int], list[int], np.ndarray | None]:
    """Verify the root and a proposed chain in one target call (the chain must fit the KV
    room left), accept by the same rule as drafted trees (each chain token is a
    deterministic proposal) and commit. Returns (the accepted chain tokens, the emitted
    tokens: those and the bonus, target features of the committed rows when ``features``);
    ``rows`` as in :func:`speculative_step`."""
    if len(chain) + 1 > target.context - target.n_past:
        raise ValueError(f"a chain of {len(chain)} tokens after the root does not fit the "
                         f"{target.context - target.n_past} KV slots left")
    tokens, parents = [root, *chain], list(range(-1, len(chain)))
    native = native_greedy(target, tokens, parents, sampling, shaper, features, rows is not None)
    if native is not None:  # the call, the acceptance and the commit in one native call
        emitted, feats, _, logits = native
        if rows is not None:
            rows[:] = list(logits)
        return emitted[:-1], emitted, feats
    tree = build_tree(tokens, parents)
    nodes = np.arange(tree.size)
    logits, feats = target.forward(tree.tokens, tree.positions(target.n_past), tree.ancestors,
                                   logit_rows=nodes, feature_rows=nodes if features else None)
    path, accepted, bonus = _accept_and_commit(target, tree, logits, sampling, chooser, shaper)
    if rows is not None:
        rows[:] = list(logits[path])
    return accepted, accepted + [bonus], feats[path] if features else None


def _accept_and_commit(target: TargetEngine, tree: Tree, logits: np.ndarray, sampling: SamplingParams,
                       chooser: TokenChooser, shaper=None) -> tuple[np.ndarray, list[int], int]:
    """Greedy or lossless sampled acceptance of a verified tree, and the target's commit of
    the accepted path. Returns (path of node indices, accepted drafted tokens, bonus)."""
    if sampling.greedy:
        path, bonus = accept_greedy(tree, logits, shaper)
    else:
        path, bonus = accept_sampled(tree, logits, sampling, chooser, shaper)
    target.commit(path)
    return path, tree.tokens[path[1:]].tolist(), bonus


def _chain_step(state: SpecState, target: TargetEngine, chain: list[int], sampling: SamplingParams,
                chooser: TokenChooser, times: SpecTimes, t0: float, shaper=None,
                rows: list | None = None) -> tuple[list[int], np.ndarray]:
    """A step that verifies a proposed chain (:func:`verify_chain`) without the draft: its
    pairs wait in the backlog like a plain step's."""
    chain = list(chain)[:max(0, target.context - target.n_past - 1)]
    accepted, emitted, feats = verify_chain(target, state.root, chain, sampling, chooser, shaper=shaper, rows=rows)
    state.backlog.append((feats, np.array(emitted, dtype=np.int64)))
    state.root = emitted[-1]
    times.verify_s += time.perf_counter() - t0  # (with the acceptance: no draft time to set apart)
    times.record_step(len(chain), len(accepted), lookup=True)
    return emitted, feats
