"""Plain vs speculative decoding on this machine, the way ``dovetail bench`` measures it.

    >>> import dovetail_ext
    >>> from dovetail_ext.benchmark import run_benchmark
    >>> report = run_benchmark(dovetail_ext.load(), max_new_tokens=64)
    >>> report["speculative_over_plain"], report["modes"]["speculative"]["tau"]

Prompt by prompt, the same generator decodes plainly and speculatively (with its draft;
for a model without one, by prompt lookup alone: ``report["speculative_mode"]``; the order
alternating from one prompt to the next, so that a machine's drift hits both modes alike),
and the report holds tokens/s, time per token, the acceptance length tau, the draft's and
the verification's time per step, and whether the two outputs are identical (greedy
decoding: they must be; seeded sampling: the same distribution, not the same tokens).
The repository's ``bench/`` suite (pytest-benchmark, baselines such as llama.cpp) goes
further; this needs nothing beyond the package.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import _core
from .tree import AutoTree

__all__ = ["BENCH_PROMPTS", "run_benchmark", "format_report"]

#: Built-in prompts: code completions and chat questions, short to keep prefill small.
BENCH_PROMPTS: tuple[str, ...] = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in a few sentences why the sky is blue.",
    "Complete this Python function:\n\ndef is_palindrome(s: str) -> bool:\n"
    '    """Return True if s reads the same forwards and backwards, ignoring case."""\n',
    "List five tips for writing clear technical documentation.",
    "Write a Python class Stack with push, pop, peek and is_empty methods.",
    "What is the difference between a process and a thread?",
    "Complete this Python function:\n\ndef count_vowels(text: str) -> int:\n"
    '    """Count the vowels (a, e, i, o, u) in text."""\n',
    "Summarize the plot of Romeo and Juliet in three sentences.",
)


def run_benchmark(gen, prompts: Sequence[str] | None = None, max_new_tokens: int = 128, repeat: int = 1,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Decode every prompt plainly and speculatively with ``gen`` (a Generator); see the
    module doc. ``progress(done, total)`` is called after each generation. Without a draft
    only plain decoding runs."""
    prompts = list(BENCH_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ValueError("the benchmark needs at least one prompt")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an integer >= 2 for a benchmark (the first new token comes "
                         f"from the prefill: no decoding step would be timed), got {max_new_tokens!r}")
    # The speculative mode: with the draft, or (no draft) by prompt lookup alone.
    fast = "speculative" if gen.draft is not None else "lookup" if gen.lookup is not None else None
    modes = ["plain"] + ([fast] if fast else [])
    if temperature > 0 and seed is None:
        seed = 0  # seeded sampling: the same draws in both modes
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    totals = {m: dict(tokens=0, seconds=0.0, calls=0, stepped=0.0, plain_steps=0, lookup_steps=0, lookup_accepted=0,
                      corpus_steps=0, corpus_accepted=0, draft_s=0.0, verify_s=0.0, prefill_s=0.0, prompt_tokens=0) for m in modes}
    outputs: dict[str, list[list[int]]] = {m: [] for m in modes}
    total, done = len(prompts) * repeat * len(modes), 0
    last_tree = ""  # the shape of the last drafting step (an AutoTree's choice at the end)
    for r in range(repeat):
        for i, prompt in enumerate(prompts):
            order = modes if (r * len(prompts) + i) % 2 == 0 else modes[::-1]
            for mode in order:
                gen.reset()  # no prompt cache: each mode prefills the whole prompt
                res = gen.generate(prompt, speculative=mode != "plain", **kw)
                s, t = res.stats, totals[mode]
                last_tree = s.tree or last_tree
                t["tokens"] += s.new_tokens
                t["seconds"] += s.decode_s
                t["calls"] += s.target_calls
                t["stepped"] += s.acceptance_length * s.target_calls  # tokens the decoding steps emitted
                t["plain_steps"] += s.plain_steps
                t["lookup_steps"] += s.lookup_steps
                t["lookup_accepted"] += s.lookup_accepted
                t["corpus_steps"] += s.corpus_steps
                t["corpus_accepted"] += s.corpus_accepted
                t["draft_s"] += s.draft_s
                t["verify_s"] += s.verify_s
                t["prefill_s"] += s.prefill_s
                t["prompt_tokens"] += s.prompt_tokens
                if r == 0:
                    outputs[mode].append(res.tokens)
                done += 1
                if progress is not None:
                    progress(done, total)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "cpu_path": _core.get_isa(),
        "threads": gen.target.threads,
        "model": gen.source.name or str(gen.source.path),
        "draft": None if gen.draft is None else gen.draft.device,
        "tree": dict(auto=True, shapes=[[s.top_k, s.depth, s.total_tokens] for s in gen.tree.shapes],
                     last=last_tree) if isinstance(gen.tree, AutoTree) else
        dict(top_k=gen.tree.top_k, depth=gen.tree.depth, total_tokens=gen.tree.total_tokens,
             min_prob=gen.tree.min_prob),
        "lookup": None if gen.lookup is None else dict(min_n=gen.lookup.min_n, max_n=gen.lookup.max_n,
                                                       max_tokens=gen.lookup.max_tokens),
        "corpus": None if gen.corpus is None or gen.lookup is None else
        dict(tokens=len(gen.corpus), **{k: getattr(gen.corpus.params, k) for k in
                                        ("min_n", "max_n", "max_tokens", "min_count", "min_frac")}),
        "sampling": dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        "prompts": len(prompts), "repeat": repeat, "max_new_tokens": max_new_tokens,
        "modes": {},
    }
    for mode, t in totals.items():
        steps = max(t["calls"], 1)
        drafting_steps = max(t["calls"] - t["plain_steps"] - t["lookup_steps"], 1)
        report["modes"][mode] = {
            "tokens_per_s": t["tokens"] / t["seconds"] if t["seconds"] > 0 else 0.0,
            "ms_per_token": 1e3 * t["seconds"] / max(t["tokens"], 1),
            "new_tokens": t["tokens"], "target_calls": t["calls"],
            "tau": t["stepped"] / steps,
            "prefill_tokens_per_s": t["prompt_tokens"] / t["prefill_s"] if t["prefill_s"] > 0 else 0.0,
            **({"plain_steps": t["plain_steps"], "lookup_steps": t["lookup_steps"],
                "lookup_tokens_accepted": t["lookup_accepted"],
                "corpus_steps": t["corpus_steps"], "corpus_tokens_accepted": t["corpus_accepted"],
                "draft_ms_per_step": 1e3 * t["draft_s"] / drafting_steps,
                "verify_ms_per_step": 1e3 * t["verify_s"] / steps} if mode != "plain" else {}),
        }
    if fast:
        p, s = report["modes"]["plain"], report["modes"][fast]
        report["speculative_mode"] = fast
        report["speculative_over_plain"] = s["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else 0.0
        report["outputs_identical"] = outputs["plain"] == outputs[fast]
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table."""
    tree = report["tree"]
    lines = [f"{report['model']}: {report['prompts']} prompts x {report['repeat']}, {report['max_new_tokens']} new "
             f"tokens, {report['threads']} threads ({report['cpu_path']}), "
             + ("greedy" if report["sampling"]["temperature"] == 0 else
                f"sampling T={report['sampling']['temperature']} top_p={report['sampling']['top_p']} "
                f"top_k={report['sampling']['top_k']} seed={report['sampling']['seed']}"),
             "",
             f"{'mode':12s} {'tok/s':>8s} {'ms/token':>9s} {'tau':>5s} {'draft ms/step':>14s} "
             f"{'verify ms/step':>15s}"]
    for mode, m in report["modes"].items():
        extra = (f" {m['draft_ms_per_step']:14.3f} {m['verify_ms_per_step']:15.3f}" if mode != "plain"
                 else f" {'':14s} {'':15s}")
        lines.append(f"{mode:12s} {m['tokens_per_s']:8.1f} {m['ms_per_token']:9.3f} {m['tau']:5.2f}{extra}")
    fast = report.get("speculative_mode")
    spec = report["modes"].get(fast) if fast else None
    if spec and spec["lookup_steps"]:
        lines.append(f"  ({spec['lookup_steps']} of {spec['target_calls']} speculative steps verified a prompt-lookup "
                     f"chain, {spec['lookup_tokens_accepted']} of its tokens accepted"
                     + (f"; {spec['corpus_steps']} of the chains came from the corpus, "
                        f"{spec['corpus_tokens_accepted']} tokens accepted" if spec["corpus_steps"] else "")
                     + "; the draft ms are per drafting step)")
    if "speculative_over_plain" in report:
        same = report["outputs_identical"]
        if fast != "speculative":
            shape = "no draft: prompt lookup alone"
        elif tree.get("auto"):
            shape = f"tree chosen while decoding among {len(tree['shapes'])} shapes, ({tree['last']}) at the end"
        else:
            shape = (f"tree top_k={tree['top_k']} depth={tree['depth']} tokens={tree['total_tokens']}"
                     f"{' min_prob=' + str(tree['min_prob']) if tree['min_prob'] else ''}")
        lines += ["", f"{fast} / plain: {report['speculative_over_plain']:.2f}x ({shape}); outputs "
                      + ("identical" if same else "differ" + (" (expected when sampling)"
                                                               if report["sampling"]["temperature"] > 0 else
                                                               ": greedy outputs must match, please report"))]
    else:
        lines += ["", "no draft for this model and prompt lookup off: plain decoding only (--draft PATH or "
                      "--lookup to compare)"]
    return "\n".join(lines)
