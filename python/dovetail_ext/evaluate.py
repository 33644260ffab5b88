"""Perplexity of a model on a text, the way llama.cpp's ``llama-perplexity`` measures it.

The text is tokenized as it is (no chat template) and cut into chunks of ``chunk`` tokens;
each chunk runs from an empty cache (its first token replaced by BOS for a model whose
tokenizer adds one), and only the tokens after its first half are scored (positions
chunk/2 + 1 .. chunk - 1, as llama-perplexity counts them), so that every scored token sees
more than ``chunk / 2`` tokens before it. Perplexity is
exp(mean negative log-likelihood) over the scored tokens, with the standard error of that
mean carried through (ppl x stderr of the NLL). A leftover shorter than a chunk is not
scored.

    from dovetail_ext import load
    from dovetail_ext.evaluate import perplexity

    r = perplexity(load(), open("wiki.test.raw").read(), chunk=512)
    print(f"{r.perplexity:.3f} +/- {r.stderr:.3f} over {r.tokens} tokens")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .api import Generator
from .errors import as_int, check_text

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    perplexity: float
    stderr: float        # of the perplexity: ppl x the standard error of the mean NLL
    nll: float           # mean negative log-likelihood of the scored tokens, nats per token
    tokens: int          # tokens scored
    chunks: int
    chunk: int           # tokens per chunk (those after its first half are scored)
    text_tokens: int     # tokens in the whole text
    seconds: float
    tokens_per_s: float  # chunk tokens run per second (scored or not)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(generator: Generator, text: str, chunk: int = 512, max_chunks: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``generator``'s target on ``text`` (see the module's docstring).

    Args:
        chunk: tokens per chunk, in [4, the generator's context].
        max_chunks: score at most this many chunks (default: all whole chunks).
        progress: called as progress(done, total) after each chunk.
    """
    if not isinstance(generator, Generator):
        raise ValueError(f"generator must be a dovetail_ext Generator (from load()), got {type(generator).__name__}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    chunk = as_int("chunk", chunk, lo=4)
    if chunk > generator.target.context:
        raise ValueError(f"chunk of {chunk} tokens exceeds the generator's context of {generator.target.context} "
                         "(load with a larger context=)")
    tok = generator.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    ids = tok.encode(check_text(text, "the text"), add_bos=False)
    total = len(ids) // chunk
    if max_chunks is not None:
        total = min(total, as_int("max_chunks", max_chunks))
    if total < 1:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one chunk of {chunk}")
    first = chunk // 2 + 1  # (llama-perplexity: the logits of rows chunk/2 .. chunk-2)
    nll = np.empty((total, chunk - first), dtype=np.float64)
    t0 = time.perf_counter()
    for c in range(total):
        part = ids[c * chunk:(c + 1) * chunk]
        if bos is not None:  # (a model that starts its inputs with BOS gets one at each chunk's start)
            part[0] = bos
        nll[c] = -generator.score(part, first)[0]
        if progress is not None:
            progress(c + 1, total)
    seconds = time.perf_counter() - t0
    flat = nll.ravel()
    mean = float(flat.mean())
    sem = float(flat.std(ddof=1) / math.sqrt(flat.size)) if flat.size > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(perplexity=ppl, stderr=ppl * sem, nll=mean, tokens=int(flat.size), chunks=total,
                            chunk=chunk, text_tokens=len(ids), seconds=seconds,
                            tokens_per_s=total * chunk / seconds if seconds > 0 else 0.0)
