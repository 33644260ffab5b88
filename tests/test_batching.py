"""Several conversations decoding together on one engine (dovetail_ext.batching), and the
server's parallel requests."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext.batching import SequenceBatcher
from dovetail_ext.target import TargetEngine

PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is 2 + 2?", "def fibonacci(n):"]
N = 16


@pytest.fixture(scope="module")
def plain(default_gguf_path):
    return dovetail_ext.load(default_gguf_path, context=256, threads=2, draft=None, lookup=None)


@pytest.fixture(scope="module")
def batcher(default_gguf_path):
    return SequenceBatcher(TargetEngine(default_gguf_path, context=256, threads=2, sequences=4), wait_s=0.5)


def _together(gens, calls):
    """Run calls[i](gens[i]) in one thread each, started together; their results."""
    out = [None] * len(gens)
    errors = []
    start = threading.Barrier(len(gens))

    def run(i):
        try:
            start.wait()
            out[i] = calls[i](gens[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def test_sequences_decoding_together_give_what_each_gives_alone(plain, batcher):
    """Four threads, four sequences: greedy, seeded sampling, logprobs, penalties and stop
    strings give exactly what a generator of their own gives; the steps were batched."""
    gens = [batcher.generator(s) for s in range(4)]
    kws = [dict(max_new_tokens=N), dict(max_new_tokens=N, temperature=0.8, top_p=0.9, seed=5),
           dict(max_new_tokens=N, logprobs=2), dict(max_new_tokens=N, frequency_penalty=1.0, stop=["\n\n"])]
    for rnd in range(2):  # (the second round reuses each sequence's cached prompt)
        calls_before, rows_before = batcher.calls, batcher.rows
        got = _together(gens, [lambda g, p=p, kw=kw: g.generate(p, **kw) for p, kw in zip(PROMPTS, kws)])
        for p, kw, r in zip(PROMPTS, kws, got):
            want = plain.generate(p, speculative=False, **kw)
            assert r.tokens == want.tokens and r.text == want.text and r.stats.mode == "plain"
            assert r.logprobs == want.logprobs
        assert batcher.rows - rows_before >= sum(r.stats.target_calls for r in got) > 2 * N
        assert batcher.calls - calls_before < batcher.rows - rows_before  # (several sequences per call)
        if rnd:
            assert all(r.stats.cached_prompt_tokens > 0 for r in got)
        for s in range(4):
            batcher.idle(s)


def test_streams_and_a_lone_sequence(plain, batcher):
    """Streams interleave; one sequence alone does not wait for idle ones."""
    gens = [batcher.generator(s) for s in range(2)]
    got = _together(gens, [lambda g, p=p: "".join(g.stream(p, max_new_tokens=N)) for p in PROMPTS[:2]])
    assert got == [plain.generate(p, max_new_tokens=N, speculative=False).text for p in PROMPTS[:2]]
    for s in range(2):
        batcher.idle(s)
    alone = batcher.generator(3).generate(PROMPTS[3], max_new_tokens=N)
    assert alone.tokens == plain.generate(PROMPTS[3], max_new_tokens=N, speculative=False).tokens
    batcher.idle(3)


def test_a_failing_step_fails_alone(plain, batcher):
    """A step the engine refuses (a token outside the vocabulary) raises in its own thread;
    the step batched with it gets its logits."""
    import numpy as np
    ids = plain.encode_prompt(PROMPTS[0])
    t0, t1 = batcher.target(0), batcher.target(1)
    t1.truncate(0)
    t1.forward(ids)
    t1.commit()
    t0.truncate(0)
    t0.forward(ids)
    t0.commit()
    plain.target.reset()
    plain.target.forward(ids + [7])
    plain.target.commit()
    want, _ = plain.target.forward([42])
    plain.target.reset()
    plain.reset()
    _together([t0, t1], [lambda t: t.forward([7]), lambda t: t.forward([7])])  # (both now decoding)
    seen = []
    decode = batcher._decode
    batcher._decode = lambda batch, seqs: seen.append(sorted(seqs)) or decode(batch, seqs)
    try:
        got = _together([t0, t1], [lambda t: pytest.raises(ValueError, t.forward, [10 ** 8]).value,
                                    lambda t: t.forward([42])[0]])
    finally:
        del batcher._decode
    assert "outside the vocabulary" in str(got[0])
    np.testing.assert_array_equal(got[1], want)
    assert seen[0] == [0, 1] and sorted(seen[1:]) == [[0], [1]]  # (the joint call, then each step alone)
    for s in (0, 1):
        batcher.idle(s)


def test_bad_arguments(default_gguf_path, batcher):
    with pytest.raises(ValueError, match="engine must be a TargetEngine"):
        SequenceBatcher("model.gguf")
    with pytest.raises(ValueError, match="wait_s"):
        SequenceBatcher(batcher.engine, wait_s=-1)
    with pytest.raises(ValueError, match=r"sequence 4 outside \[0, 4\)"):
        batcher.target(4)
    with pytest.raises(ValueError, match="speculative=True needs a draft"):
        batcher.generator(0).generate("Hi", max_new_tokens=2, speculative=True)


def test_server_parallel_requests(default_gguf_path, plain):
    """create_app(parallel=2): two requests at once, each answered as a generator of its own
    answers; /health counts the batched decode steps; a target with another sequence count
    is refused."""
    pytest.importorskip("httpx", reason="the test client uses httpx")
    pytest.importorskip("starlette", reason="the server needs the [serve] extra (starlette)")
    from starlette.testclient import TestClient

    from dovetail_ext.server import create_app
    with pytest.raises(ValueError, match="needs a generator whose target holds 2 sequences"):
        create_app(plain, parallel=2)
    gen = dovetail_ext.load(default_gguf_path, context=256, threads=2, draft=None, lookup=None, sequences=2)
    with TestClient(create_app(gen, parallel=2)) as h:
        def ask(prompt):
            r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                     "max_tokens": N, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        got = _together([None, None], [lambda _, p=p: ask(p) for p in PROMPTS[:2]])
        want = [plain.generate(p, max_new_tokens=N, speculative=False) for p in PROMPTS[:2]]
        assert got == [w.text for w in want]
        health = h.get("/health").json()
        # while both answers run (the shorter one may end before N tokens), their steps are joined
        both = min(len(w.tokens) for w in want)
        assert both >= 8 and health["parallel"] == 2 and health["batched_tokens"] >= 2 * (both - 2)
        assert health["batched_calls"] < health["batched_tokens"]
        metrics = dict(line.rsplit(" ", 1) for line in h.get("/metrics").text.splitlines() if line[0] != "#")
        assert float(metrics["dovetail_batched_calls_total"]) == health["batched_calls"]
        assert float(metrics["dovetail_batched_tokens_total"]) == health["batched_tokens"]
        assert float(metrics['dovetail_requests_total{outcome="served"}']) == 2
        r = h.post("/v1/embeddings", json={"input": PROMPTS[:2], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32),
                                      plain.embed(PROMPTS[:2]))


def test_generator_sequences_keep_their_conversations(default_gguf_path):
    """use_sequence: two conversations that take turns on a 2-sequence target (the shipped
    draft speculating) are each read once, and each answer is a lone generator's."""
    gen = dovetail_ext.load(default_gguf_path, context=512, threads=2, sequences=2)
    lone = dovetail_ext.load(default_gguf_path, context=512, threads=2)
    convs = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Write a haiku about rain."}]]
    for turn in range(2):
        for s, conv in enumerate(convs):
            gen.use_sequence(s)
            assert gen.sequence == s
            before = len(gen.cached_tokens())
            r = gen.generate(conv, max_new_tokens=N)
            assert r.stats.mode == "speculative" and r.tokens == lone.generate(conv, max_new_tokens=N).tokens
            if turn:  # the conversation's earlier turn is still cached on its sequence
                assert r.stats.cached_prompt_tokens >= before - 2 > 0
            conv += [{"role": "assistant", "content": r.text}, {"role": "user", "content": "One more, please."}]
    assert gen.cached_prefix(gen.encode_prompt(convs[0]), 0) > gen.cached_prefix(gen.encode_prompt(convs[0]), 1)
    with pytest.raises(ValueError, match="sequence 2 is out of range: the target holds 2"):
        gen.use_sequence(2)


def test_choose_slot_rules():
    """The cache slot policy on (tokens held, tokens of the prompt held) per slot."""
    pytest.importorskip("starlette", reason="the server needs the [serve] extra (starlette)")
    from dovetail_ext.server import CONTINUE_SLACK, choose_slot
    used = [3.0, 1.0, 2.0]
    # a continued conversation wins over an empty slot and over a longer partial match
    assert choose_slot([(46, 46), (0, 0), (90, 60)], used) == 0
    assert choose_slot([(50, 50 - CONTINUE_SLACK), (0, 0), (0, 0)], used) == 0  # its reply encoded differently
    assert choose_slot([(60, 60), (0, 0), (80, 80)], used) == 2  # the longest continuation
    # a new conversation sharing only a system prompt takes an empty slot, not a live one
    assert choose_slot([(46, 24), (0, 0), (0, 0)], used) == 1
    assert choose_slot([(46, 24), (70, 24), (0, 0)], used) == 2
    # no empty slot: the same conversation with its last turn edited keeps its slot
    assert choose_slot([(46, 24), (80, 60), (70, 20)], used) == 1
    # else the least recently used slot
    assert choose_slot([(46, 10), (80, 20), (70, 20)], used) == 1
    # a short slot is not "continued" by a prompt that shares none of it
    assert choose_slot([(5, 0), (0, 0)], [1.0, 2.0]) == 1
    # ties: the most recently used continuation
    assert choose_slot([(30, 30), (30, 30)], [1.0, 2.0]) == 1


def test_server_cache_slots(default_gguf_path):
    """create_app(cache_slots=2): conversations that take turns each continue on their slot
    (their earlier turns cached), a third one takes the least recently used slot, and the
    answers are a lone generator's."""
    pytest.importorskip("httpx", reason="the test client uses httpx")
    pytest.importorskip("starlette", reason="the server needs the [serve] extra (starlette)")
    from starlette.testclient import TestClient

    from dovetail_ext.server import create_app
    lone = dovetail_ext.load(default_gguf_path, context=512, threads=2)
    with pytest.raises(ValueError, match="cache_slots=2 needs a generator whose target holds 2 sequences"):
        create_app(lone, cache_slots=2)
    gen = dovetail_ext.load(default_gguf_path, context=512, threads=2, sequences=2)
    with pytest.raises(ValueError, match="cache_slots above 1 is for parallel 1"):
        create_app(gen, parallel=2, cache_slots=2)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    with TestClient(create_app(gen, cache_slots=2)) as h:
        def ask(conv):
            r = h.post("/v1/chat/completions", json={"messages": conv, "max_tokens": N, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.json()["dovetail"]["cached_prompt_tokens"]
        for turn in range(2):
            for conv in convs[:2]:
                text, cached = ask(conv)
                assert text == lone.generate(conv, max_new_tokens=N).text
                n_before = len(lone.encode_prompt(conv[:-2])) if turn else 0  # (its last request)
                assert cached >= n_before, (turn, cached, n_before)  # its own earlier turn, not the other's
                conv += [{"role": "assistant", "content": text}, {"role": "user", "content": "One more, please."}]
        slot0 = gen.sequence
        ask(convs[2])  # a new conversation: the least recently used slot
        assert gen.sequence != slot0
        assert h.get("/health").json()["cache_slots"] == 2
