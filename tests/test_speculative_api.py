"""Speculative decoding through the public API on the default model with an untrained
draft: greedy output equals plain greedy output over many prompts and tree shapes, stats,
the CLI, and bad input."""

from __future__ import annotations

import json

import pytest

import dovetail_ext
from dovetail_ext.api import Generator
from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.errors import DraftMismatchError
from dovetail_ext.tree import AutoTree, TreeParams

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain what a hash map is.",
    "List three prime numbers.", "def fibonacci(n):", "Translate 'good morning' into Spanish.",
    "Give me a short tip for sleeping better.", "What is 12 times 12?", "Name a famous painter.",
    "Write one sentence about the ocean.", "How do I reverse a list in Python?", "What color is the sky?",
    "Say hello.", "Summarize the plot of Romeo and Juliet in one sentence.", "What is photosynthesis?",
    "Tell me a joke.", "Count from one to five.", "What does CPU stand for?", "Describe a cat in five words.",
    "Why is the sea salty?", "Recommend a book.", "Write a SQL query that selects all rows from users.",
]
SHAPES = [TreeParams(10, 7, 16), TreeParams(1, 5, 6), TreeParams(8, 2, 12)]


@pytest.fixture(scope="module")
def gen(random_draft_gen):
    return random_draft_gen


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_greedy_speculative_equals_plain(gen, shape):
    prompts = PROMPTS if shape == SHAPES[0] else PROMPTS[::4]
    for prompt in prompts:
        plain = gen.generate(prompt, max_new_tokens=24, speculative=False)
        spec = gen.generate(prompt, max_new_tokens=24, speculative=True, tree=shape)
        assert spec.tokens == plain.tokens, prompt
        assert spec.text == plain.text
        assert spec.stats.stop_reason == plain.stats.stop_reason
        assert spec.stats.mode == "speculative" and plain.stats.mode == "plain"
        assert spec.stats.acceptance_length >= 1.0 and spec.stats.target_calls >= 1


def test_eos_stop_strings_and_streaming(gen):
    r = gen.generate("What is the capital of France? Answer in one short sentence.", max_new_tokens=60,
                     speculative=True)
    p = gen.generate("What is the capital of France? Answer in one short sentence.", max_new_tokens=60,
                     speculative=False)
    assert r.stats.stop_reason == "eos" and r.tokens == p.tokens
    for stop in ([" 8"], ["7,"], [" 6, 7"], ["9, 1"]):
        r = gen.generate("1, 2, 3, 4, 5,", raw=True, max_new_tokens=40, stop=stop, speculative=True)
        p = gen.generate("1, 2, 3, 4, 5,", raw=True, max_new_tokens=40, stop=stop, speculative=False)
        assert r.text == p.text and r.stats.stop_reason == p.stats.stop_reason == "stop"
    pieces = list(gen.stream("Write a haiku about autumn.", max_new_tokens=20, speculative=True))
    assert "".join(pieces) == gen.generate("Write a haiku about autumn.", max_new_tokens=20, speculative=False).text


def test_stats_and_seeded_sampling(gen):
    r = gen.generate("Tell me a story.", max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5, speculative=True)
    again = gen.generate("Tell me a story.", max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5, speculative=True)
    assert r.tokens == again.tokens and len(r.tokens) == 16
    s = r.stats
    assert s.draft_s > 0 and s.verify_s > 0 and s.target_calls >= 1
    assert 1.0 <= s.acceptance_length <= gen.tree.depth + 1


def test_adaptive_governor_through_generate(gen, monkeypatch):
    """Greedy decoding is adaptive by default, sampling is not (a seeded sample must not
    depend on timings). Whatever the governor decides, step by step, the output is plain
    decoding's: checked here with its decisions forced into a fixed pattern."""
    from dovetail_ext import speculative

    assert gen.adaptive is None
    r = gen.generate("Tell me a story.", max_new_tokens=16, temperature=0.8, seed=5, speculative=True)
    assert r.stats.plain_steps == 0
    off = gen.generate("Explain what a hash map is.", max_new_tokens=24, speculative=True, tree=SHAPES[1])
    gen.adaptive = False
    try:
        fixed = gen.generate("Explain what a hash map is.", max_new_tokens=24, speculative=True, tree=SHAPES[1])
    finally:
        gen.adaptive = None
    assert fixed.stats.plain_steps == 0 and fixed.tokens == off.tokens
    # One governor per (draft, tree): its measurements carry over to the next generation.
    kept = gen._governor[1]
    gen.generate("Say hello.", max_new_tokens=8, speculative=True, tree=SHAPES[1])
    assert gen._governor[1] is kept
    gen.generate("Say hello.", max_new_tokens=8, speculative=True, tree=SHAPES[2])
    assert gen._governor[1] is not kept

    decisions = []
    pattern = [True, True, False, False, True, False, True, True, True, False]
    monkeypatch.setattr(speculative.Governor, "drafting",
                        lambda self: decisions.append(pattern[len(decisions) % len(pattern)]) or decisions[-1])
    for prompt in PROMPTS[::5]:
        decisions.clear()
        plain = gen.generate(prompt, max_new_tokens=24, speculative=False)
        spec = gen.generate(prompt, max_new_tokens=24, speculative=True, tree=SHAPES[1])
        assert spec.tokens == plain.tokens, prompt
        assert spec.stats.plain_steps == decisions.count(False) > 0
        # (steps that verify a prompt-lookup chain do not ask the governor)
        assert spec.stats.target_calls == len(decisions) + spec.stats.lookup_steps


def test_edge_cases(gen):
    r = gen.generate("hello", max_new_tokens=0, speculative=True)
    assert r.tokens == [] and r.stats.stop_reason == "length"
    r = gen.generate("hello", max_new_tokens=1, speculative=True)
    assert len(r.tokens) == 1
    with pytest.raises(ValueError, match="does not fit the context"):
        gen.generate("word " * 600, raw=True, speculative=True)
    with pytest.raises(ValueError, match="exceeds the target engine's max_batch"):
        gen.generate("hi", speculative=True, tree=TreeParams(4, 4, 200))
    with pytest.raises(ValueError, match="draft scratch rows"):
        gen.generate("hi", speculative=True, tree=TreeParams(40, 7, 16))
    with pytest.raises(ValueError, match="total_tokens"):
        TreeParams(10, 7, 0)
    # top_k at its limit: the root's runner-up is not asked for beyond the native top-k's 256
    assert gen.generate("hi", max_new_tokens=4, speculative=True, tree=TreeParams(256, 1, 2)).tokens == \
        gen.generate("hi", max_new_tokens=4, speculative=False).tokens
    plain_gen = Generator(gen.source, gen.target, lookup=None)
    with pytest.raises(ValueError, match="needs a draft"):
        plain_gen.generate("hi", speculative=True)
    assert Generator(gen.source, gen.target).generate("hi", max_new_tokens=4, speculative=True).stats.mode == "lookup"


@pytest.mark.parametrize("draft", [None, "auto"])
def test_lookup_chains_fit_a_small_max_batch(default_gguf_path, draft):
    """A lookup chain and its root go in one target call: chains longer than max_batch - 1
    (the default 6 tokens with max_batch 4, or max_tokens 128) are cut to fit, with or
    without a draft."""
    from dovetail_ext.lookup import LookupParams
    text = "alpha beta gamma delta epsilon zeta eta theta " * 4
    for lookup in (LookupParams(), LookupParams(max_tokens=128)):
        g = dovetail_ext.load(default_gguf_path, context=256, threads=2, max_batch=4, draft=draft, lookup=lookup)
        r = g.generate(text, raw=True, max_new_tokens=40)
        assert r.stats.lookup_steps > 0
        assert r.tokens == g.generate(text, raw=True, max_new_tokens=40, speculative=False).tokens
    # Nor longer than the tokens still wanted: every accepted chain token is kept (the first
    # new token comes from the prefill). At 6 new tokens here, an uncapped chain ran past them.
    g = dovetail_ext.load(default_gguf_path, context=256, threads=2, draft=draft)
    for n in range(2, 12):
        short = g.generate(text, raw=True, max_new_tokens=n).stats
        assert short.lookup_accepted <= short.new_tokens - 1, (n, short)


def test_context_fills_cleanly_while_speculating(default_gguf_path):
    g = dovetail_ext.load(default_gguf_path, context=64, threads=1, draft=None)
    g.draft = Draft.from_module(DovetailDraft.random(DraftConfig.for_target(g.source), seed=1, std=0.05), g.target)
    spec = g.generate("Write a long essay about the sea.", max_new_tokens=500, speculative=True)
    plain = g.generate("Write a long essay about the sea.", max_new_tokens=500, speculative=False)
    assert spec.stats.stop_reason == plain.stats.stop_reason
    assert spec.tokens == plain.tokens


def test_draft_for_another_target_is_refused(gen, tmp_path):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from native_helpers import make_source, random_weights, tiny_config
    cfg = tiny_config(vocab=gen.config.vocab_size, heads=9, head_dim=64, gqa=3)
    other = make_source(cfg, random_weights(cfg), "q8_0")
    other.name = "tiny-other"
    module = DovetailDraft.random(DraftConfig.for_target(other), seed=0)
    module.save(tmp_path / "d")
    with pytest.raises(DraftMismatchError, match="another target"):
        Draft.load(tmp_path / "d", gen.target)


def test_draft_argument_of_generate(gen, tmp_path):
    module = DovetailDraft.random(DraftConfig.for_target(gen.source), seed=2, std=0.05)
    module.save(tmp_path / "d2", dtype="f32")
    plain = gen.generate("Name a color.", max_new_tokens=10, speculative=False)
    before = gen.draft
    try:
        r = gen.generate("Name a color.", max_new_tokens=10, draft=tmp_path / "d2")
        assert r.stats.mode == "speculative" and r.tokens == plain.tokens
        assert gen.draft is not before
    finally:
        gen.set_draft(before)


def _cli_args(gen, tmp_path, new_tokens, topk, depth, tokens):
    """`dovetail generate` arguments with an untrained draft saved under tmp_path."""
    DovetailDraft.random(DraftConfig.for_target(gen.source), seed=0, std=0.05).save(tmp_path / "draft", dtype="f32")
    return ["generate", "Name a fruit.", "--max-new-tokens", str(new_tokens), "--threads", "1", "--json",
            "--draft", str(tmp_path / "draft"), "--tree-topk", str(topk), "--tree-depth", str(depth),
            "--tree-tokens", str(tokens)]


def test_cli_with_a_draft(gen, tmp_path, capsys):
    from dovetail_ext.cli import main
    args = _cli_args(gen, tmp_path, 8, 4, 3, 8)
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "speculative"
    for key in ("acceptance_length", "target_calls", "draft_s", "verify_s", "plain_steps"):
        assert key in out
    assert main(args + ["--no-adaptive"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["plain_steps"] == 0 and fixed["tokens"] == out["tokens"]
    assert main(args + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["mode"] == "plain" and plain["tokens"] == out["tokens"]
    assert main(args[:-6] + ["--tree-tokens", "1"]) == 2
    assert "total_tokens" in capsys.readouterr().err
    assert main(args[:-6] + ["--tree-auto"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["tokens"] == out["tokens"] and auto["tree"].count(",") == 2
    assert main(args + ["--tree-auto"]) == 2
    assert "--tree-auto chooses the shape itself; drop --tree-topk, --tree-depth, --tree-tokens" in capsys.readouterr().err


def test_auto_tree_greedy_equals_plain(gen):
    """An AutoTree with tries every few steps changes the shape within a generation; the
    output stays plain decoding's, and the selector carries over between calls."""
    auto = AutoTree(interval=2, probe_len=2)
    names = {f"{t.top_k},{t.depth},{t.total_tokens}" for t in auto.shapes}
    gen.adaptive = False  # every step drafts (an untrained draft would otherwise go plain)
    try:
        for prompt in PROMPTS[::3]:
            plain = gen.generate(prompt, max_new_tokens=32, speculative=False)
            spec = gen.generate(prompt, max_new_tokens=32, speculative=True, tree=auto)
            assert spec.tokens == plain.tokens, prompt
            assert spec.stats.tree in names
    finally:
        gen.adaptive = None
    selector = gen._selector[1]
    assert sum(t is not None for t in selector.tokens) >= 2  # tries measured other shapes
    with pytest.raises(ValueError, match="tree must be TreeParams or AutoTree"):
        gen.generate("hi", max_new_tokens=2, tree=(1, 1, 2))


def test_cli_draft_device(gen, tmp_path, capsys):
    """--draft-device runs the draft on the device engine (here its host backend) with the
    same output; a CUDA device in a build or machine without one is a clear error."""
    from dovetail_ext import _core
    from dovetail_ext.cli import main
    args = _cli_args(gen, tmp_path, 6, 2, 2, 4)
    assert main(args) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert main(args + ["--draft-device", "emulated"]) == 0
    emu = json.loads(capsys.readouterr().out)
    assert emu["mode"] == "speculative" and emu["tokens"] == cpu["tokens"]
    assert cpu["ahead_tries"] == emu["ahead_tries"] == 0  # overlap is off unless asked for
    assert main(args + ["--overlap"]) == 0
    ahead = json.loads(capsys.readouterr().out)
    assert ahead["tokens"] == cpu["tokens"] and ahead["ahead_tries"] >= 1
    if not (_core.cuda_compiled() and _core.cuda_device_count() > 0):
        assert main(args + ["--draft-device", "cuda"]) == 2
        assert "CUDA" in capsys.readouterr().err
    assert main(args + ["--draft-device", "gpu"]) == 2
    assert "unsupported device" in capsys.readouterr().err


def test_cli_unused_device_options(gen, tmp_path, capsys):
    """A device option that the run does not use (no draft loaded; no layers offloaded) gets a
    note on stderr and changes nothing; a misspelt one is an error whether used or not,
    before the model loads."""
    from dovetail_ext.api import load
    from dovetail_ext.cli import main
    args = _cli_args(gen, tmp_path, 4, 1, 1, 2)
    assert main(args + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--no-spec", "--draft-device", "emulated", "--offload-device", "emulated"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tokens"] == plain["tokens"]
    assert "--draft-device emulated is unused: no draft is loaded (--no-spec)" in out.err
    assert "--offload-device emulated is unused without --gpu-layers" in out.err
    assert main(args + ["--draft-device", "emulated"]) == 0  # (used: no note)
    assert "unused" not in capsys.readouterr().err
    for opt in ("--draft-device", "--offload-device"):
        assert main(args + ["--no-spec", opt, "cdua"]) == 2
        assert "unsupported device 'cdua'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="draft_device: unsupported device 'gpu'"):
        load("/nonexistent.gguf", draft=None, draft_device="gpu")  # (checked before the model is read)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_overlap_with_the_shipped_draft_equals_plain(default_gguf_path, device):
    """Drafting ahead during verification (overlap) with the shipped draft: output equal to
    plain decoding; the draft's guesses hold often enough to be used; the CPU draft and the
    device engine (host backend) take the same path."""
    g = dovetail_ext.load(default_gguf_path, context=512, threads=2, draft="auto", draft_device=device,
                          overlap=True, adaptive=False)  # every step drafts (and guesses)
    assert g.overlap is True
    hits = 0
    for prompt in PROMPTS[:6:2]:
        plain = g.generate(prompt, max_new_tokens=32, speculative=False)
        spec = g.generate(prompt, max_new_tokens=32, speculative=True)
        assert spec.tokens == plain.tokens, prompt
        assert spec.stats.ahead_tries >= 1
        hits += spec.stats.ahead_hits
    assert hits > 0
    # Off by default (it measured slower, with a CPU draft and with a GPU draft).
    assert dovetail_ext.load(default_gguf_path, context=64, threads=1, draft="auto").overlap is False
    assert dovetail_ext.load(default_gguf_path, context=64, threads=1, draft="auto",
                             draft_device="emulated").overlap is False
