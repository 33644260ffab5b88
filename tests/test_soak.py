"""Soak: generation repeated up to and past the context limit on the default model, with
speculative decoding on and off. Every run stops cleanly with ``stop_reason ==
"context"``, gives exactly the tokens a freshly loaded generator gives, and resident
memory stays flat once warm.

The short variants run by default (about 30 s); the long ones are marked ``slow`` and
run with ``python -m pytest tests/test_soak.py -m slow`` (or ``DOVETAIL_SLOW=1``). Both
print their figures (rounds, tokens, resident memory) with ``-s``.
"""

from __future__ import annotations

import gc
import os
import resource
from dataclasses import dataclass

import pytest

import dovetail_ext
from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.tree import TreeParams

COUNTING = "1, 2, 3, 4, 5,"
# Greedy continuations of these run past every context used here (no EOS before 256).
PROMPTS = [COUNTING, "Once upon a time", "The history of"]
SMALL_TREE = TreeParams(4, 3, 6)  # shrinks to the slots left at the context end


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    if request.node.get_closest_marker("slow") and not (
            "slow" in (request.config.option.markexpr or "") or os.environ.get("DOVETAIL_SLOW")):
        pytest.skip("long soak: run with -m slow or DOVETAIL_SLOW=1")


def rss_mb() -> float:
    """Resident memory of this process now (from /proc/self/statm), in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_generator(path, context: int, kv_dtype: str = "f32"):
    """The default model with a seeded random draft (an untrained draft: speculative output
    must still equal plain output token for token)."""
    gen = dovetail_ext.load(path, context=context, threads=2, kv_dtype=kv_dtype, draft=None)
    module = DovetailDraft.random(DraftConfig.for_target(gen.source, num_layers=1), seed=0, std=0.05)
    gen.set_draft(Draft.from_module(module, gen.target))
    return gen


@dataclass
class Soak:
    rounds: int = 0
    tokens: int = 0
    rss_warm: float = 0.0
    rss_end: float = 0.0

    def report(self, name: str) -> None:
        print(f"\n{name}: {self.rounds} generations, {self.tokens} tokens, resident {self.rss_warm:.1f} -> "
              f"{self.rss_end:.1f} MiB after warm-up, peak {peak_rss_mb():.1f} MiB")


def soak(path, context: int, rounds: int, modes: list[tuple[bool, float]], prompts: list[str] = PROMPTS,
         kv_dtype: str = "f32", max_growth_mb: float = 8.0) -> Soak:
    """``rounds`` passes over ``prompts`` x ``modes`` ((speculative, temperature) pairs),
    each run to past the context limit, on one generator; every output is checked against
    a freshly loaded generator's (reset before each case, so no case reuses another's
    cache), and resident memory after the first pass (warm-up) may grow by at most
    ``max_growth_mb``."""
    gen = make_generator(path, context, kv_dtype)
    ref = make_generator(path, context, kv_dtype)
    fresh = {}
    for prompt in prompts:
        for spec, temp in modes:
            ref.reset()
            fresh[prompt, spec, temp] = ref.generate(prompt, raw=True, max_new_tokens=10 * context, speculative=spec,
                                                     tree=SMALL_TREE, temperature=temp, seed=3).tokens
    del ref
    gc.collect()
    out = Soak()
    for r in range(rounds):
        for prompt in prompts:
            for spec, temp in modes:
                res = gen.generate(prompt, raw=True, max_new_tokens=10 * context, speculative=spec, tree=SMALL_TREE,
                                   temperature=temp, seed=3)
                s = res.stats
                # A sampled continuation may end itself; a greedy one must reach the limit.
                assert s.stop_reason == "context" or (temp > 0 and s.stop_reason == "eos"), (prompt, spec, s)
                if s.stop_reason == "context":
                    # Every emitted token but the last sits in the KV cache, which is full.
                    assert s.prompt_tokens + s.new_tokens == context + 1, s
                    assert gen.target.n_past == context
                assert res.tokens == fresh[prompt, spec, temp], (r, prompt, spec, temp)
                out.tokens += s.new_tokens
                out.rounds += 1
        if r == 0:
            gc.collect()
            out.rss_warm = rss_mb()
    gc.collect()
    out.rss_end = rss_mb()
    assert out.rss_end - out.rss_warm <= max_growth_mb, f"resident memory grew {out.rss_warm:.1f} -> {out.rss_end:.1f} MiB"
    # Greedy speculative output is plain greedy output.
    for prompt in prompts:
        if (prompt, True, 0.0) in fresh and (prompt, False, 0.0) in fresh:
            assert fresh[prompt, True, 0.0] == fresh[prompt, False, 0.0], prompt
    return out


def test_soak_short(default_gguf_path):
    r = soak(default_gguf_path, context=40, rounds=3, modes=[(False, 0.0), (True, 0.0)], prompts=PROMPTS[:2])
    r.report("soak (short)")


def test_past_the_context_limit_via_stream_and_after_reset(default_gguf_path):
    gen = make_generator(default_gguf_path, context=32)
    for spec in (False, True):
        pieces = list(gen.stream(COUNTING, raw=True, max_new_tokens=1000, speculative=spec, tree=SMALL_TREE))
        assert gen.last_stats.stop_reason == "context" and "".join(pieces)
        gen.reset()
        assert gen.target.n_past == 0
    # A prompt that leaves no room for a new token is refused before anything runs.
    with pytest.raises(ValueError, match="does not fit the context"):
        gen.generate("word " * 40, raw=True)
    assert gen.generate(COUNTING, raw=True, max_new_tokens=4).tokens


@pytest.mark.slow
def test_soak_long(default_gguf_path):
    r = soak(default_gguf_path, context=256, rounds=5, modes=[(False, 0.0), (True, 0.0), (False, 0.8), (True, 0.8)],
             prompts=PROMPTS[1:], max_growth_mb=4.0)
    r.report("soak (long)")


@pytest.mark.slow
def test_soak_long_bf16_kv(default_gguf_path):
    r = soak(default_gguf_path, context=192, rounds=5, modes=[(False, 0.0), (True, 0.0)], kv_dtype="bf16",
             max_growth_mb=4.0)
    r.report("soak (long, bf16 KV)")
