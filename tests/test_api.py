"""The generation API and the CLI on the default model, and sampling on small vectors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dovetail_ext import _core
from dovetail_ext.api import TokenLogprob
from dovetail_ext.sampling import SamplingParams, TokenChooser, target_dist, target_probs, target_probs_by_full_sort
from dovetail_ext.tree import TreeParams


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    import dovetail_ext
    return dovetail_ext.load(default_gguf_path, context=256, threads=2)


def test_greedy_is_deterministic_and_stream_matches(gen):
    a = gen.generate("Name a fruit.", max_new_tokens=12)
    b = gen.generate("Name a fruit.", max_new_tokens=12)
    assert a.tokens == b.tokens and a.text == b.text and a.text
    assert b.stats.cached_prompt_tokens == b.stats.prompt_tokens - 1  # prefix reused
    streamed = "".join(gen.stream("Name a fruit.", max_new_tokens=12))
    assert streamed == a.text
    assert gen.last_stats.new_tokens == len(a.tokens)
    assert a.text == gen.tokenizer.decode(a.tokens)
    s = a.stats
    assert s.prompt_tokens > 10 and s.new_tokens <= 12 and s.prefill_s > 0 and s.decode_s > 0
    assert s.tokens_per_s == pytest.approx(s.new_tokens / s.decode_s)
    # the default model loads with its shipped draft: greedy generation speculates
    assert gen.draft is not None and s.mode == "speculative" and s.stop_reason in ("eos", "length")
    assert gen.generate("Name a fruit.", max_new_tokens=12, speculative=False).tokens == a.tokens


def test_eos_stops_generation(gen):
    r = gen.generate("What is the capital of France? Answer in one short sentence.", max_new_tokens=60)
    assert r.stats.stop_reason == "eos"
    assert "Paris" in r.text
    assert not set(r.tokens) & gen.eos_ids


def test_seeded_sampling_is_reproducible(gen):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50)
    a = gen.generate("Tell me a story.", seed=3, **kw)
    b = gen.generate("Tell me a story.", seed=3, **kw)
    c = gen.generate("Tell me a story.", seed=4, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stop_strings_and_raw_prompts(gen):
    r = gen.generate("1, 2, 3, 4, 5,", raw=True, max_new_tokens=40, stop=[" 8"])
    assert r.stats.stop_reason == "stop"
    assert r.text.endswith("7,") and " 8" not in r.text
    pieces = list(gen.stream("1, 2, 3, 4, 5,", raw=True, max_new_tokens=40, stop=[" 8"]))
    assert "".join(pieces) == r.text


def test_edge_cases(gen):
    r = gen.generate("hello", max_new_tokens=0)
    assert r.text == "" and r.tokens == [] and r.stats.stop_reason == "length"
    with pytest.raises(ValueError, match="does not fit the context"):
        gen.generate("word " * 400, raw=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate("hi", max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate("hi", temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate("hi", temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="raw=True takes a string"):
        gen.generate([{"role": "user", "content": "hi"}], raw=True)
    with pytest.raises(ValueError, match="role"):
        gen.generate([{"content": "hi"}])


def test_bad_arguments_name_themselves(gen, default_gguf_path):
    """Arguments of the wrong kind get a ValueError naming them before any work starts,
    rather than a TypeError from the tokenizer, numpy or the native binding (whose message
    lists every weight); numpy scalars count as numbers."""
    import dovetail_ext
    for kwargs, msg in [(dict(stop=[1]), "stop must be a string or a sequence of strings"),
                        (dict(stop=123), "stop must be"), (dict(stop=[b"!"]), "stop must be"),
                        (dict(speculative=0), "speculative must be True or False or None"),
                        (dict(temperature=True), "temperature must be a number"),
                        (dict(temperature=1.0, seed=True), "seed must be"),
                        (dict(temperature=1e-40), "temperature 1e-40 is too small")]:
        with pytest.raises(ValueError, match=msg):
            gen.generate("hi", max_new_tokens=2, **kwargs)
    for prompt, msg in [("a\ud800b", r"the prompt holds a lone surrogate \('\\ud800' at character 1\)"),
                        ([{"role": "system", "content": "ok"}, {"role": "user", "content": "\udc80"}],
                         "messages\\[1\\].content holds a lone surrogate")]:
        with pytest.raises(ValueError, match=msg):
            gen.generate(prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="lone surrogate"):
        gen.generate("x\udcff", raw=True, max_new_tokens=2)
    for kwargs, msg in [(dict(context=10 ** 30), "context must be an integer"),
                        (dict(threads=2 ** 31), r"threads must be an integer >= 1 \(and below 2\*\*31\)"),
                        (dict(max_batch=None), "max_batch must be an integer"),
                        (dict(max_batch=1.5), "max_batch must be an integer"),
                        (dict(kv_dtype=None), "kv_dtype must be"), (dict(tree=5), "tree must be TreeParams"),
                        (dict(draft=5), "a draft is a checkpoint directory"),
                        (dict(overlap="no"), "overlap must be True or False"),
                        (dict(adaptive="no"), "adaptive must be True or False or None")]:
        with pytest.raises(ValueError, match=msg) as e:
            dovetail_ext.load(default_gguf_path, **kwargs)
        assert len(str(e.value)) < 200
    r = gen.generate("hi", max_new_tokens=3, temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int64(3))
    assert r.tokens == gen.generate("hi", max_new_tokens=3, temperature=0.7, top_k=5, seed=3).tokens


def test_logprobs_are_the_targets(gen, random_draft_gen):
    """logprobs=k: each token's log-probability and its k most likely alternatives are the
    log-softmax of the target's own logits for that step (recomputed here in one prefill,
    which gives the decode steps' rows bit for bit), whether the call decodes plainly or
    speculatively (each emitted token's row comes from the verification); greedy tokens are
    those of a call without logprobs; streams fill last_logprobs."""
    prompt = "Name a fruit."
    r = gen.generate(prompt, max_new_tokens=8, logprobs=5)
    assert r.stats.mode == "speculative" and len(r.logprobs) == len(r.tokens) == 8
    assert r.tokens == gen.generate(prompt, max_new_tokens=8).tokens
    ids = gen.encode_prompt(prompt)
    gen.reset()
    logits, _ = gen.target.forward(ids + r.tokens[:-1], logit_rows=range(len(ids) - 1, len(ids) + 7))
    gen.target.truncate(0)
    gen.reset()
    x = logits.astype(np.float64)
    ref = x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))
    for row, tok, e in zip(ref, r.tokens, r.logprobs):
        assert e.token == tok and abs(e.logprob - row[tok]) < 1e-9
        order = np.argsort(-row, kind="stable")[:5]
        assert [i for i, _ in e.top] == order.tolist()
        np.testing.assert_allclose([v for _, v in e.top], row[order], atol=1e-9)
        assert e.top[0] == (tok, e.logprob)  # greedy: the most likely token
    # speculative and plain logprobs are the same bits, with trees, lookup chains and rejections
    code = "Write a Python function that returns the squares of a list of numbers."
    plain = gen.generate(code, max_new_tokens=40, logprobs=3, speculative=False)
    assert plain.stats.mode == "plain"
    for g, tree in ((gen, None), (gen, TreeParams(4, 4, 8)), (random_draft_gen, TreeParams(3, 3, 6))):
        spec = g.generate(code, max_new_tokens=40, logprobs=3, tree=tree)
        assert spec.stats.mode == "speculative" and spec.tokens == plain.tokens and spec.logprobs == plain.logprobs
    assert gen.generate(code, max_new_tokens=40, logprobs=3).stats.acceptance_length > 1.2  # (it did speculate)
    # without a draft (prompt lookup alone: native plain steps, chains verified natively)
    import dovetail_ext
    lookup_only = dovetail_ext.load(gen.source.path, draft=None, context=256, threads=2)
    one = lookup_only.generate(code, max_new_tokens=40, logprobs=3)
    assert one.stats.mode == "lookup" and one.stats.lookup_steps > 0 and one.stats.target_calls > one.stats.lookup_steps
    assert one.tokens == plain.tokens and one.logprobs == plain.logprobs
    # greedy steps in one native call hand back the rows they chose from: the same as Python's steps
    calls = []
    native_step = gen.draft.step_greedy
    gen.draft.step_greedy = lambda *a, **k: calls.append(a) or native_step(*a, **k)
    try:
        native = gen.generate(code, max_new_tokens=40, logprobs=3)
        gen.draft.native_greedy = False
        python_steps = gen.generate(code, max_new_tokens=40, logprobs=3)
    finally:
        gen.draft.native_greedy = True
        del gen.draft.step_greedy
    assert calls and all(a[3] is True for a in calls)  # (rows asked for)
    assert native.tokens == python_steps.tokens == plain.tokens and native.logprobs == python_steps.logprobs
    # sampled: plain decoding with a seed gives the sample of a call without logprobs; either
    # way the log-probabilities are the target's for the tokens drawn
    kw = dict(max_new_tokens=8, temperature=0.9, seed=3)
    sampled = gen.generate(prompt, logprobs=0, speculative=False, **kw)
    assert sampled.tokens == gen.generate(prompt, speculative=False, **kw).tokens
    for one in (sampled, gen.generate(prompt, logprobs=0, **kw)):
        assert all(e.top == [] and e.logprob <= 0 for e in one.logprobs)
        lp, _, _ = gen.score(ids + one.tokens, first=len(ids))
        np.testing.assert_allclose([e.logprob for e in one.logprobs], lp, atol=1e-9)
    pieces = list(gen.stream(prompt, max_new_tokens=8, logprobs=5))
    assert "".join(pieces) == r.text and gen.last_logprobs == r.logprobs
    assert gen.generate(prompt, max_new_tokens=4).logprobs is None
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(ValueError, match="logprobs must be an integer"):
            gen.generate(prompt, max_new_tokens=2, logprobs=bad)


def test_prompt_logprobs_and_token_id_prompts(gen):
    """prompt_logprobs scores each prompt token given the ones before it: for a prompt that
    is a prompt plus its greedy continuation, the continuation's scores equal generate's
    logprobs (one prefill against decode steps: the same bits). raw=True takes token ids."""
    text = "def add(a, b):"
    ids = gen.encode_prompt(text, raw=True)
    r = gen.generate(ids, raw=True, max_new_tokens=6, logprobs=3)
    assert r.tokens == gen.generate(text, raw=True, max_new_tokens=6).tokens
    full, scored = gen.prompt_logprobs(ids + r.tokens, raw=True, top=3)
    assert full == ids + r.tokens and len(scored) == len(full)
    assert scored[0].logprob is None and scored[0].top == [] and scored[0].token == ids[0]
    assert scored[len(ids):] == r.logprobs
    assert all(e.logprob <= 0 and len(e.top) == 3 for e in scored[1:])
    # the prompt is left cached for a generation that follows
    assert gen.generate(full, raw=True, max_new_tokens=2).stats.cached_prompt_tokens == len(full) - 1
    for bad, match in (([-1], "token id -1 is outside"), ([gen.config.vocab_size], "outside the model's vocabulary"),
                       ([1.5], "raw=True takes a string prompt or a non-empty list of token ids"),
                       ([], "raw=True takes")):
        with pytest.raises(ValueError, match=match):
            gen.generate(bad, raw=True, max_new_tokens=1)
    with pytest.raises(ValueError, match="top must be an integer"):
        gen.prompt_logprobs(text, raw=True, top=21)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        gen.prompt_logprobs("", raw=True)
    for bad in ([1.9, 2.9], [True, 2], None, "hello", np.ones((2, 2), np.int64), [[1, 2]]):
        with pytest.raises(ValueError, match="ids must be a 1-D sequence of token ids"):
            gen.score(bad)
    with pytest.raises(ValueError, match="token id 99999999 is outside"):
        gen.score([1, 99999999])
    np.testing.assert_array_equal(gen.score(np.array(ids))[0], gen.score(ids)[0])
    # scoring starts the draft over: its cache described another conversation
    gen.generate("Name a fruit.", max_new_tokens=4)
    assert gen.draft.n_past > 0
    gen.prompt_logprobs(text, raw=True)
    assert gen.draft.n_past == 0
    assert gen.prompt_logprobs(ids[:1], raw=True, top=2) == (ids[:1], [TokenLogprob(ids[0], None)])


def test_penalties_and_logit_bias(gen, random_draft_gen):
    """presence / frequency penalties and logit bias change the logits before each greedy
    choice exactly as OpenAI defines them: against a plain loop over the target engine that
    applies the rule by hand, decoding plainly or speculatively (each verified node judged
    by the logits adjusted as after its path); bad values name themselves."""
    prompt = "Describe the sea in two sentences."
    ids = gen.encode_prompt(prompt)
    space = gen.tokenizer.encode(" the")[0]
    kw = dict(presence_penalty=0.7, frequency_penalty=1.3, logit_bias={space: 4.0, 11: -100})
    r = gen.generate(prompt, max_new_tokens=16, **kw)
    assert r.stats.mode == "speculative"
    assert gen.generate(prompt, max_new_tokens=16, speculative=False, **kw).tokens == r.tokens
    for tree in (TreeParams(1, 4, 5), TreeParams(4, 4, 8)):
        assert gen.generate(prompt, max_new_tokens=16, tree=tree, **kw).tokens == r.tokens
    # a draft the target mostly rejects
    assert random_draft_gen.generate(prompt, max_new_tokens=16, tree=TreeParams(3, 3, 6), **kw).tokens == r.tokens
    gen.reset()
    eng, counts, want = gen.target, {}, []
    logits, _ = eng.forward(ids)
    eng.commit()
    for _ in range(16):
        row = logits[0].astype(np.float32).copy()
        for t, c in counts.items():
            row[t] -= np.float32(0.7 + 1.3 * c)
        row[space] += np.float32(4.0)
        row[11] -= np.float32(100.0)
        tok = int(np.argmax(row))
        if tok in gen.eos_ids:
            break
        want.append(tok)
        counts[tok] = counts.get(tok, 0) + 1
        logits, _ = eng.forward([tok])
        eng.commit()
    eng.truncate(0)
    gen.reset()
    assert r.tokens == want
    assert r.tokens != gen.generate(prompt, max_new_tokens=16).tokens  # (the adjustments bite)
    assert 11 not in r.tokens
    forced = gen.generate(prompt, max_new_tokens=4, logit_bias={space: 100})
    assert forced.tokens == [space] * 4
    zero = gen.generate(prompt, max_new_tokens=4, presence_penalty=0.0, logit_bias={space: 0})
    assert zero.tokens == gen.generate(prompt, max_new_tokens=4).tokens  # (adjustments that change nothing)
    for kw, match in ((dict(presence_penalty=2.5), "presence_penalty must be a number in"),
                      (dict(frequency_penalty="1"), "frequency_penalty must be"),
                      (dict(logit_bias={-1: 1.0}), "token id -1"),
                      (dict(logit_bias={5: 101}), "bias of token 5"),
                      (dict(logit_bias=[1]), "logit_bias must be a dict")):
        with pytest.raises(ValueError, match=match):
            gen.generate(prompt, max_new_tokens=1, **kw)


def test_context_limit_is_a_clean_stop(default_gguf_path):
    import dovetail_ext
    g = dovetail_ext.load(default_gguf_path, context=48, threads=1)
    r = g.generate("Write a long essay about the sea.", max_new_tokens=500)
    assert r.stats.stop_reason in ("context", "eos")
    assert g.target.n_past <= 48


def test_target_probs_filters():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = target_probs(logits, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-6)
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-6)
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8 -> keep 3
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)
    p = target_probs(logits, SamplingParams(temperature=0.5))
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2 / np.sum(
        np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2), rtol=1e-6)
    with pytest.raises(ValueError, match="greedy"):
        target_probs(logits, SamplingParams())


def _support(p: np.ndarray) -> set[int]:
    return set(np.flatnonzero(p).tolist())


def test_target_probs_follows_the_full_sort_specification():
    """The native distribution against the plain float64 full-sort rule: awkward sizes,
    ties, flat and peaked rows, with and without top-k, one row and several. The support
    is the specification's; where a top-p boundary lies within float32 rounding of top_p
    it may hold one token more or less, so it is checked to lie between the specification
    at top_p -/+ 1e-5 (and a token at the exponent's cutoff may fall either side of it).
    Probabilities agree within the float32 exponent's rounding."""
    rng = np.random.default_rng(11)
    near = 0
    for trial in range(400):
        V = int(rng.choice([1, 2, 3, 63, 64, 65, 257, 4099, 49152]))
        shape = (V,) if trial % 2 else (int(rng.integers(1, 4)), V)
        logits = (rng.standard_normal(shape) * rng.choice([0.05, 1, 4, 40])).astype(np.float32)
        if trial % 5 == 0:
            logits = np.round(logits)  # ties, at the top-p boundary too
        params = SamplingParams(float(rng.choice([0.2, 0.7, 1.0, 1.7])),
                                top_p=float(rng.choice([0.01, 0.5, 0.9, 0.97, 0.9999, 1.0])),
                                top_k=int(rng.choice([0, 1, 7, 40, 5000])),
                                min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])))
        got, want = target_probs(logits, params), target_probs_by_full_sort(logits, params)
        assert got.shape == want.shape, (trial, V, params)
        for g, w, row in zip(got.reshape(-1, V), want.reshape(-1, V), logits.reshape(-1, V)):
            assert abs(g.sum() - 1.0) < 1e-10
            z = (row.astype(np.float64) - row.max()) / params.temperature
            at_cutoff = set(np.flatnonzero(np.abs(z + 87.3) < 1e-3).tolist())  # exp's float32 range
            if params.min_p:  # (min_p's floor, compared in another order of operations)
                at_cutoff |= set(np.flatnonzero(np.abs(z - np.log(params.min_p)) < 1e-6).tolist())
            if (_support(g) ^ _support(w)) - at_cutoff:
                near += 1
                lo = target_probs_by_full_sort(row, replace(params, top_p=params.top_p * (1 - 1e-5)))
                hi = target_probs_by_full_sort(row, replace(params, top_p=min(1.0, params.top_p * (1 + 1e-5))))
                assert _support(lo) <= _support(g) <= _support(hi), (trial, V, params)
                continue
            # e = exp(z) with z rounded to float32: |z| ulps of relative error, a few more from
            # the polynomial and the sums.
            tol = np.minimum(-z, 90) * 1.2e-7 + 5e-7
            nz = (w > 0) & (g > 0)
            assert np.all(np.abs(g[nz] - w[nz]) <= tol[nz] * w[nz] + np.max(tol[nz]) * w[nz]), (trial, V, params)
    assert near <= 4, near


def test_target_dist_is_sparse_and_masks_minus_inf():
    """(ids, probs) lists the support in id order; -inf logits (masked tokens) get exactly 0,
    and rows the distribution cannot be taken of are refused by name."""
    logits = np.array([1.0, -np.inf, 3.0, 2.0, -np.inf, 0.5], np.float32)
    ids, p = target_dist(logits, SamplingParams(temperature=1.0))
    assert ids.dtype == np.int32 and p.dtype == np.float64
    assert ids.tolist() == [0, 2, 3, 5]
    np.testing.assert_allclose(p, np.exp([1.0, 3.0, 2.0, 0.5]) / np.exp([1.0, 3.0, 2.0, 0.5]).sum(), rtol=1e-6)
    ids, p = target_dist(logits, SamplingParams(temperature=1.0, top_k=10))
    assert ids.tolist() == [0, 2, 3, 5]  # top_k above the finite count: still no masked token
    ids, p = target_dist(np.array([0.0, -200.0], np.float32), SamplingParams(temperature=1.0))
    assert ids.tolist() == [0] and p.tolist() == [1.0]  # exp(-200) is below the float range: 0
    for bad, msg in [([1.0, np.nan], "NaN"), ([np.nan, 1.0], "NaN"), ([1.0, np.inf], r"\+inf"),
                     ([-np.inf, -np.inf], "every logit is -inf")]:
        with pytest.raises(ValueError, match=msg):
            target_dist(np.array(bad, np.float32), SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="too small"):
        _core.sampling_dist(logits, 1e-300, 0, 1.0)
    # SamplingParams refuses them when built, as it does what the native call cannot take.
    for kwargs, msg in [({"temperature": 1e-300}, "temperature 1e-300 is too small"),
                        ({"temperature": 1e300}, "temperature 1e\\+300 is too large"),
                        ({"temperature": 1.0, "top_k": 2 ** 63}, r"top_k must be an integer in \[0, 2\*\*63\)")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)
    assert SamplingParams(temperature=1e-30, top_k=2 ** 63 - 1).top_k == 2 ** 63 - 1
    with pytest.raises(ValueError, match="logits has shape"):
        target_dist(np.zeros((2, 3), np.float32), SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="at least one"):
        target_dist(np.zeros(0, np.float32), SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="top_p"):
        _core.sampling_dist(logits, 1.0, 0, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        _core.sampling_dist(logits, 1.0, -1, 1.0)


def test_token_chooser_sparse_draw_equals_the_dense_draw():
    """A mostly-zero distribution is drawn from its support alone: the same token as the
    CDF over the whole vocabulary, for the same random number."""
    rng = np.random.default_rng(12)
    for trial in range(300):
        V = int(rng.integers(8, 3000))
        p = np.zeros(V)
        p[rng.permutation(V)[:int(rng.integers(1, max(2, V // 5)))]] = rng.random()
        p /= p.sum()
        a, b = TokenChooser(SamplingParams(1.0, seed=trial)), np.random.default_rng(trial)
        for _ in range(5):
            cdf = np.cumsum(p)
            want = int(min(np.searchsorted(cdf, b.random() * cdf[-1], side="right"), V - 1))
            assert a.draw(p) == want and p[want] > 0


def test_token_chooser_native_draw_equals_the_python_draw():
    """TokenChooser draws natively (distribution and draw in one call): the same token as
    draw_from on target_dist's support for the same random number, flat and peaked rows."""
    rng = np.random.default_rng(13)
    for trial in range(200):
        V = int(rng.choice([1, 5, 300, 49152]))
        logits = (rng.standard_normal(V) * rng.choice([0.1, 3, 30])).astype(np.float32)
        params = SamplingParams(float(rng.choice([0.5, 1.0, 2.0])), top_p=float(rng.choice([0.5, 0.95, 1.0])),
                                top_k=int(rng.choice([0, 3, 50])), seed=trial)
        a, b = TokenChooser(params), TokenChooser(params)
        for _ in range(3):
            assert a(logits) == b.draw_from(*target_dist(logits, params))
    with pytest.raises(ValueError, match="u must be in"):
        _core.sample(np.zeros(3, np.float32), 1.0, 0, 1.0, 1.0)


def test_min_p_keeps_the_tokens_near_the_most_likely():
    """min_p keeps exactly the tokens with p >= min_p * p_max at the temperature, before
    top-k and top-p; the seeded draws of TokenChooser follow that distribution."""
    from scipy import stats
    logits = np.array([2.0, 1.9, 1.0, 0.2, -1.0, -np.inf, 1.5], dtype=np.float32)
    for T, m, keep in [(1.0, 0.5, {0, 1, 6}), (1.0, 0.1, {0, 1, 2, 3, 6}), (2.0, 0.5, {0, 1, 2, 6}),
                       (1.0, 1.0, {0}), (1.0, 0.0, {0, 1, 2, 3, 4, 6})]:
        p = target_probs(logits, SamplingParams(T, min_p=m))
        assert set(np.flatnonzero(p).tolist()) == keep, (T, m)
        full = target_probs(logits, SamplingParams(T))
        np.testing.assert_allclose(p[sorted(keep)], full[sorted(keep)] / full[sorted(keep)].sum(), rtol=1e-6)
    params = SamplingParams(1.0, top_k=2, min_p=0.5, seed=3)  # min_p keeps 0, 1, 6; top-k 2 of them
    assert set(np.flatnonzero(target_probs(logits, params)).tolist()) == {0, 1}
    params = SamplingParams(1.0, min_p=0.3, seed=3)
    ch = TokenChooser(params)
    draws = np.bincount([ch(logits) for _ in range(20000)], minlength=7)
    want = target_probs(logits, params)
    assert draws[want == 0].sum() == 0
    assert stats.chisquare(draws[want > 0], 20000 * want[want > 0]).pvalue > 1e-3
    for bad in (-0.1, 1.5, "0.1", float("nan")):
        with pytest.raises(ValueError, match="min_p"):
            SamplingParams(1.0, min_p=bad)


def test_token_chooser_distribution():
    from scipy import stats
    p = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
    ch = TokenChooser(SamplingParams(temperature=1.0, seed=0))
    draws = np.array([ch.draw(p) for _ in range(20000)])
    counts = np.bincount(draws, minlength=5)
    assert counts[4] == 0
    assert stats.chisquare(counts[:4], 20000 * p[:4]).pvalue > 1e-3


def test_cli_generate_json_and_info(capsys, default_gguf_path):
    from dovetail_ext.cli import main
    assert main(["generate", "Name a fruit.", "--max-new-tokens", "8", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("text", "prompt_tokens", "new_tokens", "prefill_s", "decode_s", "tokens_per_s", "mode"):
        assert key in out
    assert out["new_tokens"] <= 8 and out["mode"] == "speculative"  # the shipped draft, by default
    assert main(["generate", "Name a fruit.", "--max-new-tokens", "8", "--json", "--threads", "1", "--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["mode"] == "plain" and plain["tokens"] == out["tokens"]
    assert main(["generate", "Name a fruit.", "--max-new-tokens", "8", "--json", "--threads", "1",
                 "--logprobs", "2"]) == 0
    lp = json.loads(capsys.readouterr().out)
    assert lp["tokens"] == out["tokens"] and [e["token"] for e in lp["logprobs"]] == out["tokens"]
    assert all(len(e["top"]) == 2 and e["top"][0]["token"] == e["token"] and e["logprob"] <= 0
               for e in lp["logprobs"])
    assert main(["generate", "Name a fruit.", "--max-new-tokens", "8", "--json", "--threads", "1",
                 "--temperature", "1.2", "--min-p", "0.2", "--seed", "5"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    import dovetail_ext
    g = dovetail_ext.load(default_gguf_path, context=256, threads=1)
    assert sampled["tokens"] == g.generate("Name a fruit.", max_new_tokens=8, temperature=1.2, min_p=0.2,
                                           seed=5).tokens
    assert main(["generate", "x", "--temperature", "1", "--min-p", "2", "--model", str(default_gguf_path)]) == 2
    assert "min_p must be in [0, 1]" in capsys.readouterr().err
    assert main(["generate", "Name a fruit.", "--logprobs", "2", "--model", "/nonexistent.gguf"]) == 2
    assert "--logprobs needs --json" in capsys.readouterr().err  # (before the model is read)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_path"] in info["cpu_paths_supported"]
    assert info["model"]["layers"] == 30
    assert (info["model"]["activation"], info["model"]["sliding_window"], info["model"]["local_layers"]) == ("silu", 0, 0)
    assert info["cuda_cublas"] is None or info["cuda_cublas"].startswith("libcublas")
    import importlib.util
    for pkg in ("llguidance", "uvicorn", "torch"):  # versions of the optional packages, None where absent
        assert (info["optional"][pkg] is not None) == (importlib.util.find_spec(pkg) is not None), pkg
    assert main(["generate", "x", "--model", "/nonexistent.gguf"]) == 2
    assert "no such model file" in capsys.readouterr().err
    # info: a model named but unreadable is in the JSON, and the exit status says so
    assert main(["info", "--json", "--model", "/nonexistent.gguf"]) == 2
    assert "error" in json.loads(capsys.readouterr().out)["model"]
    for port, msg in (("-1", "--port must be in [0, 65535]"), ("70000", "--port must be in [0, 65535]")):
        assert main(["serve", "--port", port, "--model", "/nonexistent.gguf"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["serve", "--host", "", "--model", "/nonexistent.gguf"]) == 2
    assert "--host is empty" in capsys.readouterr().err
    assert main(["serve", "--api-key", " ", "--model", "/nonexistent.gguf"]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    for extra, msg in ((["--cache-slots", "0"], "--cache-slots must be in [1, 64]"),
                       (["--cache-slots", "2", "--parallel", "2"], "takes neither --parallel nor --gpu-layers")):
        assert main(["serve", *extra, "--model", "/nonexistent.gguf"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["serve", "--parallel", "0", "--model", "/nonexistent.gguf"]) == 2
    assert "--parallel must be in [1, 64]" in capsys.readouterr().err
    assert main(["serve", "--parallel", "2", "--gpu-layers", "1", "--model", "/nonexistent.gguf"]) == 2
    assert "drop --gpu-layers" in capsys.readouterr().err


def test_cli_streams_text(default_gguf_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dovetail_ext.cli", "generate", "--raw", "The sky is",
                        "--max-new-tokens", "6", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr and "[speculative]" in r.stderr  # the shipped draft
    # A reader that goes away (`| head -c 1`) ends the command quietly, without a traceback.
    p = subprocess.Popen([sys.executable, "-m", "dovetail_ext.cli", "generate", "--raw", "Once upon a time",
                          "--max-new-tokens", "64", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 141 and "Traceback" not in err, err
    p.stderr.close()


def test_cli_bench_compares_plain_and_speculative(capsys, default_gguf_path):
    """dovetail bench: both modes on built-in prompts, tau, the ratio, identical greedy
    outputs; the text table; prompt lookup alone without a draft, plain only without either;
    bad arguments are clear errors."""
    from dovetail_ext.benchmark import BENCH_PROMPTS, format_report, run_benchmark
    from dovetail_ext.cli import main
    args = ["bench", "--prompts", "2", "--max-new-tokens", "8", "--threads", "1", "--context", "256"]
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["modes"]) == {"plain", "speculative"} and rep["prompts"] == 2
    assert rep["outputs_identical"] is True
    spec, plain = rep["modes"]["speculative"], rep["modes"]["plain"]
    assert plain["new_tokens"] == spec["new_tokens"] and spec["tau"] >= 1.0 and plain["tau"] == 1.0
    assert rep["speculative_over_plain"] == pytest.approx(spec["tokens_per_s"] / plain["tokens_per_s"])
    assert spec["draft_ms_per_step"] > 0 and spec["verify_ms_per_step"] > 0
    assert rep["corpus"]["tokens"] > 1_000_000 and 0 <= spec["corpus_steps"] <= spec["lookup_steps"]
    assert main(args + ["--temperature", "0.7", "--top-p", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "speculative / plain" in text and "sampling T=0.7" in text and "seed=0" in text
    assert main(args + ["--no-spec", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["modes"]) == {"plain"} and rep["corpus"] is None
    assert main(["bench", "--prompts", str(len(BENCH_PROMPTS) + 1)]) == 2
    assert "--prompts must be in" in capsys.readouterr().err
    import dovetail_ext
    gen = dovetail_ext.load(default_gguf_path, draft=None, context=128, threads=1)
    rep = run_benchmark(gen, ["Hi"], max_new_tokens=4)  # no draft: prompt lookup alone against plain
    assert set(rep["modes"]) == {"plain", "lookup"} and rep["speculative_mode"] == "lookup"
    assert rep["outputs_identical"] and "lookup / plain" in format_report(rep)
    gen.lookup = None
    rep = run_benchmark(gen, ["Hi"], max_new_tokens=4)
    assert "speculative_over_plain" not in rep and "plain decoding only" in format_report(rep)
    with pytest.raises(ValueError, match="repeat"):
        run_benchmark(gen, ["Hi"], repeat=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 2 for a benchmark"):
        run_benchmark(gen, ["Hi"], max_new_tokens=1)
    # --tree-auto: the report names the shapes and the last one chosen
    assert main(args + ["--tree-auto", "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)["tree"]
    assert tree["auto"] is True and len(tree["shapes"]) > 1 and tree["last"].count(",") == 2
    assert main(args + ["--tree-auto"]) == 0 and "tree chosen while decoding" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least one prompt"):
        run_benchmark(gen, [])


def test_logit_adjuster_rolls_back():
    from dovetail_ext.sampling import LogitAdjuster, LogitShaper
    a = LogitAdjuster(8, presence=0.5, frequency=0.25, bias={3: 1.0})
    row = np.zeros(8, np.float32)
    for t in (1, 2, 1):
        a.add(t)
    before = a(row).copy()
    shaper = LogitShaper(a)
    for t in (4, 1, 4):
        shaper.consume(t)
    assert a(row)[4] == np.float32(-1.0) and a(row)[1] == np.float32(-1.25)
    shaper.rollback(3)
    np.testing.assert_array_equal(a(row), before)
    np.testing.assert_array_equal(a.counts, np.bincount([1, 2, 1], minlength=8))
