"""Speculative decoding is lossless: greedy output equals plain greedy output token for
token, sampled output has exactly the target's distribution; trees, acceptance and KV
commit; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.sampling import SamplingParams, TokenChooser, accept_greedy, accept_sampled, target_probs
from dovetail_ext.speculative import Governor, SpecState, SpecTimes, TreeSelector, speculative_step
from dovetail_ext.target import TargetEngine
from dovetail_ext.tree import AutoTree, CandidatePool, TreeParams, build_tree
from native_helpers import make_source, random_tree, random_weights, tiny_config, tree_ancestors, tree_depths

SHAPES = [TreeParams(10, 7, 16), TreeParams(1, 6, 7), TreeParams(6, 2, 12), TreeParams(3, 4, 9), TreeParams(2, 1, 2),
          TreeParams(4, 4, 8, min_prob=0.02)]


def tiny_target(vocab=301, seed=1, dtype="q8_0", context=256, embd_scale=1.0, window=0):
    cfg = tiny_config(gqa=3, tied=True, vocab=vocab, window=window)
    weights = random_weights(cfg, seed=seed)
    weights["token_embd"] *= embd_scale  # smaller: a flatter next-token distribution
    src = make_source(cfg, weights, dtype)
    return src, TargetEngine(src, context=context, threads=1)  # tiny: threads would only add sync cost


def random_draft(src, target, seed=0, std=0.2, layers=1, **kw):
    return Draft.from_module(DovetailDraft.random(DraftConfig.for_target(src, num_layers=layers), seed=seed, std=std),
                             target, **kw)


def plain_greedy(target, prompt, n):
    target.reset()
    logits, _ = target.forward(prompt); target.commit()
    out = [int(logits[0].argmax())]
    while len(out) < n:
        logits, _ = target.forward(out[-1:]); target.commit()
        out.append(int(logits[0].argmax()))
    return out


def start_state(target, draft_or_none, prompt, first):
    target.reset()
    if draft_or_none is not None:
        draft_or_none.truncate(0)
    _, feats = target.forward(prompt, feature_rows=range(len(prompt))); target.commit()
    return SpecState(root=first, features=feats, next_tokens=np.array(list(prompt[1:]) + [first]))


def check_greedy_equals_plain(target, draft, params, rng, trials, vocab, max_prompt, times, n=40,
                              drafting=lambda state: True, overlap=False):
    """Random prompts from ``rng``: greedy speculation (each step drafting as ``drafting``
    says) emits exactly plain greedy decoding's first ``n`` tokens."""
    for trial in range(trials):
        prompt = rng.integers(0, vocab, int(rng.integers(2, max_prompt))).tolist()
        truth = plain_greedy(target, prompt, n)
        state = start_state(target, draft, prompt, truth[0])
        out = [truth[0]]
        while len(out) < n:
            emitted, _ = speculative_step(state, target, draft, params, SamplingParams(),
                                          TokenChooser(SamplingParams()), times, overlap=overlap,
                                          drafting=drafting(state))
            out += emitted
        assert out[:n] == truth


class OracleDraft:
    """Proposes random trees that contain the target's true greedy continuation with some
    probability at random sibling ranks, so every acceptance length and branch occurs."""

    def __init__(self, truth, rng, vocab):
        self.truth, self.rng, self.vocab, self.k = truth, rng, vocab, 0

    def propose(self, features, tokens, params):
        root_index = self.k
        toks, parents = [self.truth[root_index]], [-1]
        cur, depth = 0, 0
        while len(toks) < params.total_tokens and depth < params.depth:
            depth += 1
            want = self.truth[root_index + depth] if root_index + depth < len(self.truth) else None
            n = int(self.rng.integers(1, 4))
            pool = [t for t in self.rng.permutation(self.vocab)[:n + 1].tolist() if t != want][:n]
            if want is not None and self.rng.random() < 0.8:
                pool.insert(int(self.rng.integers(0, len(pool) + 1)), want)
            nxt = None
            for t in pool:
                if len(toks) >= params.total_tokens:
                    break
                toks.append(t); parents.append(cur)
                if t == want:
                    nxt = len(toks) - 1
            if nxt is None:
                break
            cur = nxt
        return build_tree(toks, parents)

    def advance(self, emitted):
        self.k += emitted


def test_build_tree_and_pool():
    t = build_tree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 3])
    np.testing.assert_array_equal(t.depths, [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(t.leaves, [2, 4])
    np.testing.assert_array_equal(t.path_to(4), [0, 1, 3, 4])
    np.testing.assert_array_equal(t.ancestors, tree_ancestors(np.array([-1, 0, 0, 1, 3])))
    rng = np.random.default_rng(0)
    for T in (1, 2, 9, 40):
        parents = random_tree(rng, T)
        t = build_tree(np.arange(T), parents)
        np.testing.assert_array_equal(t.ancestors, tree_ancestors(parents))
        np.testing.assert_array_equal(t.depths, tree_depths(parents))
    pool = CandidatePool(1)
    pool.add([10, 11], [0, 0], [-0.1, -0.5])
    pool.add([12, 13, 14, 15], [1, 1, 2, 2], [-0.2, -1.0, -0.6, -0.55])
    tree = pool.select(4)
    np.testing.assert_array_equal(tree.tokens, [1, 10, 11, 12])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 0, 1])
    pool = CandidatePool(1)  # ties: a child with its parent's score still comes after it
    pool.add([3], [0], [0.0]); pool.add([4], [1], [0.0]); pool.add([5], [0], [0.0])
    np.testing.assert_array_equal(pool.select(3).tokens, [1, 3, 4])
    for bad in ([[1, 2], [0, 0]], [[1, 2], [-1, 1]], [[1, 2, 3], [-1, 2, 0]]):
        with pytest.raises(ValueError):
            build_tree(*bad)
    with pytest.raises(ValueError, match="total_tokens"):
        TreeParams(total_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        TreeParams(top_k=0)


def _accept_greedy_by_sets(tree, logits):
    """accept_greedy's rule from the ancestor sets: a node is accepted when every node on its
    path (itself included) holds the target's argmax at its parent; the deepest one wins."""
    best = np.argmax(logits, axis=-1)
    ok = np.ones(tree.size, dtype=bool)
    ok[1:] = tree.tokens[1:] == best[tree.parents[1:]]
    accepted = ~np.any(tree.ancestors & ~ok[None, :], axis=1)
    last = int(np.flatnonzero(accepted)[np.argmax(tree.depths[accepted])])
    return tree.path_to(last), int(best[last])


def test_accept_greedy_matches_the_ancestor_set_rule():
    rng = np.random.default_rng(3)
    for trial in range(300):
        K = int(rng.integers(1, 40))
        parents = random_tree(rng, K)
        # distinct tokens among siblings, drawn from a small vocabulary so that matches happen
        tokens = np.zeros(K, dtype=np.int64)
        for u in range(K):
            kids = np.flatnonzero(parents == u)
            tokens[kids] = rng.permutation(6)[:len(kids)] if len(kids) <= 6 else rng.permutation(len(kids))
        tree = build_tree(tokens, parents)
        logits = rng.standard_normal((K, 48)).astype(np.float32)
        for u in range(K):  # the target mostly agrees with one of the drafted children
            kids = np.flatnonzero(parents == u)
            if len(kids) and rng.random() < 0.8:
                logits[u, tokens[rng.choice(kids)]] += 4.0
        path, bonus = accept_greedy(tree, logits)
        ref_path, ref_bonus = _accept_greedy_by_sets(tree, logits)
        np.testing.assert_array_equal(path, ref_path)
        assert bonus == ref_bonus


def test_one_level_growth_equals_the_pool_rule():
    """Depth-1 trees skip the candidate pool; they hold what the pool would select: the
    best total_tokens - 1 successors at or above min_prob, ties in the draft's order."""
    src, target = tiny_target()
    draft = random_draft(src, target)
    rng = np.random.default_rng(5)
    for trial in range(200):
        k = int(rng.integers(1, 7))
        total = int(rng.integers(2, 9))
        min_prob = float(rng.choice([0.0, 0.05, 0.3]))
        params = TreeParams(k, 1, total, min_prob)
        logp = np.sort(np.log(rng.dirichlet(np.ones(k + 1))))[::-1].astype(np.float32)
        if trial % 3 == 0:  # ties
            logp[1:] = logp[1]
        if trial % 7 == 0:  # not best first: the general rule applies
            logp = rng.permutation(logp)
        ids = rng.permutation(300)[:k + 1].astype(np.int32)
        tree = draft._grow_one_level(int(rng.integers(0, 300)), 0, ids, logp, params)
        pool = CandidatePool(int(tree.tokens[0]))
        pool.add(ids[:k], np.zeros(k, dtype=np.int64), logp[:k])
        ref = pool.select(total, params.min_score)
        for name in ("tokens", "parents", "depths", "ancestors", "leaves"):
            np.testing.assert_array_equal(getattr(tree, name), getattr(ref, name), err_msg=name)
        assert draft._last["tree"] is tree and draft._last["keep"].tolist() == pool.selected(
            total, params.min_score).tolist()


@pytest.mark.parametrize("params", SHAPES[:4], ids=str)
def test_greedy_with_oracle_trees_equals_plain(params):
    """Random trees that contain the right continuation at random ranks and depths."""
    src, target = tiny_target()
    rng = np.random.default_rng(3)
    lengths = []
    for trial in range(6):
        prompt = rng.integers(0, 301, int(rng.integers(3, 20))).tolist()
        truth = plain_greedy(target, prompt, 80)
        oracle = OracleDraft(truth, rng, 301)
        state = start_state(target, None, prompt, truth[0])
        out, times = [truth[0]], SpecTimes()
        while len(out) < 60:
            emitted, _ = speculative_step(state, target, oracle, params, SamplingParams(), TokenChooser(SamplingParams()),
                                          times)
            oracle.advance(len(emitted))
            out += emitted
        assert out[:60] == truth[:60]
        lengths += times.history
        # after speculation the target's KV equals plain decoding of the same tokens
        n = target.n_past
        plain = TargetEngine(src, context=256, threads=1)
        plain.forward(prompt + out[:n - len(prompt)]); plain.commit()
        for layer in range(src.config.num_layers):
            for a, b in zip(target.read_kv(layer), plain.read_kv(layer)):
                np.testing.assert_array_equal(a, b)
    assert max(lengths) >= min(4, params.depth)  # long acceptances happened
    assert np.mean(lengths) > 1.5


@pytest.mark.parametrize("native", [True, False], ids=["native-step", "python-step"])
@pytest.mark.parametrize("params", SHAPES, ids=str)
def test_greedy_with_native_draft_equals_plain(params, native):
    """Greedy steps in one native call (GreedySpeculator) and through Python's propose /
    verify / accept: both emit plain greedy decoding's tokens."""
    src, target = tiny_target()
    draft = random_draft(src, target)
    draft.native_greedy = native
    check_greedy_equals_plain(target, draft, params, np.random.default_rng(5), trials=4, vocab=301, max_prompt=30,
                              times=SpecTimes())


@pytest.mark.parametrize("params", SHAPES, ids=str)
def test_greedy_with_a_sliding_window_target_equals_plain(params):
    """A Gemma 3 target whose local layers see 7 positions: trees deeper than the window and
    prompts longer than it, through the native greedy step."""
    src, target = tiny_target(window=7)
    check_greedy_equals_plain(target, random_draft(src, target), params, np.random.default_rng(6), trials=3,
                              vocab=301, max_prompt=30, times=SpecTimes())


@pytest.mark.parametrize("params", SHAPES + [TreeParams(3, 4, 30, min_prob=0.05), TreeParams(1, 1, 2)], ids=str)
def test_native_tree_growth_equals_python(params):
    """GreedySpeculator grows exactly Draft.propose's trees (tokens and parents) from the
    same draft state, and a native step emits what a Python step emits, with the same
    target features."""
    from dovetail_ext import _core
    src, target = tiny_target()
    draft = random_draft(src, target, std=0.5)
    spec = _core.GreedySpeculator(target._engine, draft._engine)
    rng = np.random.default_rng(8)
    D = src.config.hidden_size
    sizes = []
    for trial in range(12):
        n = int(rng.integers(1, 6))
        feats = rng.standard_normal((n, D)).astype(np.float32)
        toks = rng.integers(0, 301, n)
        n0 = draft.n_past
        tree = draft.propose(feats, toks, params)
        draft.truncate(n0)
        tokens, parents = spec.propose(feats, toks, params.top_k, params.depth, params.total_tokens, params.min_score)
        np.testing.assert_array_equal(tokens, tree.tokens)
        np.testing.assert_array_equal(parents, tree.parents)
        sizes.append(tree.size)
    assert max(sizes) > 2 or params.total_tokens == 2
    # whole steps: native and Python from the same state give the same tokens and features
    prompt = rng.integers(0, 301, 9).tolist()
    results = []
    for native in (True, False):
        draft.native_greedy = native
        draft.truncate(0)
        first = plain_greedy(target, prompt, 1)[0]
        state = start_state(target, draft, prompt, first)
        steps = []
        for _ in range(6):
            emitted, feats = speculative_step(state, target, draft, params, SamplingParams(),
                                              TokenChooser(SamplingParams()), SpecTimes())
            steps.append((emitted, feats.copy()))
        results.append(steps)
    for (ea, fa), (eb, fb) in zip(*results):
        assert ea == eb
        np.testing.assert_array_equal(fa, fb)


def test_native_greedy_step_rejects_bad_input():
    from dovetail_ext import _core
    src, target = tiny_target(context=32)
    draft = random_draft(src, target)
    spec = _core.GreedySpeculator(target._engine, draft._engine)
    D = src.config.hidden_size
    f = np.zeros((2, D), dtype=np.float32)
    with pytest.raises(ValueError, match="features has shape"):
        spec.step(np.zeros((2, D + 1), dtype=np.float32), [1, 2], 1, 1, 2, -np.inf)
    with pytest.raises(ValueError, match="features must have dtype"):
        spec.step(f.astype(np.float64), [1, 2], 1, 1, 2, -np.inf)
    with pytest.raises(ValueError, match="top_k"):
        spec.step(f, [1, 2], 0, 1, 2, -np.inf)
    with pytest.raises(ValueError, match="total_tokens"):
        spec.step(f, [1, 2], 1, 1, 1, -np.inf)
    with pytest.raises(ValueError, match="max_batch"):
        spec.step(f, [1, 2], 1, 1, 500, -np.inf)
    with pytest.raises(ValueError, match="token"):
        spec.step(f, [1, 99999], 1, 1, 2, -np.inf)
    with pytest.raises(ValueError, match="at least one"):
        spec.step(np.zeros((0, D), dtype=np.float32), [], 1, 1, 2, -np.inf)
    target.forward(list(range(31))); target.commit()
    with pytest.raises(ValueError, match="free slots"):
        spec.step(f, [1, 2], 1, 1, 2, -np.inf)
    assert target.n_past == 31 and draft.n_past == 0  # nothing changed


def _planted_tree(target, rng, K, vocab):
    """A random tree of K nodes after the committed prefix whose nodes often hold the
    target's argmax at their parent (so paths get accepted), siblings distinct."""
    parents = random_tree(rng, K)
    tokens = rng.integers(0, vocab, K)
    depths = tree_depths(parents)
    n0 = target.n_past
    for d in range(1, int(depths.max()) + 1):  # level by level: a node's argmax depends on its path
        logits, _ = target.forward(tokens, n0 + depths, tree_ancestors(parents), logit_rows=np.arange(K))
        target.truncate(n0)
        best = logits.argmax(-1)
        for u in np.flatnonzero(depths == d - 1):
            kids = np.flatnonzero(parents == u)
            if len(kids) and rng.random() < 0.8:
                tokens[rng.choice(kids)] = best[u]
        for u in range(K):  # siblings distinct (a repeat gets a token no sibling holds)
            kids = np.flatnonzero(parents == u)
            for i, c in enumerate(kids):
                while tokens[c] in tokens[kids[:i]]:
                    tokens[c] = (tokens[c] + 1) % vocab
    return tokens, parents


def test_native_greedy_verification_equals_forward_accept_commit():
    """TargetEngine.verify_greedy (one native call) gives what forward, accept_greedy and
    commit give: the emitted tokens, the committed rows' features and logits rows bit for
    bit, and the same cache after (the next call's logits agree bitwise)."""
    vocab = 301
    _, target = tiny_target(vocab=vocab)
    rng = np.random.default_rng(11)
    accepted = []
    for trial in range(40):
        target.reset()
        target.forward(rng.integers(0, vocab, int(rng.integers(1, 20)))); target.commit()
        K = int(rng.integers(1, 14))
        tokens, parents = _planted_tree(target, rng, K, vocab)
        n0 = target.n_past
        tree = build_tree(tokens, parents)
        logits, feats = target.forward(tree.tokens, tree.positions(n0), tree.ancestors,
                                       logit_rows=np.arange(K), feature_rows=np.arange(K))
        path, bonus = accept_greedy(tree, logits)
        target.commit(path)
        after_ref, _ = target.forward([7])
        target.truncate(n0)
        with_rows = bool(trial % 2)
        emitted, f, seconds, rows = target.verify_greedy(tokens, parents, features=True, rows=with_rows)
        assert emitted == tokens[path[1:]].tolist() + [bonus]
        assert target.n_past == n0 + len(path) and seconds >= 0
        np.testing.assert_array_equal(f, feats[path])
        if with_rows:
            np.testing.assert_array_equal(rows, logits[path])
        else:
            assert rows is None
        after, _ = target.forward([7])
        np.testing.assert_array_equal(after, after_ref)
        target.truncate(n0)
        _, f, _, _ = target.verify_greedy(tokens, parents, features=False)
        assert f is None and target.n_past == n0 + len(path)
        accepted.append(len(path) - 1)
    assert max(accepted) >= 3 and min(accepted) == 0  # long paths and rejected roots both met


def test_native_greedy_verification_rejects_bad_input():
    _, target = tiny_target(vocab=301, context=32)
    target.forward([1, 2, 3]); target.commit()
    bad = [
        (([1, 2], [-1]), "2 tokens but 1 parents"),
        (([1, 2, 3], [-1, 2, 0]), "must be an earlier node"),
        (([1, 2], [0, 0]), "root"),
        (([], []), "at least its root"),
        (([1, 99999], [-1, 0]), "token"),
        (([1.5, 2.0], [-1, 0]), "tokens must be integers"),
        (([1, 2], [-1.0, 0.0]), "parents must be integers"),
        (([1, 2**40], [-1, 0]), "int32"),
        ((list(range(30)), list(range(-1, 29))), "context full"),
    ]
    for (tokens, parents), match in bad:
        with pytest.raises(ValueError, match=match):
            target.verify_greedy(tokens, parents)
        assert target.n_past == 3  # nothing changed
    _, big = tiny_target(vocab=301, context=256)
    with pytest.raises(ValueError, match="max_batch"):
        big.verify_greedy(list(range(200)), list(range(-1, 199)))


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_greedy_with_plain_steps_interleaved_equals_plain(overlap):
    """Steps that do not draft (the adaptive governor's plain steps) in any pattern between
    drafting steps: the draft catches up on their features, and greedy output stays exact."""
    src, target = tiny_target(vocab=16, embd_scale=0.3)
    draft = random_draft(src, target, seed=4, std=0.3)
    rng = np.random.default_rng(8)
    times = SpecTimes()
    kinds = set()

    def drafting(state) -> bool:
        d = bool(rng.random() < 0.4)
        kinds.add(d or state.ready is not None)
        return d
    check_greedy_equals_plain(target, draft, TreeParams(2, 3, 6), rng, trials=4, vocab=16, max_prompt=20,
                              times=times, drafting=drafting, overlap=overlap)
    assert kinds == {True, False}
    assert max(times.history) > 1  # drafted tokens were accepted after plain stretches


def test_governor_measures_then_follows_the_faster_mode():
    g = Governor(alpha=0.5, margin=0.0, probe_min=2, probe_max=8)
    assert g.drafting() and g.speculation_pays() is None
    g.record(True, 9.0, 3)            # first speculative step: the draft's prompt pass, not timed
    assert g.spec_s is None and g.drafting()
    g.record(True, 4e-3, 3)
    assert g.spec_s == 4e-3 and g.tau == 3.0
    assert not g.drafting()           # one plain step to measure
    g.record(False, 3e-3, 1)
    assert g.plain_steps == 1 and g.speculation_pays() and g.drafting()
    g.record(True, 5e-3, 3)           # first step after a plain one: the draft catches up, not timed
    assert g.spec_s == 4e-3 and g.drafting()


def test_governor_backs_off_while_speculation_loses():
    g = Governor(alpha=1.0, margin=0.0, probe_min=2, probe_max=8, probe_len=1)
    g.record(True, 1.0, 1); g.record(True, 5e-3, 1); g.record(False, 3e-3, 1)
    assert g.drafting()               # rates known; no loss recorded yet
    waits = []
    for _ in range(5):
        g.record(True, 5e-3, 1)       # a try that loses: 1 token in 5 ms against 3 ms
        n = 0
        while not g.drafting():
            g.record(False, 3e-3, 1)
            n += 1
        waits.append(n)
    assert waits == [2, 4, 8, 8, 8]
    g.record(True, 5e-3, 4)           # a try that wins (tau rises) resets the interval
    g.record(True, 5e-3, 4)
    assert g.speculation_pays() and g.drafting() and g.backoff == 2


def test_governor_tries_are_bursts_judged_on_their_own_mean():
    """After a losing stretch, a try is probe_len speculative steps; its mean replaces the
    slow moving average, so speculation resumes once the text is easy again."""
    g = Governor(alpha=0.05, margin=0.0, probe_min=2, probe_max=64, probe_len=4)
    g.record(True, 1.0, 2); g.record(True, 4e-3, 2); g.record(False, 3e-3, 1)
    assert g.drafting()
    for _ in range(40):               # hard text: 1 token per 4 ms step against 3 ms
        if not g.drafting():
            break
        g.record(True, 4e-3, 1)
    assert not g.drafting() and g.wait == 2
    g.record(False, 3e-3, 1); g.record(False, 3e-3, 1)
    for i in range(4):                # the try: judged only when complete
        assert g.drafting(), i
        g.record(True, 4e-3, 2 if i else 1)
    assert g.tau == 7 / 4 and g.speculation_pays() and g.drafting() and g.backoff == 2


def test_governor_new_sequence_starts_with_a_try():
    g = Governor(alpha=1.0, margin=0.0, probe_min=2, probe_max=64, probe_len=3)
    g.record(True, 1.0, 1); g.record(True, 5e-3, 1); g.record(False, 3e-3, 1)
    spec = 0
    while g.wait < 16:                # losing tries of 3 steps, waits of 2, 4, 8, 16
        if g.drafting():
            g.record(True, 5e-3, 1)
            spec += 1
        else:
            g.record(False, 3e-3, 1)
    assert spec == 1 + 3 * 3 and g.backoff == 32
    g.new_sequence()
    assert g.drafting() and g.wait == 0 and g.backoff == 32
    for _ in range(2):
        g.record(True, 5e-3, 1)
        assert g.drafting()           # the try is not judged before its 3 steps
    g.record(True, 5e-3, 1)
    assert not g.drafting() and g.wait == 32  # still losing: the interval carried over


def test_governor_keeps_speculating_within_the_margin():
    """Slower than plain steps by less than the margin: speculation goes on; by more: it
    backs off."""
    g = Governor(alpha=1.0, margin=0.1, probe_min=2, probe_max=8)
    g.record(True, 1.0, 1); g.record(True, 3.2e-3, 1); g.record(False, 3e-3, 1)
    g.record(True, 3.2e-3, 1)         # 1 token in 3.2 ms against 3 ms: 6% slower
    assert g.speculation_pays() and g.drafting()
    g.record(True, 3.5e-3, 1)         # 14% slower
    assert g.speculation_pays() is False and not g.drafting()


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=1.5), dict(margin=-0.1), dict(margin=1.0), dict(probe_min=0),
                                dict(probe_min=4, probe_max=2), dict(probe_len=0)])
def test_governor_rejects_bad_settings(kw):
    with pytest.raises(ValueError, match="Governor"):
        Governor(**kw)


def _drive(sel, cost, steps):
    """steps timed drafting steps where shape i emits cost[i][0] tokens in cost[i][1] s;
    returns the shapes used, in order."""
    used = []
    for _ in range(steps):
        i = sel.shapes.index(sel.shape())
        used.append(i)
        sel.record(cost[i][0], cost[i][1], timed=True)
    return used


def test_tree_selector_climbs_while_bigger_trees_emit_faster():
    """Verification nearly free (a memory-bound target): each bigger tree emits more per
    step at almost the same cost, so the selector climbs to the largest shape and stays."""
    auto = AutoTree(shapes=(TreeParams(1, 1, 2), TreeParams(1, 2, 3), TreeParams(1, 3, 4)), interval=4, probe_len=2)
    sel = TreeSelector(auto, margin=0.03)
    used = _drive(sel, [(2.0, 1.0e-3), (2.5, 1.05e-3), (2.9, 1.1e-3)], 40)
    assert sel.current == 2 and sel.moves == 2 and used[-1] == 2
    assert used[:4] == [0] * 4 and used[4:6] == [1, 1]  # 4 steps measured, then a try of 2


def test_tree_selector_stays_when_bigger_trees_cost_more_than_they_give():
    """Verification compute-bound (the default Q4_1 target): tries of the next shape lose,
    the selector stays on the smallest and tries ever more rarely."""
    auto = AutoTree(shapes=(TreeParams(1, 1, 2), TreeParams(1, 2, 3), TreeParams(1, 3, 4)), interval=4, probe_len=2)
    sel = TreeSelector(auto, interval_max=16)
    used = _drive(sel, [(2.0, 1.0e-3), (2.3, 1.3e-3), (2.5, 1.7e-3)], 80)
    assert sel.current == 0 and sel.moves == 0 and 2 not in used
    assert used.count(1) == 2 * 5 and sel.interval == 16  # tries after 4, 8, 16, 16, 16 steps


def test_tree_selector_moves_back_down_and_skips_untimed_steps():
    auto = AutoTree(shapes=(TreeParams(1, 1, 2), TreeParams(1, 2, 3)), start=1, interval=2, probe_len=2)
    sel = TreeSelector(auto)
    sel.record(50, 9.0, timed=False)  # a catch-up step: left out of every average
    assert sel.tokens == [None, None] and sel.shape() == TreeParams(1, 2, 3)
    _drive(sel, [(2.0, 1.0e-3), (2.2, 1.4e-3)], 2)
    assert sel.shape() == TreeParams(1, 1, 2)  # the try goes down (no shape above)
    _drive(sel, [(2.0, 1.0e-3), (2.2, 1.4e-3)], 2)
    assert sel.current == 0 and sel.moves == 1


def test_auto_tree_and_selector_reject_bad_settings():
    with pytest.raises(ValueError, match="AutoTree shapes"):
        AutoTree(shapes=())
    with pytest.raises(ValueError, match="AutoTree shapes"):
        AutoTree(shapes=((1, 1, 2),))
    with pytest.raises(ValueError, match="AutoTree shapes"):
        AutoTree(shapes=TreeParams())
    with pytest.raises(ValueError, match="AutoTree start"):
        AutoTree(start=len(AutoTree().shapes))  # one past the last shape
    for kw in (dict(interval=0), dict(probe_len=0)):
        with pytest.raises(ValueError, match="AutoTree"):
            AutoTree(**kw)
    for kw in (dict(alpha=0.0), dict(margin=1.0), dict(interval_max=4)):
        with pytest.raises(ValueError, match="TreeSelector"):
            TreeSelector(AutoTree(interval=8), **kw)
    with pytest.raises(ValueError, match="AutoTree"):
        TreeSelector(TreeParams())


@pytest.mark.parametrize("params", SHAPES, ids=str)
def test_greedy_with_overlap_equals_plain(params):
    """Drafting the next tree during verification (overlap) keeps greedy output exact, with
    the guess right (the tree drafted ahead is used) or wrong (undone)."""
    src, target = tiny_target(vocab=16, embd_scale=0.3)
    draft = random_draft(src, target, seed=4, std=0.3)
    times = SpecTimes()
    check_greedy_equals_plain(target, draft, params, np.random.default_rng(6), trials=3, vocab=16, max_prompt=20,
                              times=times, overlap=True)
    assert times.ahead_tries > 0


def test_draft_tree_expansion_matches_reference_module():
    """The native draft's tree scratch rows equal the PyTorch twin's append-mode calls."""
    import torch
    src, target = tiny_target(dtype="f32")
    module = DovetailDraft.random(DraftConfig.for_target(src, num_layers=2), seed=4, std=0.2)
    draft = Draft.from_module(module, target, weights_dtype="f32")  # the twin's exact weights
    rng = np.random.default_rng(0)
    D = src.config.hidden_size
    feats = rng.standard_normal((6, D)).astype(np.float32)
    toks = rng.integers(0, 301, 6)
    embed = torch.from_numpy(__import__("dovetail_ext.quant", fromlist=["dequantize"]).dequantize(
        src.weights["token_embd"]))
    cache = module.new_cache(64)
    h_native, _, _ = draft.forward(feats, toks, np.arange(6))
    draft.commit()
    with torch.no_grad():
        h_ref = module(torch.from_numpy(feats), torch.from_numpy(toks), torch.arange(6), None, cache, embed)
    cache.commit()
    np.testing.assert_allclose(h_native, h_ref.numpy(), atol=2e-4 * np.abs(h_ref.numpy()).max())
    # two append calls of a little tree at position 6 and 7
    f2 = rng.standard_normal((3, D)).astype(np.float32)
    t2 = rng.integers(0, 301, 3)
    a2 = np.eye(3, dtype=bool)
    n1, _, _ = draft.forward(f2, t2, np.full(3, 6), a2)
    f3 = rng.standard_normal((2, D)).astype(np.float32)
    t3 = rng.integers(0, 301, 2)
    a3 = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 0, 1]], dtype=bool)
    n2, _, _ = draft.forward(f3, t3, np.full(2, 7), a3, append=True)
    with torch.no_grad():
        r1 = module(torch.from_numpy(f2), torch.from_numpy(t2), torch.full((3,), 6), torch.from_numpy(a2), cache, embed)
        r2 = module(torch.from_numpy(f3), torch.from_numpy(t3), torch.full((2,), 7), torch.from_numpy(a3), cache, embed,
                    append=True)
    np.testing.assert_allclose(n1, r1.numpy(), atol=2e-4 * np.abs(r1.numpy()).max())
    np.testing.assert_allclose(n2, r2.numpy(), atol=2e-4 * np.abs(r2.numpy()).max())


def _module_weights(module):
    return {k: v.detach().float().numpy() for k, v in module.state_weights().items() if k != "vocab_map"}


def test_min_prob_prunes_the_tree():
    """Candidates below min_prob never enter the tree; what remains is ancestor-closed;
    with every candidate below it the tree is the root alone."""
    pool = CandidatePool(7)
    first = pool.add([1, 2, 3], [0, 0, 0], np.log([0.6, 0.3, 0.1]))
    pool.add([4, 5], [first[0], first[1]], np.log([0.6 * 0.5, 0.3 * 0.9]))
    tree = pool.select(16, np.log(0.25))
    assert sorted(tree.tokens.tolist()) == [1, 2, 4, 5, 7]
    assert np.all(tree.parents[1:] < np.arange(1, tree.size))
    assert pool.select(16, np.log(0.7)).tokens.tolist() == [7]
    assert TreeParams(min_prob=0.25).min_score == pytest.approx(np.log(0.25))
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="min_prob"):
            TreeParams(min_prob=bad)


def test_reduced_vocabulary_draft_proposes_only_its_tokens():
    """A draft with a vocab_map scores only those rows of the target's head: its top-k are
    the log-softmax over them, returned as target ids; speculation stays exact."""
    src, target = tiny_target(dtype="f32")
    module = DovetailDraft.random(DraftConfig.for_target(src), seed=2, std=0.2)
    rng = np.random.default_rng(3)
    vmap = np.sort(rng.choice(301, 97, replace=False))
    weights = _module_weights(module)
    draft = Draft(module.config, {**weights, "vocab_map": vmap}, target)
    feats = rng.standard_normal((5, src.config.hidden_size)).astype(np.float32)
    toks = rng.integers(0, 301, 5)
    hidden, ids, logp = draft.forward(feats, toks, np.arange(5), topk_rows=[1, 4], k=9)
    head = src.weights["token_embd"].data.astype(np.float64)[vmap]
    logits = hidden[[1, 4]].astype(np.float64) @ head.T
    want_logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(ids, vmap[order])
    np.testing.assert_allclose(logp, np.take_along_axis(want_logp, order, 1), atol=1e-4)

    truth = plain_greedy(target, [5, 17, 3], 30)
    state = start_state(target, draft, [5, 17, 3], truth[0])
    out = [truth[0]]
    while len(out) < 30:
        emitted, _ = speculative_step(state, target, draft, TreeParams(4, 3, 8), SamplingParams(),
                                      TokenChooser(SamplingParams()), SpecTimes())
        out += emitted
    assert out[:30] == truth

    for bad, msg in [(vmap[::-1], "ascending"), (np.array([0, 5, 301]), r"\[0, 301\)"),
                     (np.array([[1, 2]]), "1-D"), (np.array([1.0, 2.0]), "integer")]:
        with pytest.raises(ValueError, match=msg):
            Draft(module.config, {**weights, "vocab_map": bad}, target)
    with pytest.raises(ValueError, match="top_k"):
        Draft(module.config, {**weights, "vocab_map": np.arange(3)}, target).check_tree(TreeParams(4, 2, 5))


def test_accept_sampled_first_token_is_exact():
    """Unit level: whatever the drafted children, the first emitted token ~ p_root."""
    rng = np.random.default_rng(0)
    V = 6
    for params in (SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=2)):
        tree = build_tree([0, 2, 0, 5, 1], [-1, 0, 0, 1, 0])  # root's children: 2, 0, 1 (in draft order)
        logits = rng.standard_normal((5, V)) * 2
        chooser = TokenChooser(params)
        n = 40000
        first = np.empty(n, dtype=np.int64)
        for i in range(n):
            path, bonus = accept_sampled(tree, logits, params, chooser)
            first[i] = tree.tokens[path[1]] if len(path) > 1 else bonus
        p = target_probs(logits[0], params)
        counts = np.bincount(first, minlength=V)
        assert counts[p == 0].sum() == 0
        assert stats.chisquare(counts[p > 0], n * p[p > 0]).pvalue > 1e-3


def _exact_first3(target, prompt, params, V):
    """P(x1, x2, x3) of plain sampling from the target, by enumeration."""
    probs = np.zeros((V, V, V))
    target.reset()
    lg, _ = target.forward(prompt); target.commit()
    p1 = target_probs(lg[0], params)
    base = target.n_past
    for a in np.flatnonzero(p1):
        target.truncate(base)
        lg, _ = target.forward([a]); target.commit()
        p2 = target_probs(lg[0], params)
        for b in np.flatnonzero(p2):
            target.truncate(base + 1)
            lg, _ = target.forward([b])
            probs[a, b] = p1[a] * p2[b] * target_probs(lg[0], params)
    return probs


@pytest.mark.parametrize("params,overlap,mixed", [(SamplingParams(temperature=1.0, seed=11), False, False),
                                                  (SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=12), False,
                                                   False),
                                                  (SamplingParams(temperature=1.0, seed=13), True, False),
                                                  (SamplingParams(temperature=1.0, seed=14), False, True),
                                                  (SamplingParams(temperature=1.0, seed=16), False, "chains"),
                                                  (SamplingParams(temperature=1.3, min_p=0.2, seed=17), False, False)],
                         ids=["t1.0", "t0.7-topp0.9-topk5", "t1.0-overlap", "t1.0-plain-steps", "t1.0-lookup-chains",
                              "t1.3-minp0.2"])
def test_speculative_sampling_has_the_target_distribution(params, overlap, mixed):
    """End to end: the first three tokens under speculative sampling (a random draft that
    disagrees with the target) follow the target's own distribution (G-test, 50,000 draws);
    also when trees are drafted ahead for a guessed outcome (overlap) and used when it holds,
    when steps that do not draft (plain steps) come between drafting ones, and when some
    steps verify a proposed chain instead (prompt lookup)."""
    V = 8
    src, target = tiny_target(vocab=V, seed=7, dtype="f32", context=64, embd_scale=0.1)
    draft = random_draft(src, target, seed=9, std=0.5)
    prompt = [1, 5, 2, 7, 3]
    exact = _exact_first3(target, prompt, params, V)
    # Prompt state shared by every draw: the target's prompt KV and the draft's pairs but the last.
    target.reset(); draft.truncate(0)
    lg, feats = target.forward(prompt, feature_rows=range(len(prompt))); target.commit()
    draft.forward(feats[:-1], prompt[1:], np.arange(len(prompt) - 1)); draft.commit()
    p1 = target_probs(lg[0], params)
    # (with overlap a chain of one drafted token: guesses that hold often enough to matter)
    tree = TreeParams(top_k=2, depth=1, total_tokens=2) if overlap else TreeParams(top_k=3, depth=3, total_tokens=6)
    chooser = TokenChooser(params)
    n = 50000
    counts = np.zeros((V, V, V), dtype=np.int64)
    times = SpecTimes()
    pattern = np.random.default_rng(15)  # which steps draft (mixed)
    for _ in range(n):
        target.truncate(len(prompt)); draft.truncate(len(prompt) - 1)
        first = chooser.draw(p1)
        state = SpecState(root=first, features=feats[-1:], next_tokens=np.array([first]))
        out = [first]
        while len(out) < 3:
            drafting = not mixed or bool(pattern.random() < 0.5)
            chain = None
            if mixed == "chains" and not drafting:  # a guessed continuation: often right, often wrong
                chain = [int(t) for t in pattern.choice([2, 3, 5], size=int(pattern.integers(1, 3)))]
                drafting = True
            emitted, _ = speculative_step(state, target, draft, tree, params, chooser, times, overlap=overlap,
                                          drafting=drafting, chain=chain)
            out += emitted
        counts[out[0], out[1], out[2]] += 1
    if overlap:
        assert times.ahead_hits > 0.02 * n, times.ahead_hits  # trees drafted ahead were used
    if mixed == "chains":
        assert times.lookup_accepted > 0.05 * n, times.lookup_accepted  # chain tokens were accepted
    assert counts[exact == 0].sum() == 0, "a token outside the target's support was emitted"
    assert np.mean(times.history) > 1.05  # the draft's tokens were accepted some of the time
    e, c = exact[exact > 0].ravel() * n, counts[exact > 0].ravel()
    small = e < 5  # pool rare cells so the G-test's approximation holds
    if small.any():
        e, c = np.append(e[~small], e[small].sum()), np.append(c[~small], c[small].sum())
    g = stats.power_divergence(c, e, lambda_="log-likelihood")
    assert g.pvalue > 1e-3, f"G-test p={g.pvalue:.2e}"
