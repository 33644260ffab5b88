"""Partial target offload (``TargetEngine(gpu_layers=N)``): the first N layers on a device
engine (here its host backend, ``device="emulated"``; on a GPU in the tests marked cuda),
the rest on the CPU engine from the hidden states it hands over.

The offloaded target computes the first layers in bf16, so it is a slightly different
function from the CPU-only target; what must hold exactly is batch invariance (a token's
logits do not depend on the batch it is in) and hence lossless speculation against that
same target."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dovetail_ext import _core
from dovetail_ext.sampling import SamplingParams, TokenChooser
from dovetail_ext.speculative import SpecTimes, speculative_step
from dovetail_ext.target import TargetEngine
from native_helpers import make_source, random_weights, tiny_config
from test_speculative import SHAPES, plain_greedy, random_draft, start_state

HAVE_GPU = _core.cuda_compiled() and _core.cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU and a build with CUDA "
                               f"(CUDA compiled: {_core.cuda_compiled()}, devices: {_core.cuda_device_count()})")


# What the device layers must do as the CPU's: plain LLaMA; LLaMA 3.1+ RoPE frequency
# divisors; Qwen2's q/k/v biases before RoPE; Qwen3's RMSNorm of every q and k head; Gemma 3's
# post norms, GELU gate, scaled embeddings, and local layers with a window of 4 (shorter than
# the test sequences and trees) and their own RoPE tables; Gemma 2's soft-capped scores
# (and a 27B-like score scale) in every other layer local.
VARIANTS = {"llama": {}, "scaled_rope": dict(rope_factors=True), "qwen2": dict(bias=True),
            "qwen3": dict(qk_norm=True), "gemma3": dict(window=4), "gemma2": dict(window=4), "smollm3": {},
            "odd_width": dict(heads=6, head_dim=14, ffn=100)}
ARCH_SOURCES = ["llama", "qwen2", "qwen3", "gemma3", "gemma2", "smollm3"]


@functools.cache
def arch_source(name):
    import dataclasses
    cfg = tiny_config(gqa=3, tied=True, vocab=301, layers=3, **VARIANTS[name])
    if name == "gemma2":
        cfg = dataclasses.replace(cfg, architecture="gemma2", qk_norm=False, sliding_window_pattern=2,
                                  rope_theta_local=0.0, attn_logit_softcapping=0.3, final_logit_softcapping=30.0,
                                  query_pre_attn_scalar=24.0)
    if name == "smollm3":  # (its layers without RoPE: the device rotates them by cos 1, sin 0)
        cfg = dataclasses.replace(cfg, architecture="smollm3", nope_interval=2)
    # hidden 84 and FFN 100 are not multiples of 8 (the CUDA GEMM's 16-byte loads): f32 matrices
    return make_source(cfg, random_weights(cfg, seed=1), "f32" if name == "odd_width" else "q8_0")


@pytest.fixture(scope="module")
def source():
    return arch_source("llama")


def engines(source, gpu_layers=1, device="emulated", **kw):
    return (TargetEngine(source, context=256, threads=1, **kw),
            TargetEngine(source, context=256, threads=1, gpu_layers=gpu_layers, device=device, **kw))


@pytest.mark.parametrize("which", ARCH_SOURCES + ["scaled_rope", "odd_width"])
def test_offloaded_target_matches_the_cpu_target(which):
    source = arch_source(which)
    toks = np.random.default_rng(0).integers(0, 301, 11)
    for n in (1, 2):
        cpu, off = engines(source, n)
        assert off.gpu_layers == n and cpu.gpu_layers == 0
        l1, f1 = cpu.forward(toks, logit_rows=range(11), feature_rows=range(11))
        l2, f2 = off.forward(toks, logit_rows=range(11), feature_rows=range(11))
        # (bf16 weights and activations in the first layers: a few bf16 roundings deep)
        assert np.abs(l1 - l2).max() <= 4e-2 * np.abs(l1).max()
        assert np.abs(f1 - f2).max() <= 4e-2 * np.abs(f1).max()
        top2 = np.sort(l1, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.05 * np.abs(l1).max()
        np.testing.assert_array_equal(l2.argmax(1)[clear], l1.argmax(1)[clear])
        off.commit()
        assert off.n_past == 11 and off.device_stats["calls"] == 1


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_offloaded_gemma_layers_are_the_cpu_layers(arch):
    """The device layers' Gemma parts, each of which moves the logits by less than the
    bf16 tolerance above: the offloaded target is at least 1.5 times closer (relative RMS
    over 48 positions) to the CPU target than to one with the local layers' RoPE base, the
    GELU gate, the window or the embedding scale changed; for Gemma 2, the score cap or the
    score scale."""
    import dataclasses
    cfg = tiny_config(gqa=3, tied=True, vocab=301, layers=3, window=4, theta=1e5)
    wrongs = [dict(rope_theta_local=cfg.rope_theta), dict(activation="silu"), dict(sliding_window=0),
              dict(scale_embeddings=False)]
    if arch == "gemma2":
        cfg = dataclasses.replace(cfg, architecture="gemma2", qk_norm=False, sliding_window_pattern=2,
                                  rope_theta_local=0.0, attn_logit_softcapping=1.0, query_pre_attn_scalar=64.0)
        wrongs = [dict(attn_logit_softcapping=0.0), dict(query_pre_attn_scalar=0.0), dict(sliding_window=0)]
    src = make_source(cfg, random_weights(cfg, seed=1), "q8_0")
    toks = np.random.default_rng(0).integers(0, 301, 48)

    def logits(c, **kw):
        eng = TargetEngine(dataclasses.replace(src, config=c), context=256, threads=1, max_batch=64, **kw)
        return eng.forward(toks, logit_rows=range(48))[0]

    def rms(a, b):
        return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))
    off = logits(cfg, gpu_layers=2, device="emulated")
    right = rms(off, logits(cfg))
    for wrong in wrongs:
        assert 1.5 * right < rms(off, logits(dataclasses.replace(cfg, **wrong))), wrong


@pytest.mark.parametrize("device", ["emulated", pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])])
@pytest.mark.parametrize("which", ARCH_SOURCES)
def test_offloaded_target_is_batch_invariant(which, device):
    """Logits of a token are bitwise the same in a prefill chunk, alone, or inside a tree.
    80 tokens: the CUDA attention cuts each token's keys in chunks of 32 by their place in
    its list of visible keys, and the tree's true branch sits at scratch slots 0, 3, 4, 6
    (list places 62-65), across the chunk boundary at 64."""
    _, off = engines(arch_source(which), 2, device=device)
    toks = np.random.default_rng(1).integers(0, 301, 80)
    whole, _ = off.forward(toks, logit_rows=range(80))
    off.reset()
    alone = []
    for t in toks:
        lg, _ = off.forward([t])
        off.commit()
        alone.append(lg[0])
    np.testing.assert_array_equal(np.array(alone), whole)
    # a tree: the true continuation as one branch among siblings
    off.truncate(62)
    parents = [-1, 0, 1, 0, 3, 4, 4]
    anc = np.eye(7, dtype=bool)
    for r, p in enumerate(parents):
        if p >= 0:
            anc[r] |= anc[p]
    tree_toks = [toks[62], 7, 9, toks[63], toks[64], 11, toks[65]]
    lg, _ = off.forward(tree_toks, positions=[62, 63, 64, 63, 64, 65, 65], ancestors=anc, logit_rows=range(7))
    np.testing.assert_array_equal(lg[[0, 3, 4, 6]], whole[62:66])


def test_commit_keeps_both_sides_in_step(source):
    _, off = engines(source, 1)
    _, direct = engines(source, 1)
    toks = np.random.default_rng(2).integers(0, 301, 6)
    for e in (off, direct):
        e.forward(toks[:3]); e.commit()
    anc = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=bool)
    off.forward([toks[3], 9, toks[4]], positions=[3, 4, 4], ancestors=anc)
    off.commit([0, 2])
    direct.forward(toks[3:5]); direct.commit()
    for layer in range(3):  # layer 0 on the device, 1 and 2 on the CPU
        for a, b in zip(off.read_kv(layer), direct.read_kv(layer)):
            np.testing.assert_array_equal(a, b)
    before = off.n_past
    with pytest.raises(ValueError, match="strictly increasing"):
        off.forward([1, 2]); off.commit([1, 0])
    assert off.n_past == before
    off.commit([0, 1])
    assert off.n_past == before + 2 and off._prefix.n_past == before + 2


@pytest.mark.parametrize("which,params", [("llama", p) for p in SHAPES] +
                         [(w, SHAPES[-1]) for w in ARCH_SOURCES[1:]], ids=str)
def test_greedy_speculation_with_an_offloaded_target_equals_its_plain_decoding(which, params):
    source = arch_source(which)
    _, off = engines(source, 2)
    draft = random_draft(source, off)
    prompt = [5, 17, 42, 99, 3]
    truth = plain_greedy(off, prompt, 30)
    state = start_state(off, draft, prompt, truth[0])
    out = [truth[0]]
    while len(out) < 30:
        emitted, _ = speculative_step(state, off, draft, params, SamplingParams(), TokenChooser(SamplingParams()),
                                      SpecTimes())
        out += emitted
    assert out[:30] == truth


def test_native_greedy_verification_leaves_an_offloaded_target_to_forward(source):
    """verify_greedy answers None for a partly offloaded target: its callers verify through
    forward, which runs the device layers first."""
    cpu, off = engines(source, 1)
    assert off.verify_greedy([1, 2], [-1, 0]) is None and off.n_past == 0
    assert cpu.verify_greedy([1, 2], [-1, 0]) is not None


def test_offload_arguments(source):
    for bad in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match="gpu_layers must be an integer in"):
            TargetEngine(source, context=32, gpu_layers=bad, device="emulated")
    with pytest.raises(ValueError, match="needs a device"):
        TargetEngine(source, context=32, gpu_layers=1, device="cpu")
    if not HAVE_GPU:
        with pytest.raises(ValueError, match="CUDA"):
            TargetEngine(source, context=32, gpu_layers=1, device="cuda")
    cpu = TargetEngine(source, context=32, threads=1)
    assert cpu.device_stats is None
    off = TargetEngine(source, context=32, threads=1, gpu_layers=1, device="emulated")
    with pytest.raises(ValueError, match="forward_hidden"):  # the CPU side alone needs hidden states
        off._engine.forward(np.array([1], np.int32), np.array([0], np.int32))
    with pytest.raises(ValueError, match="hidden"):
        off._engine.forward_hidden(np.zeros((1, 5), np.float32), np.array([0], np.int32))
    with pytest.raises(ValueError, match="finite"):
        off._engine.forward_hidden(np.full((1, source.config.hidden_size), np.nan, np.float32),
                                   np.array([0], np.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        off.forward([10**5])
    assert off.n_past == 0 and off._prefix.pending == 0


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("which", ARCH_SOURCES + ["odd_width"])
def test_cuda_offload_matches_emulated_and_stays_exact(which):
    source = arch_source(which)
    _, emu = engines(source, 2)
    _, gpu = engines(source, 2, device="cuda")
    toks = np.random.default_rng(3).integers(0, 301, 9)
    l1, _ = emu.forward(toks, logit_rows=range(9))
    l2, _ = gpu.forward(toks, logit_rows=range(9))
    assert np.abs(l1 - l2).max() <= 1e-2 * np.abs(l1).max()
    gpu.reset()
    whole, _ = gpu.forward(toks, logit_rows=range(9))
    gpu.reset()
    alone = []
    for t in toks:
        lg, _ = gpu.forward([t]); gpu.commit()
        alone.append(lg[0])
    np.testing.assert_array_equal(np.array(alone), whole)  # the device GEMM is batch invariant
    draft = random_draft(source, gpu, **({"weights_dtype": "f32"} if which == "odd_width" else {}))
    truth = plain_greedy(gpu, [5, 17, 3], 30)
    for params in SHAPES:
        state = start_state(gpu, draft, [5, 17, 3], truth[0])
        out = [truth[0]]
        while len(out) < 30:
            emitted, _ = speculative_step(state, gpu, draft, params, SamplingParams(),
                                          TokenChooser(SamplingParams()), SpecTimes())
            out += emitted
        assert out[:30] == truth, params
