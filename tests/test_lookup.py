"""Prompt and corpus lookup (``dovetail_ext.lookup``): the n-gram index and the corpus's
suffix-array search against brute-force twins, their parameters and files, and speculative
decoding with lookup chains through the public API and the CLI (greedy output unchanged,
the chains used and counted)."""

from __future__ import annotations

import json

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


# ---- corpus lookup ----------------------------------------------------------------------

from dovetail_ext.errors import FormatError  # noqa: E402
from dovetail_ext.lookup import CorpusParams, TokenCorpus  # noqa: E402


def corpus_brute_force(corpus: list[int], ctx: list[int], p: CorpusParams, limit: int) -> list[int]:
    """The twin of the native search: every occurrence of each suffix of the context,
    counted directly."""
    N = len(corpus)
    for n in range(min(p.max_n, len(ctx)), p.min_n - 1, -1):
        # positions right after an occurrence that has a next token
        pos = [i + n for i in range(N - n) if corpus[i:i + n] == ctx[len(ctx) - n:]]
        if len(pos) >= p.min_count:
            break
    else:
        return []
    chain: list[int] = []
    while len(chain) < min(limit, p.max_tokens):
        pos = [i for i in pos if i < N]
        if len(pos) < p.min_count:
            break
        counts: dict[int, int] = {}
        for i in pos:
            counts[corpus[i]] = counts.get(corpus[i], 0) + 1
        tok = min(counts, key=lambda t: (-counts[t], t))
        if counts[tok] < p.min_count or counts[tok] < p.min_frac * len(pos):
            break
        chain.append(tok)
        pos = [i + 1 for i in pos if corpus[i] == tok]
    return chain


def test_corpus_equals_brute_force_search():
    """Random corpora with repeated phrases, random contexts (some taken from the corpus,
    some not) and awkward parameters: the native suffix-array search gives the twin's chain."""
    rng = np.random.default_rng(1)
    nonempty = 0
    for trial in range(250):
        min_n = int(rng.integers(1, 4))
        p = CorpusParams(min_n=min_n, max_n=min_n + int(rng.integers(0, 5)), max_tokens=int(rng.integers(1, 7)),
                         min_count=int(rng.integers(1, 5)), min_frac=float(rng.choice([0.0, 0.3, 0.5, 0.6, 1.0])))
        vocab = int(rng.choice([2, 3, 7, 40]))
        phrases = [rng.integers(0, vocab, int(rng.integers(2, 9))).tolist() for _ in range(4)]
        corpus: list[int] = []
        for _ in range(int(rng.integers(0, 30))):
            corpus += phrases[int(rng.integers(0, 4))] if rng.random() < 0.7 else [int(rng.integers(0, vocab))]
        # ids packed three to a 64-bit key below 2^21 - 1, compared one by one above
        base = int(rng.choice([0, 0, 2 ** 21 - 42, 2 ** 21, 2 ** 31 - 50]))
        corpus = [t + base for t in corpus]
        tc = TokenCorpus(corpus, p)
        assert len(tc) == len(corpus) and tc.tokens.tolist() == corpus
        for _ in range(8):
            if corpus and rng.random() < 0.7:
                s = int(rng.integers(0, len(corpus)))
                ctx = corpus[s:s + int(rng.integers(1, 10))]
            else:
                ctx = (rng.integers(0, vocab + 1, int(rng.integers(0, 6))) + base).tolist()
            limit = int(rng.integers(0, 8))
            want = corpus_brute_force(corpus, ctx, p, limit)
            assert tc.propose(ctx, limit) == want, (trial, corpus, ctx, limit, p)
            assert tc.propose(ctx) == corpus_brute_force(corpus, ctx, p, p.max_tokens)
            nonempty += bool(want)
    assert nonempty > 300, nonempty  # the cases are not all empty chains


def test_corpus_examples_and_parameters():
    # "1 2" occurs 3 times: twice followed by 3 4, once by 3 9; min_frac 0.6 takes 3 (3/3),
    # then 4 (2/3), then stops at what follows "3 4" (5 once, 6 once: below min_count 2)
    corpus = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6, 0, 1, 2, 3, 9]
    tc = TokenCorpus(corpus, CorpusParams(min_n=2, max_n=3, max_tokens=4, min_count=2, min_frac=0.6))
    assert tc.propose([7, 1, 2]) == [3, 4]
    assert tc.propose([7, 1, 2], limit=1) == [3]
    assert tc.propose([7, 5, 8]) == []             # no suffix occurred min_count times
    assert tc.propose([]) == [] and tc.propose([1, 2], limit=0) == []
    strict = TokenCorpus(corpus, CorpusParams(min_n=2, max_n=3, max_tokens=4, min_count=2, min_frac=0.7))
    assert strict.propose([1, 2]) == [3]           # 4 after "1 2 3" is 2 of 3 < 0.7
    assert TokenCorpus([], CorpusParams()).propose([1, 2, 3]) == []
    for bad in (dict(min_n=0), dict(max_n=1, min_n=2), dict(max_tokens=0), dict(max_tokens=65), dict(min_count=0),
                dict(min_frac=1.5), dict(min_frac=-0.1), dict(min_frac=True), dict(min_frac="0.5"), dict(max_n=65)):
        with pytest.raises(ValueError, match="corpus"):
            CorpusParams(**bad)
    for bad_tokens, what in (([[1, 2]], "1-D"), ([1.5, 2.0], "integers"), ([-1, 2], r"\[0, 2\^31\)"),
                             ([2 ** 31], r"\[0, 2\^31\)")):
        with pytest.raises(ValueError, match=what):
            TokenCorpus(np.array(bad_tokens))
    with pytest.raises(ValueError, match="context token ids"):
        tc.propose([1, -2])
    with pytest.raises(ValueError, match="corpus params must be CorpusParams"):
        TokenCorpus([1, 2], params=(2, 6))


def test_lookup_prefers_the_context_then_the_corpus():
    corpus = [5, 6, 7, 8] * 4
    look = NgramLookup([1, 2, 3, 4, 1, 2, 3], LookupParams(),
                       corpus=TokenCorpus(corpus, CorpusParams(min_n=2, min_count=3)))
    assert look.propose() == [4, 1, 2, 3, 4, 1] and not look.from_corpus   # the context repeats
    look.extend([9, 5, 6])
    assert look.propose() == [7, 8, 5, 6] and look.from_corpus              # only the corpus knows "5 6"
    assert look.propose(limit=2) == [7, 8]
    look.extend([0])
    assert look.propose() == [] and not look.from_corpus
    with pytest.raises(ValueError, match="corpus must be a TokenCorpus"):
        NgramLookup([1], LookupParams(), corpus=[5, 6, 7])


def test_corpus_file_round_trip_and_bad_files(tmp_path, default_source):
    from dovetail_ext.draft_model import TargetSignature
    sig = TargetSignature.from_source(default_source)
    small = TokenCorpus([3, 1, 4, 1, 5, 9, 2, 6], target=sig, card={"note": "pi"})
    small.save(tmp_path / "a.safetensors")
    back = TokenCorpus.load(tmp_path / "a.safetensors", CorpusParams(min_count=1))
    assert back.tokens.tolist() == [3, 1, 4, 1, 5, 9, 2, 6] and back.card == {"note": "pi"}
    assert back.target == sig and back.params == CorpusParams(min_count=1)
    back.check_target(default_source)
    wide = TokenCorpus([70000, 1, 2 ** 31 - 1])  # ids past uint16 are kept as int32
    wide.save(tmp_path / "w.safetensors")
    assert TokenCorpus.load(tmp_path / "w.safetensors").tokens.tolist() == [70000, 1, 2 ** 31 - 1]
    assert TokenCorpus.load(tmp_path / "w.safetensors").target is None
    other = TokenCorpus([1, 2], target=TargetSignature("llama", 576, 49152, "0" * 64))
    with pytest.raises(ValueError, match="made for another target: embedding_sha256"):
        other.check_target(default_source)
    with pytest.raises(FileNotFoundError, match="no corpus file"):
        TokenCorpus.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FormatError, match="not a readable corpus"):
        TokenCorpus.load(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file
    save_file({"tokens": np.arange(3, dtype=np.int32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not a dovetail corpus"):
        TokenCorpus.load(tmp_path / "plain.safetensors")
    save_file({"tokens": np.arange(3, dtype=np.int32)}, str(tmp_path / "v2.safetensors"),
              metadata={"format": "dovetail-corpus", "version": "2"})
    with pytest.raises(FormatError, match="version '2' is not supported"):
        TokenCorpus.load(tmp_path / "v2.safetensors")
    save_file({"tokens": np.zeros((2, 2), dtype=np.int32)}, str(tmp_path / "2d.safetensors"),
              metadata={"format": "dovetail-corpus", "version": "1"})
    with pytest.raises(FormatError, match="1-D uint16 or int32"):
        TokenCorpus.load(tmp_path / "2d.safetensors")


def _own_text_corpus(gen, prompts, n=64):
    """A corpus of the target's greedy replies to other prompts (what build-corpus makes)."""
    toks: list[int] = []
    for p in prompts:
        toks += gen.generate(p, max_new_tokens=n, speculative=False).tokens + [2]
    return TokenCorpus(toks, CorpusParams(min_count=1, min_frac=0.5))


CORPUS_PROMPTS = ["Write a Python function that returns the squares of a list of numbers.",
                  "Write a Python function that returns the even numbers of a list.",
                  "Write a Python function that sums the numbers of a list."]


@pytest.mark.parametrize("with_draft", [True, False], ids=["draft", "lookup-only"])
def test_greedy_with_corpus_equals_plain(gen, with_draft):
    """Corpus chains are verified (and tokens of them accepted) where the context has no
    match, with a draft and in lookup mode alike, and the output is plain greedy decoding's."""
    corpus = _own_text_corpus(gen, CORPUS_PROMPTS[:2])
    g = gen if with_draft else dovetail_ext.api.Generator(gen.source, gen.target)
    before, g.corpus = g.corpus, corpus
    try:
        steps = accepted = 0
        for prompt in CORPUS_PROMPTS[1:]:
            plain = g.generate(prompt, max_new_tokens=64, speculative=False)
            spec = g.generate(prompt, max_new_tokens=64)
            assert spec.tokens == plain.tokens, prompt
            assert spec.stats.corpus_steps <= spec.stats.lookup_steps
            assert spec.stats.corpus_accepted <= spec.stats.lookup_accepted
            steps += spec.stats.corpus_steps
            accepted += spec.stats.corpus_accepted
        assert steps >= 3 and accepted >= 3, (steps, accepted)  # (the second prompt is in the corpus)
    finally:
        g.corpus = before
    with pytest.raises(ValueError, match="corpus must be a TokenCorpus or None"):
        dovetail_ext.api.Generator(gen.source, gen.target, None, corpus=[1, 2, 3])


def test_cli_build_corpus_and_generate_with_it(tmp_path, capsys, default_gguf_path, default_source):
    """build-corpus writes the target's replies with a card; generate takes the file with
    --corpus (greedy tokens those of --no-spec), refuses a corpus of another target, and
    --no-corpus leaves it out."""
    from dovetail_ext.cli import main
    from dovetail_ext.draft_model import TargetSignature
    out = tmp_path / "c.safetensors"
    assert main(["build-corpus", "--data", "python-functions", "--max-prompts", "2", "--max-new-tokens", "12",
                 "--threads", "1", "--out", str(out), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["sources"][0]["replies"] == 2 and card["command"].startswith("dovetail build-corpus")
    corpus = TokenCorpus.load(out)
    assert len(corpus) == card["tokens"] <= 2 * 13 and corpus.tokens.tolist().count(2) == 2  # end token after each
    assert corpus.target == TargetSignature.from_source(default_source)
    ask = ["generate", "Name a fruit.", "--max-new-tokens", "12", "--json", "--threads", "1"]
    assert main(ask + ["--corpus", str(out)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(ask + ["--no-spec"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == spec["tokens"]
    assert main(ask + ["--no-corpus"]) == 0
    assert json.loads(capsys.readouterr().out)["corpus_steps"] == 0
    TokenCorpus([1, 2, 3], target=TargetSignature("llama", 576, 49152, "f" * 64)).save(tmp_path / "other.safetensors")
    assert main(ask + ["--corpus", str(tmp_path / "other.safetensors")]) == 2
    assert "the corpus was made for another target" in capsys.readouterr().err
    assert main(["build-corpus", "--out", str(tmp_path / "c.npy"), "--max-prompts", "1"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["build-corpus", "--out", str(tmp_path / "no" / "c.safetensors")]) == 2
    assert "no directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corpus must be 'auto', a corpus file, a TokenCorpus or None"):
        dovetail_ext.load(default_gguf_path, context=64, threads=1, corpus=3)
