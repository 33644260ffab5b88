"""Speculative vs plain decoding on the default model in one run (same prompts, same
threads, greedy): acceptance length tau, tokens/s and their ratio; the outputs must be
identical. Uses the draft given by DOVETAIL_BENCH_DRAFT (a checkpoint directory), or an
untrained draft (tau near 1: no speedup is expected from it)."""

from __future__ import annotations

import os

import pytest

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain how a binary search works.", "List five fruits and their colors.",
           "Write a short poem about the moon."]


@pytest.fixture(scope="module")
def spec_gen(default_source, threads):
    from dovetail_ext.api import Generator
    from dovetail_ext.draft import Draft
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig
    from dovetail_ext.target import TargetEngine
    target = TargetEngine(default_source, context=1024, threads=threads)
    path = os.environ.get("DOVETAIL_BENCH_DRAFT")
    if path:
        draft, label = Draft.load(path, target), os.path.basename(path.rstrip("/"))
    else:
        module = DovetailDraft.random(DraftConfig.for_target(default_source), seed=0, std=0.05)
        draft, label = Draft.from_module(module, target), "untrained"
    return Generator(default_source, target, draft), label


@pytest.mark.parametrize("mode", ["plain", "speculative"])
def test_decode_modes(benchmark, spec_gen, record, threads, mode):
    gen, label = spec_gen
    n = 128 if benchmark.enabled else 8
    results = {}

    def run():
        for p in PROMPTS:
            r = gen.generate(p, max_new_tokens=n, speculative=mode == "speculative")
            results[p] = r
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    toks = sum(r.stats.new_tokens for r in results.values())
    secs = sum(r.stats.decode_s for r in results.values())
    calls = sum(r.stats.target_calls for r in results.values())
    entry = dict(tokens_per_s=toks / secs, new_tokens=toks, target_calls=calls, draft=label,
                 tokens={p: r.tokens for p, r in results.items()})
    if mode == "speculative":
        entry.update(acceptance_length=sum(r.stats.acceptance_length * r.stats.target_calls
                                           for r in results.values()) / max(calls, 1),
                     draft_s=sum(r.stats.draft_s for r in results.values()),
                     verify_s=sum(r.stats.verify_s for r in results.values()))
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "tokens"})
    record("speculative", mode, **entry)
