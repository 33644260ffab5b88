"""Helpers for tests of the native core: ISA switching and tiny random models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from dovetail_ext import _core
from dovetail_ext.config import LlamaConfig
from dovetail_ext.formats.base import ModelSource, expected_weight_shapes
from dovetail_ext.quant import quantize

ALL_ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512bf16")


def isa_params() -> list:
    """One pytest param per ISA path; paths this CPU lacks are skipped with the reason."""
    have = set(_core.supported_isas())
    return [pytest.param(i, marks=() if i in have else pytest.mark.skip(reason=f"CPU lacks {i}"), id=i)
            for i in ALL_ISAS]


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    before = _core.get_isa()
    _core.set_isa(name)
    try:
        yield
    finally:
        _core.set_isa(before)


def tiny_config(*, gqa: int = 3, tied: bool = True, layers: int = 2, vocab: int = 301, heads: int = 6,
                head_dim: int = 16, ffn: int = 160, theta: float = 10000.0, bias: bool = False,
                rope_factors: bool = False, qk_norm: bool = False, window: int = 0) -> LlamaConfig:
    """A small LLaMA config with awkward sizes (hidden 96 with 6 heads of 16 by default);
    ``bias``: a Qwen2 config (q/k/v biases); ``rope_factors``: RoPE frequency divisors
    (the ``rope_freqs`` weight of LLaMA 3.1+); ``qk_norm``: a Qwen3 config (q/k head norms);
    ``window`` > 0: a Gemma 3 config (q/k head norms, post norms, GELU gate, scaled
    embeddings) whose layers are local with this sliding window except every third, local
    layers rotating with RoPE base 10000 and the others with ``theta`` x 100."""
    gemma = dict(post_norms=True, activation="gelu_tanh", scale_embeddings=True, sliding_window=window,
                 sliding_window_pattern=3, rope_theta_local=10000.0) if window else {}
    return LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=ffn, num_layers=layers,
                       num_heads=heads, num_kv_heads=heads // gqa, head_dim=head_dim,
                       rope_theta=theta * 100 if window else theta, rms_norm_eps=1e-5, max_context=512,
                       tie_word_embeddings=tied,
                       architecture="qwen2" if bias else "gemma3" if window else "qwen3" if qk_norm else "llama",
                       attention_bias=bias, qk_norm=qk_norm or bool(window), rope_freq_factors=rope_factors, **gemma)


def random_weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with LLaMA-like scales: unit-ish norms, 1/sqrt(fan_in) matrices,
    biases around 0 (as large as Qwen2's are relative to their projections)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_weight_shapes(cfg).items():
        if name.endswith(".bias"):
            out[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "rope_freqs":  # divisors from 1 to 32
            out[name] = np.exp2(rng.uniform(0, 5, shape)).astype(np.float32)
        elif len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    out["token_embd"] *= 8.0  # embeddings are not fan-in scaled
    return out


def make_source(cfg: LlamaConfig, weights: dict[str, np.ndarray], dtype: str = "f32",
                embd_dtype: str | None = None) -> ModelSource:
    """A ModelSource with matrices stored as ``dtype`` (norms f32), no tokenizer."""
    ws = {}
    for name, w in weights.items():
        if w.ndim == 1:
            ws[name] = quantize(w, "f32")
        elif name in ("token_embd", "output") and embd_dtype:
            ws[name] = quantize(w, embd_dtype)
        else:
            ws[name] = quantize(w, dtype)
    return ModelSource(config=cfg, weights=ws, tokenizer=None, name="tiny")


def random_tree(rng: np.random.Generator, T: int) -> np.ndarray:
    """parents[T] of a random tree rooted at 0 (parents[0] = -1, parents[i] < i)."""
    parents = np.full(T, -1, dtype=np.int64)
    for i in range(1, T):
        parents[i] = rng.integers(0, i)
    return parents


def tree_ancestors(parents: np.ndarray) -> np.ndarray:
    """bool [T, T]: row t marks t and all its ancestors."""
    T = len(parents)
    anc = np.zeros((T, T), dtype=bool)
    for t in range(T):
        j = t
        while j >= 0:
            anc[t, j] = True
            j = parents[j]
    return anc


def tree_depths(parents: np.ndarray) -> np.ndarray:
    d = np.zeros(len(parents), dtype=np.int64)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return d
