"""Kernel benchmarks at the default model's shapes: the quantized linear (each weight
format as the model stores it) and tree attention, T = 1, 4, 16, 64 rows, against PyTorch
fp32 on the same (decoded) weights in the same process; the float formats (the same
matrices stored as bf16, f16, f32) against PyTorch's bf16 or fp32 linear. Reports GB/s of weights streamed
and GOP/s next to the ratio."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dovetail_ext import _core
from dovetail_ext.quant import dequantize

TS = (1, 4, 16, 64)
MATS = {  # name in the model -> what it is
    "blk.0.attn_q": "q 576->576",
    "blk.0.attn_k": "k 576->192",
    "blk.0.ffn_up": "up 576->1536",
    "blk.0.ffn_down": "down 1536->576",
    "token_embd": "lm_head 576->49152",
}


@pytest.fixture(scope="module", autouse=True)
def _pool_without_fallback():
    """These benchmarks measure the kernels on every thread. The pool's stall fallback (a
    job its worker could not join counts as a stall; after a few, hundreds of jobs run on
    the calling thread alone) is for a machine where another process holds a core. Here
    it fired on the PyTorch comparisons' spinning OpenMP threads, and later tests measured
    one thread (T = 16 attention 1.7x slower). So it is off while they run."""
    _core.set_pool_fallback(False)
    yield
    _core.set_pool_fallback(True)


def _time(benchmark, fn, rounds):
    time.sleep(0.05)  # the PyTorch threads of the previous comparison settle
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
    return benchmark.stats.stats.median if benchmark.stats else None


def _torch_median(fn, rounds):
    """Median wall time of fn over `rounds` calls after one warm-up call."""
    ts = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:]))


def _linear_vs_torch(benchmark, threads, record, group, label, w, T, torch_dtype):
    """_core.linear on the weight w (a stored-format Weight) against PyTorch's linear on its
    decoded values in torch_dtype, T random rows; records time, GB/s, GOP/s and the ratio."""
    pw = _core.PackedWeight(w.dtype, w.shape[0], w.shape[1], np.ascontiguousarray(w.data))
    x = np.random.default_rng(0).standard_normal((T, w.shape[1])).astype(np.float32)
    Wt, xt = torch.from_numpy(dequantize(w)).to(torch_dtype), torch.from_numpy(x).to(torch_dtype)
    torch.set_num_threads(threads)
    rounds = 30 if w.shape[0] < 10000 else 10  # the LM head: fewer
    t_torch = _torch_median(lambda: torch.nn.functional.linear(xt, Wt), rounds)
    t_native = _time(benchmark, lambda: _core.linear(x, pw, threads=threads), rounds)
    if t_native is None:
        return
    gbs = w.data.nbytes / t_native / 1e9
    gops = 2 * T * w.shape[0] * w.shape[1] / t_native / 1e9
    vs = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
    benchmark.extra_info.update(dtype=w.dtype, GBps=round(gbs, 2), GOPps=round(gops, 1),
                                **{f"vs_torch_{vs}": round(t_torch / t_native, 2)})
    record(group, label, native_ms=t_native * 1e3, **{f"torch_{vs}_ms": t_torch * 1e3},
           **{f"ratio_vs_torch_{vs}": t_torch / t_native}, GBps=gbs, GOPps=gops)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", list(MATS))
def test_linear(benchmark, default_source, threads, record, name, T):
    w = default_source.weights[name]
    _linear_vs_torch(benchmark, threads, record, "linear", f"{MATS[name]} {w.dtype} T={T}", w, T, torch.float32)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", ["blk.0.ffn_up", "blk.0.ffn_down", "token_embd"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_linear_float(benchmark, default_source, threads, record, dtype, name, T):
    """Float weights (the model's matrices decoded, then stored as dtype) against PyTorch on
    the same values: bf16 (vdpbf16ps on bf16-rounded activations) against PyTorch's bf16
    linear, f16 and f32 against its fp32 linear."""
    from dovetail_ext.quant import quantize
    w = quantize(dequantize(default_source.weights[name]), dtype)
    _linear_vs_torch(benchmark, threads, record, "linear_float", f"{MATS[name]} {dtype} T={T}", w, T,
                     torch.bfloat16 if dtype == "bf16" else torch.float32)


@pytest.mark.parametrize("T", TS)
def test_attention(benchmark, threads, record, T):
    """9 query heads over 3 KV heads of 64 (the default model), 512 committed tokens."""
    rng = np.random.default_rng(0)
    n_past, H, KV, Dh = 512, 9, 3, 64
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    k = rng.standard_normal((KV, n_past + T, Dh)).astype(np.float32)
    v = rng.standard_normal((KV, n_past + T, Dh)).astype(np.float32)
    anc = np.tril(np.ones((T, T), bool))
    # The native side in the engine's cache layout: keys tiled, values padded to match.
    kt = _core.tile_keys(k)
    vp = np.zeros((KV, kt.shape[1] * 16, Dh), np.float32)
    vp[:, :n_past + T] = v
    t_native = _time(benchmark, lambda: _core.attention(q, kt, vp, n_past, anc, threads=threads), 30)
    if t_native is None:
        return
    # PyTorch fp32: SDPA over repeated K/V with an additive mask (what eager engines do).
    torch.set_num_threads(threads)
    qt = torch.from_numpy(q).permute(1, 0, 2)[None]
    kt = torch.from_numpy(k).repeat_interleave(H // KV, 0)[None]
    vt = torch.from_numpy(v).repeat_interleave(H // KV, 0)[None]
    mask = torch.zeros(T, n_past + T, dtype=torch.bool)
    mask[:, :n_past] = True
    mask[:, n_past:] = torch.from_numpy(anc)
    t_torch = _torch_median(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask), 30)
    kv_bytes = 2 * KV * (n_past + T) * Dh * 4
    benchmark.extra_info.update(GBps=round(kv_bytes / t_native / 1e9, 2), vs_torch_fp32=round(t_torch / t_native, 2))
    record("attention", f"T={T} n_past={n_past}", native_ms=t_native * 1e3, torch_fp32_ms=t_torch * 1e3,
           ratio_vs_torch_fp32=t_torch / t_native, GBps=kv_bytes / t_native / 1e9)
