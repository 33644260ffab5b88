"""End to end on the default model, 2 threads: native decode and prefill tokens/s next to
the PyTorch fp32 reference (transformers' LlamaForCausalLM on the same GGUF, its own KV
cache) in the same run, and the verify cost curve (one target call over T tokens,
relative to T = 1)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dovetail_ext.target import TargetEngine

NEW_TOKENS = 128
PROMPT = "Write a Python function that checks whether a number is prime, and explain it."


def _prompt_ids(src):
    tok = src.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))


def _native_decode(eng, ids, n):
    eng.reset()
    logits, _ = eng.forward(ids); eng.commit()
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits, _ = eng.forward(out[-1:]); eng.commit()
    return n / (time.perf_counter() - t0), out


def _torch_decode(model, ids, n):
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = []
        t0 = time.perf_counter()
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([out[-1:]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return n / (time.perf_counter() - t0), out


@pytest.fixture(scope="module")
def torch_model(default_source):
    from transformers import AutoModelForCausalLM
    path = default_source.path
    import os
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def test_decode_vs_torch_fp32(benchmark, default_source, torch_model, threads, record):
    torch.set_num_threads(threads)
    ids = _prompt_ids(default_source)
    eng = TargetEngine(default_source, context=1024, threads=threads)
    n = NEW_TOKENS if benchmark.enabled else 4
    torch_tps, _ = _torch_decode(torch_model, ids, n)
    result = {}

    def run():
        result["tps"], result["out"] = _native_decode(eng, ids, n)
    benchmark.pedantic(run, rounds=3 if benchmark.enabled else 1, iterations=1)
    native_tps = result["tps"]
    benchmark.extra_info.update(native_tok_s=round(native_tps, 1), torch_fp32_tok_s=round(torch_tps, 1),
                                ratio=round(native_tps / torch_tps, 2))
    record("decode", "default model greedy", native_tok_s=native_tps, torch_fp32_tok_s=torch_tps,
           ratio_vs_torch_fp32=native_tps / torch_tps, new_tokens=n, threads=threads)


def test_prefill_vs_torch_fp32(benchmark, default_source, torch_model, threads, record):
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n = 512 if benchmark.enabled else 32
    ids = rng.integers(100, 40000, n).tolist()
    eng = TargetEngine(default_source, context=1024, threads=threads, max_batch=128)

    def native():
        eng.reset()
        for s in range(0, n, 128):
            eng.forward(ids[s:s + 128]); eng.commit()
    t0 = time.perf_counter()
    with torch.no_grad():
        torch_model(torch.tensor([ids]))
    t_torch = time.perf_counter() - t0
    benchmark.pedantic(native, rounds=3 if benchmark.enabled else 1, iterations=1, warmup_rounds=1)
    if not benchmark.stats:
        return
    t_native = benchmark.stats.stats.median
    record("prefill", f"pp{n}", native_tok_s=n / t_native, torch_fp32_tok_s=n / t_torch,
           ratio_vs_torch_fp32=t_torch / t_native)


@pytest.mark.parametrize("T", [1, 2, 4, 8, 16, 32])
def test_verify_cost(benchmark, default_source, threads, record, T):
    """One target call over a T-token chain after a 256-token prefix (logits for all T)."""
    eng = TargetEngine(default_source, context=512, threads=threads)
    rng = np.random.default_rng(0)
    eng.forward(rng.integers(100, 40000, 128).tolist()); eng.commit()
    eng.forward(rng.integers(100, 40000, 128).tolist()); eng.commit()
    toks = rng.integers(100, 40000, T)
    benchmark.pedantic(lambda: eng.forward(toks, logit_rows=range(T)), rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.stats:
        record("verify_cost", f"T={T}", ms=benchmark.stats.stats.median * 1e3)
