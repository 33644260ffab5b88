"""Structured output: grammar-constrained decoding (``grammar.Grammar``), plain and
speculative, greedy and sampled.

The acceptance rules are checked at unit level against a path-dependent mask with no
grammar library; the rest needs llguidance, and the masks it gives are checked against
an oracle built from the token table alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from dovetail_ext.sampling import SamplingParams, TokenChooser, accept_greedy, accept_sampled, target_probs
from dovetail_ext.tree import TreeParams, build_tree


class PathMask:
    """A constraint without a grammar: after tokens ``seq`` the allowed next tokens are those
    t with (sum(seq) + t) % 3 != 0, and token 0 always. Counts what it is asked."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.seq, self.calls = vocab, [], 0

    def allowed(self) -> np.ndarray:
        t = np.arange(self.vocab)
        return ((sum(self.seq) + t) % 3 != 0) | (t == 0)

    def __call__(self, row):
        self.calls += 1
        return np.where(self.allowed(), row, -np.inf).astype(np.float32)

    def consume(self, tok):
        assert self.allowed()[tok], "consumed a token the mask did not allow"
        self.seq.append(int(tok))

    def rollback(self, n):
        assert 0 <= n <= len(self.seq)
        del self.seq[len(self.seq) - n:]


def _masked_greedy_walk(tree, logits, vocab, seq):
    """The constrained greedy rule by brute force, after the output ``seq``: from the root,
    the masked argmax after the path; descend while a child holds it."""
    seq, path = list(seq), [0]
    while True:
        m = PathMask(vocab)
        m.seq = list(seq)
        best = int(np.argmax(m(logits[path[-1]])))
        kids = [int(c) for c in tree.children(path[-1]) if tree.tokens[c] == best]
        if not kids:
            return path, best
        seq.append(best)
        path.append(kids[0])


def test_constrained_greedy_acceptance_follows_the_masked_argmax():
    rng = np.random.default_rng(5)
    V = 12
    for trial in range(200):
        K = int(rng.integers(1, 14))
        parents = [-1] + [int(rng.integers(0, u)) for u in range(1, K)]
        tokens = np.zeros(K, dtype=np.int64)
        for u in range(K):
            kids = [c for c in range(K) if parents[c] == u]
            tokens[kids] = rng.permutation(V)[:len(kids)]
        tree = build_tree(tokens, parents)
        logits = rng.standard_normal((K, V)).astype(np.float32)
        for u in range(K):  # mostly agree with a drafted child
            kids = [c for c in range(K) if parents[c] == u]
            if kids and rng.random() < 0.8:
                logits[u, tokens[rng.choice(kids)]] += 3.0
        mask = PathMask(V)
        mask.seq = [1, 4]  # some earlier output
        path, bonus = accept_greedy(tree, logits, mask)
        want_path, want_bonus = _masked_greedy_walk(tree, logits, V, [1, 4])
        assert path.tolist() == want_path and bonus == want_bonus
        assert mask.seq == [1, 4], "the constraint is back where it started"
        after = PathMask(V)
        after.seq = [1, 4] + [int(tree.tokens[u]) for u in path[1:]]
        assert after.allowed()[bonus]


def test_constrained_sampled_acceptance_has_the_masked_distribution():
    """The first two emitted tokens of lossless acceptance, whatever the drafted children,
    follow the target's distribution masked after each prefix (chi-square, 30,000 draws)."""
    V = 7
    rng = np.random.default_rng(2)
    # root children 2, 3, 0 (3 is never allowed at the root: (0 + 3) % 3 == 0); grandchildren
    tree = build_tree([0, 2, 3, 0, 4, 1, 5], [-1, 0, 0, 0, 1, 1, 3])
    logits = rng.standard_normal((7, V)) * 1.5
    params = SamplingParams(temperature=1.0, seed=4)
    chooser = TokenChooser(params)
    n = 30000
    counts = np.zeros((V, V))
    mask = PathMask(V)
    for _ in range(n):
        path, bonus = accept_sampled(tree, logits, params, chooser, mask)
        assert mask.seq == []
        emitted = [int(tree.tokens[u]) for u in path[1:]] + [bonus]
        if len(emitted) == 1:  # the second token comes from the row of the first one's node
            continue
        counts[emitted[0], emitted[1]] += 1
    m = PathMask(V)
    p1 = target_probs(m(logits[0]), params)
    node_of = {int(tree.tokens[c]): int(c) for c in tree.children(0)}
    expect = np.zeros((V, V))
    for a in np.flatnonzero(p1):
        if a not in node_of:
            continue  # a bonus at the root ends the step after one token
        m.seq = [int(a)]
        expect[a] = p1[a] * target_probs(m(logits[node_of[a]]), params)
    # only the pairs where the first token is a drafted child are observed as pairs
    scale = counts.sum() / expect.sum()
    ok = expect > 0
    assert counts[~ok].sum() == 0
    assert stats.chisquare(counts[ok], expect[ok] * scale).pvalue > 1e-3


# -- with llguidance -------------------------------------------------------------------------

llguidance = pytest.importorskip("llguidance", reason="structured output needs the [grammar] extra (llguidance)")

from dovetail_ext.grammar import Constraint, Grammar, token_table  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "languages": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                       "maxItems": 3}}}
PROMPTS = ["Describe Ann, a 31 year old developer, as JSON.",
           "Give a JSON record for Bob, 45, who speaks French and German."]


def follows_person(text: str) -> bool:
    v = json.loads(text)
    return (isinstance(v, dict) and set(v) == {"name", "age", "languages"} and isinstance(v["name"], str)
            and len(v["name"]) <= 40 and type(v["age"]) is int and 0 <= v["age"] <= 150
            and isinstance(v["languages"], list) and len(v["languages"]) <= 3
            and all(isinstance(s, str) and len(s) <= 30 for s in v["languages"]))


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    import dovetail_ext
    return dovetail_ext.load(default_gguf_path, context=512, threads=2)


def test_grammars_are_checked_when_made():
    for make, msg in [(lambda: Grammar.json({"type": "objekt"}), "objekt"),
                      (lambda: Grammar.json("{not json"), "not valid JSON"),
                      (lambda: Grammar.json([1, 2]), "a JSON schema is an object"),
                      (lambda: Grammar.json({"type": "string", "pattern": "[a-"}), "unclosed character class"),
                      (lambda: Grammar.regex("(ab"), "regex"),
                      (lambda: Grammar.regex(3), "a regular expression is a str"),
                      (lambda: Grammar.choice([]), "non-empty list"),
                      (lambda: Grammar.choice("abc"), "non-empty list"),
                      (lambda: Grammar.lark("start: foo"), "foo"),
                      (lambda: Grammar.gbnf("root ::= ("), "GBNF|gbnf")]:
        with pytest.raises(ValueError, match=msg):
            make()
    assert repr(Grammar.regex("[0-9]+")) == "Grammar.regex('[0-9]+')"
    assert Grammar.json('{"type": "integer"}').kind == "json"


def test_missing_llguidance_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=r"pip install 'dovetail-ext\[grammar\]'"):
        Grammar.json()


def test_token_table_matches_the_tokenizer(gen):
    tok = gen.tokenizer
    table, special = token_table(tok, gen.config.vocab_size)
    assert len(table) == gen.config.vocab_size
    assert set(special) >= set(gen.eos_ids) and all(table[i].startswith(b"\xff") for i in special)
    text = "Structured output: {\"name\": \"Zoë\", \"n\": [1, 2.5e3]} — ok ✓\n\tdone"
    ids = tok.encode(text, add_bos=False)
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    from dovetail_ext.grammar import _lltokenizer
    lt = _lltokenizer(tok, gen.config.vocab_size, sorted(gen.eos_ids))
    assert lt.vocab_size == gen.config.vocab_size and set(lt.eos_tokens) == set(gen.eos_ids)
    for i in list(range(17, 2000)) + list(range(gen.config.vocab_size - 500, gen.config.vocab_size)):
        assert lt.decode_bytes([i]) == table[i], i
    assert lt.tokenize_str(text) == ids


def _choice_oracle(table, options, prefix: bytes, eos):
    """Allowed next tokens for Grammar.choice(options) after the bytes ``prefix``: those whose
    bytes keep it a prefix of an option; EOS where it is an option."""
    ok = np.zeros(len(table), dtype=bool)
    for i, b in enumerate(table):
        if b and not b.startswith(b"\xff"):
            s = prefix + b
            ok[i] = any(o.encode().startswith(s) for o in options)
    if prefix.decode() in options:
        ok[list(eos)] = True
    return ok


def _eos_mask(gen):
    m = np.zeros(gen.config.vocab_size, dtype=bool)
    m[list(gen.eos_ids)] = True
    return m


def test_masks_match_an_oracle_from_the_token_table(gen):
    options = ["red", "green", "greenish blue", "grey"]
    table, _ = token_table(gen.tokenizer, gen.config.vocab_size)
    c = Constraint(Grammar.choice(options), gen.tokenizer, gen.config.vocab_size, sorted(gen.eos_ids))
    prefix = b""
    # Where the options branch, every token that keeps the text a prefix of one is allowed;
    # where the grammar forces the next bytes ("ish blue"), only their tokenization by the
    # tokenizer is.
    for piece, branching in [("gr", True), ("een", True), ("ish", True), (" blue", False)]:
        want = _choice_oracle(table, options, prefix, gen.eos_ids)
        got = c.allowed()
        if branching:
            np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
        else:
            first = gen.tokenizer.encode(piece, add_bos=False)[0]
            assert np.flatnonzero(got).tolist() == [first] and want[first]
        for t in gen.tokenizer.encode(piece, add_bos=False):
            c.consume(t)
        prefix += piece.encode()
    assert prefix == b"greenish blue"
    assert c.stopped or not (c.allowed() & ~_eos_mask(gen)).any()
    c2 = Constraint(Grammar.choice(options), gen.tokenizer, gen.config.vocab_size, sorted(gen.eos_ids))
    with pytest.raises(ValueError, match="does not continue"):
        c2.consume(gen.tokenizer.encode("blue", add_bos=False)[0])


def test_plain_constrained_greedy_equals_a_reference_loop(gen):
    """The target engine driven by hand with the oracle's mask gives the generator's tokens."""
    options = ["red", "green", "greenish blue", "grey", "yellow"]
    table, _ = token_table(gen.tokenizer, gen.config.vocab_size)
    eos = _eos_mask(gen)
    for prompt in ["What color is grass? One word.", "Name a color."]:
        r = gen.generate(prompt, max_new_tokens=10, grammar=Grammar.choice(options), speculative=False)
        assert r.text in options and r.stats.mode == "plain"
        ids = gen.encode_prompt(prompt)
        gen.reset()
        t = gen.target
        logits, _ = t.forward(ids)
        t.commit()
        out, prefix = [], b""
        while True:
            ok = _choice_oracle(table, options, prefix, gen.eos_ids)
            if not (ok & ~eos).any():  # only EOS may follow: the output is complete
                break
            x = int(np.argmax(np.where(ok, logits[-1], -np.inf)))
            if eos[x]:
                break
            out.append(x)
            prefix += table[x]
            logits, _ = t.forward([x])
            t.commit()
        assert r.tokens == out, (r.text, gen.tokenizer.decode(out))
        gen.reset()


@pytest.mark.parametrize("grammar", [Grammar.json(PERSON), Grammar.json(), Grammar.json(PERSON, compact=True),
                                     Grammar.regex(r"(yes|no), because [a-z ]{5,40}\.")],
                         ids=["schema", "object", "compact", "regex"])
def test_speculative_constrained_greedy_equals_plain(gen, random_draft_gen, grammar):
    """Greedy output under a grammar is the same token for token whether it decodes plainly,
    with the shipped draft (chain and tree shapes), with a draft the target mostly rejects,
    or with prompt lookup alone."""
    from dovetail_ext.lookup import LookupParams
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=80, grammar=grammar, speculative=False)
        assert plain.stats.mode == "plain"
        for tree in (None, TreeParams(1, 4, 5), TreeParams(4, 4, 8)):
            r = gen.generate(prompt, max_new_tokens=80, grammar=grammar, tree=tree)
            assert r.stats.mode == "speculative" and r.tokens == plain.tokens, tree
        r = random_draft_gen.generate(prompt, max_new_tokens=80, grammar=grammar, tree=TreeParams(3, 3, 6))
        assert r.tokens == plain.tokens
        draft, random_draft_gen.draft = random_draft_gen.draft, None
        random_draft_gen.lookup = LookupParams()
        try:
            r = random_draft_gen.generate(prompt, max_new_tokens=80, grammar=grammar)
            assert r.stats.mode == "lookup" and r.tokens == plain.tokens
        finally:
            random_draft_gen.draft = draft
        if plain.stats.stop_reason == "grammar":
            if grammar.kind == "json":
                value = json.loads(plain.text)
                assert isinstance(value, dict)
                if grammar.source == json.dumps(PERSON, separators=(",", ":")):
                    assert follows_person(plain.text)
            else:
                assert plain.text.startswith(("yes, because ", "no, because ")) and plain.text.endswith(".")
        else:
            assert plain.stats.stop_reason == "length"


def test_strict_json_takes_only_the_listed_properties(gen):
    open_schema = {k: v for k, v in PERSON.items() if k != "additionalProperties"}
    g = Grammar.json(open_schema, strict=True)
    assert json.loads(g.source)["additionalProperties"] is False
    for seed in range(3):
        r = gen.generate(PROMPTS[1], max_new_tokens=160, grammar=g, temperature=1.0, seed=seed)
        assert r.stats.stop_reason == "grammar" and follows_person(r.text), r.text


def test_forced_tokens_are_verified_as_chains(gen):
    """A compact schema forces its keys: those tokens go to the target as chains (also with
    prompt lookup off), and the output stays plain decoding's."""
    g = Grammar.json(PERSON, compact=True)
    plain = gen.generate(PROMPTS[0], max_new_tokens=80, grammar=g, speculative=False)
    lookup, gen.lookup = gen.lookup, None
    try:
        r = gen.generate(PROMPTS[0], max_new_tokens=80, grammar=g)
    finally:
        gen.lookup = lookup
    assert r.tokens == plain.tokens and r.stats.lookup_steps >= 3 and r.stats.lookup_accepted >= 3
    assert r.stats.corpus_steps == 0  # forced chains are not the corpus's
    # with a corpus holding the answer, its chains and the forced ones are told apart
    from dovetail_ext.lookup import CorpusParams, TokenCorpus
    shipped, gen.corpus = gen.corpus, TokenCorpus(plain.tokens * 2, CorpusParams(min_n=2, min_count=2, min_frac=0.5))
    try:
        both = gen.generate(PROMPTS[0], max_new_tokens=80, grammar=g)
    finally:
        gen.corpus = shipped
    assert both.tokens == plain.tokens and 0 < both.stats.corpus_steps < both.stats.lookup_steps
    c = Constraint(g, gen.tokenizer, gen.config.vocab_size, sorted(gen.eos_ids))
    for t in gen.tokenizer.encode('{"name":"Ann"', add_bos=False):
        c.consume(t)
    assert gen.tokenizer.decode(c.forced(10)) == ',"age":'
    assert c.forced(1) == c.forced(10)[:1]


def _def_solve() -> Grammar:
    """Free text up to the first "def", then a function named solve: a grammar that binds only
    after its trigger (the model's own choice there is another name)."""
    g = Grammar.lark('start: TEXT | lead " solve(" ARGS ")"\nlead[lazy]: /(.|\\n)*def/\n'
                     'ARGS: /[a-z_]{1,12}/\nTEXT: /(.|\\n)*/ & ~/(.|\\n)*def(.|\\n)*/\n')
    g.free_until = "def"
    return g


@pytest.mark.parametrize("speculative", [None, False])
def test_a_grammar_free_until_its_trigger_decodes_as_if_constrained_throughout(gen, speculative):
    """With ``free_until`` decoding runs unconstrained until the trigger is out, then goes on
    under the grammar from the same place: the tokens are those of decoding under the grammar
    from the start, and the stats count the whole call."""
    prompt = "Write a Python function that reverses a string."
    free = gen.generate(prompt, max_new_tokens=40, speculative=speculative)
    assert "def " in free.text and "def solve(" not in free.text  # the model's own name
    lazy = gen.generate(prompt, max_new_tokens=40, grammar=_def_solve(), speculative=speculative)
    whole = _def_solve()
    whole.free_until = None
    ref = gen.generate(prompt, max_new_tokens=40, grammar=whole, speculative=speculative)
    assert lazy.tokens == ref.tokens and lazy.text == ref.text
    assert re.search(r"def solve\([a-z_]{1,12}\)$", lazy.text), lazy.text
    assert lazy.stats.stop_reason == "grammar" and lazy.stats.new_tokens == len(lazy.tokens)
    assert lazy.stats.prompt_tokens == ref.stats.prompt_tokens and lazy.stats.target_calls >= 2
    assert "".join(gen.stream(prompt, max_new_tokens=40, grammar=_def_solve(), speculative=speculative)) == lazy.text
    short = gen.generate(prompt, max_new_tokens=3, grammar=_def_solve(), speculative=speculative)
    assert short.tokens == free.tokens[:3] and short.stats.stop_reason == "length"  # (before the trigger)


def test_sampling_free_until_a_refusal_has_the_masked_distribution(gen):
    """A draw of the free part that the grammar refuses is drawn again under the mask (from
    the same random stream, not the same number): the first token's distribution is the
    masked one, p(t) / p(allowed). Here the grammar refuses every "e", about half the mass;
    with the refused draw's number reused, this fails (p ~ 1e-12)."""
    from dovetail_ext.target import TargetEngine
    g = Grammar.lark("start: TEXT\nTEXT: /[^e]*/")
    g.free_until = "\x00"  # (never out: only refusals end the free part)
    prompt = "Name a fruit."
    logits, _ = TargetEngine(gen.target.source, context=256, threads=1).forward(gen.encode_prompt(prompt))
    p = np.exp(logits[0].astype(np.float64) - logits[0].max())
    allowed = Constraint(g, gen.tokenizer, gen.config.vocab_size, sorted(gen.eos_ids)).allowed()
    assert 0.3 < p[~allowed].sum() / p.sum() < 0.7
    q = np.where(allowed, p, 0.0)
    q /= q.sum()
    n = 1000
    draws = np.array([gen.generate(prompt, max_new_tokens=1, temperature=1.0, seed=10_000 + s, grammar=g).tokens[0]
                      for s in range(n)])
    assert allowed[draws].all()
    top = [int(t) for t in np.argsort(-q)[:8] if q[t] * n >= 10]
    observed = [int((draws == t).sum()) for t in top]
    expected = [q[t] * n for t in top]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_constrained_output_ends_with_the_grammar(gen):
    r = gen.generate(PROMPTS[0], max_new_tokens=120, grammar=Grammar.json(PERSON))
    assert r.stats.stop_reason == "grammar" and follows_person(r.text)
    assert not set(r.tokens) & gen.eos_ids
    short = gen.generate(PROMPTS[0], max_new_tokens=5, grammar=Grammar.json(PERSON))
    assert short.stats.stop_reason == "length" and short.tokens == r.tokens[:5]
    assert "".join(gen.stream(PROMPTS[0], max_new_tokens=120, grammar=Grammar.json(PERSON))) == r.text


def test_constrained_sampling_is_valid_and_seeded(gen):
    g = Grammar.json(PERSON)
    outs = []
    for seed in range(4):
        kw = dict(max_new_tokens=160, grammar=g, temperature=0.9, top_p=0.95, seed=seed)
        a = gen.generate(PROMPTS[1], **kw)
        assert a.stats.mode == "speculative"
        b = gen.generate(PROMPTS[1], speculative=False, **kw)
        for r in (a, b):
            assert r.stats.stop_reason == "grammar" and follows_person(r.text), r.text
        assert gen.generate(PROMPTS[1], speculative=False, **kw).tokens == b.tokens
        outs.append(b.text)
    assert len(set(outs)) > 1


def test_logprobs_under_a_grammar_are_the_targets_own(gen):
    r = gen.generate(PROMPTS[0], max_new_tokens=12, grammar=Grammar.json(PERSON), logprobs=2)
    assert r.stats.mode == "speculative" and len(r.logprobs) == len(r.tokens)
    plain = gen.generate(PROMPTS[0], max_new_tokens=12, grammar=Grammar.json(PERSON), logprobs=2, speculative=False)
    assert plain.tokens == r.tokens and plain.logprobs == r.logprobs
    ids = gen.encode_prompt(PROMPTS[0])
    lp, _, _ = gen.score(ids + r.tokens, first=len(ids))
    np.testing.assert_allclose([e.logprob for e in r.logprobs], lp, atol=1e-9)


def test_bad_grammar_arguments(gen):
    with pytest.raises(ValueError, match="grammar must be a dovetail_ext.Grammar"):
        gen.generate("hi", grammar='{"type": "object"}')
    c = Constraint(Grammar.json(), gen.tokenizer, gen.config.vocab_size, sorted(gen.eos_ids))
    c.allowed = lambda: np.zeros(gen.config.vocab_size, dtype=bool)  # (a mask that allows nothing)
    with pytest.raises(ValueError, match="no token of the vocabulary can continue"):
        c(np.zeros(gen.config.vocab_size, np.float32))


def test_chat_session_takes_a_grammar(gen):
    from dovetail_ext.chat import ChatSession
    s = ChatSession(gen)
    reply = s.send("Is the sky blue? Answer yes or no.", max_new_tokens=8, grammar=Grammar.choice(["yes", "no"]))
    assert reply.text in ("yes", "no") and reply.stats.stop_reason == "grammar"
    assert s.messages[-1] == {"role": "assistant", "content": reply.text}
    with pytest.raises(ValueError, match="tools are given when it is made"):
        s.send("Weather?", tools=[{"name": "get_weather"}])
    with pytest.raises(ValueError, match="tool_choice needs tools"):
        s.send("Weather?", tool_choice="required")


def test_cli_structured_output(tmp_path, default_gguf_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    gbnf = tmp_path / "answer.gbnf"
    gbnf.write_text('root ::= ("yes" | "no") "!"\n')
    base = [sys.executable, "-m", "dovetail_ext.cli", "generate", "--model", str(default_gguf_path), "--threads", "2",
            "--json", "--max-new-tokens", "120"]
    for extra, check in [(["--json-schema", str(schema)], follows_person),
                         (["--json-schema", json.dumps(PERSON)], follows_person),
                         (["--json-object"], lambda t: isinstance(json.loads(t), dict)),
                         (["--grammar", str(gbnf)], lambda t: t in ("yes!", "no!")),
                         (["--regex", "[0-9]{2}"], lambda t: len(t) == 2 and t.isdigit())]:
        p = subprocess.run(base + extra + [PROMPTS[0]], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["stop_reason"] == "grammar" and check(out["text"]), (extra, out["text"])
    for extra, msg in [(["--regex", "[0-9"], "invalid regex grammar"),
                       (["--grammar", str(tmp_path / "none.gbnf")], "--grammar: cannot read"),
                       (["--json-schema", '{"type": "objekt"}'], "objekt")]:
        p = subprocess.run(base + extra + ["hi"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
