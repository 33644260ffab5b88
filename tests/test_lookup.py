"""Prompt lookup (``dovetail_ext.lookup``): the n-gram index against a brute-force search,
its parameters, and speculative decoding with lookup chains through the public API (greedy
output unchanged, the chains used and counted)."""

from __future__ import annotations

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.lookup import LookupParams, NgramLookup


def brute_force(tokens: list[int], params: LookupParams, limit: int) -> list[int]:
    """The longest suffix (max_n down to min_n) with an earlier occurrence that has a
    continuation; the latest such occurrence; its next tokens."""
    L = len(tokens)
    for n in range(min(params.max_n, L), params.min_n - 1, -1):
        suffix = tokens[L - n:]
        for start in range(L - n - 1, -1, -1):  # occurrences ending before the last token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + min(limit, params.max_tokens)]
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
    assert look.propose() == [7, 0, 2, 3]       # 2 3 (no 3-gram 0 2 3 before): its latest occurrence
    look = NgramLookup([1, 1, 1], LookupParams(min_n=2, max_n=2))
    assert look.propose() == [1]                # overlapping occurrences; never the suffix itself
    assert NgramLookup([], LookupParams()).propose() == []
    for bad in (dict(min_n=0), dict(max_n=2, min_n=3), dict(max_tokens=0), dict(min_n=True), dict(max_n=2.5)):
        with pytest.raises(ValueError, match="lookup"):
            LookupParams(**bad)


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    g = dovetail_ext.load(default_gguf_path, context=512, threads=2, draft=None)
    module = DovetailDraft.random(DraftConfig.for_target(g.source, num_layers=1), seed=0, std=0.05)
    g.draft = Draft.from_module(module, g.target)
    return g


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

