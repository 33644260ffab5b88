"""Prompt lookup (``dovetail_ext.lookup``): the n-gram index against a brute-force search,
its parameters, and speculative decoding with lookup chains through the public API (greedy
output unchanged, the chains used and counted)."""

from __future__ import annotations

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext.lookup import LookupParams, NgramLookup


def brute_force(tokens: list[int], params: LookupParams, limit: int) -> list[int]:
    """The longest suffix (max_n down to min_n) with an earlier occurrence that has a
    continuation; the latest such occurrence; its next tokens, continued periodically past
    the end of the context."""
    L = len(tokens)
    for n in range(min(params.max_n, L), params.min_n - 1, -1):
        suffix = tokens[L - n:]
        for start in range(L - n - 1, -1, -1):  # occurrences ending before the last token
            if tokens[start:start + n] == suffix:
                extended = list(tokens)
                for k in range(min(limit, params.max_tokens)):
                    extended.append(extended[start + n + k])
                return extended[L:]
    return []


def test_index_equals_brute_force_search():
    rng = np.random.default_rng(0)
    for trial in range(300):
        params = LookupParams(min_n=int(rng.integers(1, 4)), max_n=int(rng.integers(4, 7)),
                              max_tokens=int(rng.integers(1, 9)))
        vocab = int(rng.choice([2, 3, 5, 50]))
        seq = rng.integers(0, vocab, int(rng.integers(0, 80))).tolist()
        split = int(rng.integers(0, len(seq) + 1))
        look = NgramLookup(seq[:split], params)
        for t in seq[split:] + [None]:  # after the prompt, then token by token
            limit = int(rng.integers(0, 10))
            assert look.propose(limit) == brute_force(look.tokens, params, limit), (trial, look.tokens)
            assert look.propose() == brute_force(look.tokens, params, params.max_tokens)
            if t is not None:
                look.extend([t])
        assert look.tokens == seq


def test_examples_and_parameters():
    look = NgramLookup([5, 6, 7, 8, 9, 1, 2, 5, 6, 7], LookupParams(min_n=3, max_n=4, max_tokens=3))
    assert look.propose() == [8, 9, 1]          # after the earlier 5 6 7
    assert look.propose(limit=1) == [8]
    look.extend([4])
    assert look.propose() == []                 # 6 7 4 never occurred
    look = NgramLookup([1, 2, 3, 9, 1, 2, 3, 7, 0, 2, 3], LookupParams(min_n=2, max_n=3))
    # 2 3 (no 3-gram 0 2 3 before): after its latest occurrence 7 0 2 3, then the same again
    assert look.propose() == [7, 0, 2, 3, 7, 0]
    look = NgramLookup([1, 1, 1], LookupParams(min_n=2, max_n=2, max_tokens=4))
    assert look.propose() == [1, 1, 1, 1]       # a run: the overlapping occurrence, continued
    look = NgramLookup([4, 8, 5, 4, 8, 5, 4], LookupParams(min_n=2, max_n=3, max_tokens=5))
    assert look.propose() == [8, 5, 4, 8, 5]    # a loop of period 3
    assert NgramLookup([], LookupParams()).propose() == []
    for bad in (dict(min_n=0), dict(max_n=2, min_n=3), dict(max_tokens=0), dict(min_n=True), dict(max_n=2.5),
                dict(max_n=65)):
        with pytest.raises(ValueError, match="lookup"):
            LookupParams(**bad)


@pytest.fixture(scope="module")
def gen(random_draft_gen):
    return random_draft_gen


PROMPTS = ["Write a Python class Point with x and y, and methods add, sub, mul and div that each return a new Point.",
           "Write a Python function that prints the numbers 1 to 10, one per line, then the same numbers backwards.",
           "Count from 1 to 30, separated by commas."]


@pytest.mark.parametrize("lookup", [LookupParams(), LookupParams(min_n=1, max_n=2, max_tokens=9)], ids=str)
def test_greedy_with_lookup_equals_plain(gen, lookup):
    """Repetitive text: lookup chains are verified (and tokens of them accepted), and the
    output is plain greedy decoding's; with lookup off no chain is tried."""
    used = 0
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=96, speculative=False)
        gen.lookup = lookup
        spec = gen.generate(prompt, max_new_tokens=96, speculative=True)
        assert spec.tokens == plain.tokens, prompt
        used += spec.stats.lookup_accepted
        assert spec.stats.lookup_steps <= spec.stats.target_calls
        gen.lookup = None
        off = gen.generate(prompt, max_new_tokens=96, speculative=True)
        assert off.tokens == plain.tokens and off.stats.lookup_steps == 0
    gen.lookup = LookupParams()
    assert used >= 8, used


def test_seeded_sampling_with_lookup_is_reproducible(gen):
    kw = dict(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=3, speculative=True)
    a = gen.generate(PROMPTS[0], **kw)
    b = gen.generate(PROMPTS[0], **kw)
    assert a.tokens == b.tokens and a.stats.lookup_steps > 0


def test_lookup_argument_is_checked(gen):
    with pytest.raises(ValueError, match="lookup must be LookupParams or None"):
        dovetail_ext.api.Generator(gen.source, gen.target, None, lookup=(3, 4, 6))


def test_lookup_alone_without_a_draft(gen):
    """A generator without a draft speculates by prompt lookup alone by default ("lookup"
    mode: chains where the context repeats, plain steps elsewhere): the output is plain
    decoding's, greedy and seeded sampling alike; speculative=False decodes plainly."""
    g = dovetail_ext.api.Generator(gen.source, gen.target)
    used = saved = 0
    for prompt in PROMPTS:
        plain = g.generate(prompt, max_new_tokens=96, speculative=False)
        look = g.generate(prompt, max_new_tokens=96)
        assert plain.stats.mode == "plain" and look.stats.mode == "lookup"
        assert look.tokens == plain.tokens, prompt
        assert look.stats.draft_s == 0 and look.stats.lookup_steps <= look.stats.target_calls
        assert look.stats.target_calls <= plain.stats.target_calls
        used += look.stats.lookup_accepted
        saved += plain.stats.target_calls - look.stats.target_calls
    assert used >= 8 and saved >= 8, (used, saved)
    kw = dict(max_new_tokens=48, temperature=0.7, top_p=0.9, seed=4)
    a, b = g.generate(PROMPTS[0], **kw), g.generate(PROMPTS[0], **kw)
    assert a.tokens == b.tokens and a.stats.mode == "lookup"



def _prefill(target, ids):
    """The prompt's K/V committed in chunks; (features of every row, logits after the last)."""
    feats = []
    for s in range(0, len(ids), target.max_batch):
        part = ids[s:s + target.max_batch]
        logits, f = target.forward(part, feature_rows=np.arange(len(part)))
        target.commit()
        feats.append(f)
    return np.concatenate(feats), logits[-1]


def test_native_speculator_lookup_equals_plain(gen):
    """GreedySpeculator with prompt lookup on (the C API's path): it verifies lookup chains
    on its own, holds their pairs back for the draft, and emits plain greedy decoding's
    tokens; a new sequence (the target reset) starts a new context without reset()."""
    from dovetail_ext.lookup import LookupParams
    spec, target = gen.draft._native, gen.target
    spec.set_lookup(LookupParams())
    try:
        lookups = 0
        for prompt in PROMPTS + PROMPTS[:1]:
            plain = gen.generate(prompt, max_new_tokens=80, speculative=False).tokens
            ids = gen.encode_prompt(prompt)
            target.reset()
            gen.draft.truncate(0)
            feats, last = _prefill(target, ids)
            out = [int(np.argmax(last))]
            features, next_tokens = feats, np.array(ids[1:] + out)
            before = spec.lookup_steps
            while len(out) < len(plain):
                emitted, features, size, draft_s, verify_s, _ = spec.step(features, next_tokens, 1, 1, 2, -np.inf)
                next_tokens = emitted
                out += emitted.tolist()
            assert out[:len(plain)] == plain, prompt
            lookups += spec.lookup_steps - before
        assert lookups >= 5, lookups
    finally:
        spec.set_lookup(None)
        gen.reset()
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="lookup max_n"):  # the native check, for callers without LookupParams
        spec.set_lookup(SimpleNamespace(min_n=3, max_n=65, max_tokens=6))
