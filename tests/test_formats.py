"""Loaders: the default GGUF against transformers' own GGUF loading, small GGUF files of
every weight type, Hugging Face checkpoints (single, sharded, f32/f16/bf16, tied or not,
converted to q8_0/q4_0/q4_1), and the dispatch of ``load_model_source``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from dovetail_ext.formats import (ModelSource, Weight, expected_weight_shapes, load_gguf, load_hf,
                                  load_model_source)
from dovetail_ext.errors import FormatError
from dovetail_ext.formats.tokenizer import Tokenizer

GGML = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


def dequant(w: Weight) -> np.ndarray:
    """float32 values of a Weight, whatever its storage."""
    if w.dtype in GGML:
        return quants.dequantize(w.data, GGML[w.dtype]).reshape(w.shape)
    if w.dtype == "bf16":
        return (w.data.astype(np.uint32) << 16).view(np.float32)
    return w.data.astype(np.float32)


# ------------------------------------------------------------------ the default model

def test_default_config(default_source: ModelSource) -> None:
    cfg = default_source.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_context) == (1536, 49152, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings and "output" not in default_source.weights
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert default_source.chat_template.startswith("{% for message in messages %}")
    assert default_source.metadata["tokenizer.ggml.pre"] == "smollm"


def test_default_dtypes_and_zero_copy(default_source: ModelSource) -> None:
    w = default_source.weights
    assert set(w) == set(expected_weight_shapes(default_source.config))
    assert w["token_embd"].dtype == "q8_0" and w["token_embd"].data.shape == (49152, 576 // 32 * 34)
    matrices = [n for n in w if n.startswith("blk.") and not n.endswith("norm")]
    norms = [n for n in w if n.endswith("norm")]
    assert len(matrices) == 210 and {w[n].dtype for n in matrices} == {"q4_1"}
    assert len(norms) == 61 and {w[n].dtype for n in norms} == {"f32"}
    assert all(w[n].data.dtype == np.float32 and w[n].data.shape == (576,) for n in norms)
    # Views of the file's map (read-only), not copies: only q/k rows are re-ordered copies.
    assert not w["token_embd"].data.flags.writeable
    assert not w["blk.0.ffn_down"].data.flags.writeable
    total = sum(x.data.nbytes for x in w.values())
    assert total < 100_000_000  # about the file size: nothing was expanded to fp32


@pytest.fixture(scope="module")
def hf_from_gguf(default_gguf_path: Path):
    """transformers' LlamaForCausalLM loaded from the default GGUF: fp32, un-permuted."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(default_gguf_path.parent),
                                                          gguf_file=default_gguf_path.name)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layer", [0, 29])
def test_qk_rows_match_transformers(default_source: ModelSource, hf_from_gguf, layer: int) -> None:
    w = default_source.weights
    p, hp = f"blk.{layer}.", f"model.layers.{layer}."
    for ours, theirs in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                         ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                         ("ffn_gate", "mlp.gate_proj"), ("ffn_down", "mlp.down_proj"),
                         ("attn_norm", "input_layernorm")]:
        np.testing.assert_array_equal(dequant(w[p + ours]), hf_from_gguf[hp + theirs + ".weight"],
                                      err_msg=ours)


def test_embedding_matches_transformers(default_source: ModelSource, hf_from_gguf) -> None:
    np.testing.assert_array_equal(dequant(default_source.weights["token_embd"]),
                                  hf_from_gguf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(default_source.weights["output_norm"].data, hf_from_gguf["model.norm.weight"])


# ------------------------------------------------------------------ small GGUF files

@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_tiny_gguf_every_type(tmp_path: Path, llama_gguf_writer, dtype: str) -> None:
    path = tmp_path / "tiny.gguf"
    tied = dtype in ("f32", "q4_1")
    originals = llama_gguf_writer(path, dtype=dtype, tied=tied, n_layers=2, hidden=64, n_head=4, n_kv=2)
    src = load_gguf(path)
    cfg = src.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert cfg.tie_word_embeddings == tied and ("output" in src.weights) != tied
    assert set(src.weights) == set(originals)
    for name, value in originals.items():
        w = src.weights[name]
        if value.ndim == 1:
            assert w.dtype == "f32"
            np.testing.assert_array_equal(w.data, value)
            continue
        assert w.dtype == dtype and w.shape == value.shape
        if dtype in GGML:  # quantization is per row, so the row order survives it
            want = quants.dequantize(quants.quantize(value, GGML[dtype]), GGML[dtype])
        elif dtype == "bf16":
            want = (quants.quantize(value, Q.BF16).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            want = value.astype(np.float16 if dtype == "f16" else np.float32).astype(np.float32)
        np.testing.assert_array_equal(dequant(w), want, err_msg=name)


def test_unpermute_is_inverse_of_llama_cpp(tmp_path: Path, llama_gguf_writer) -> None:
    """With 8 heads of 8 rows a wrong permutation cannot pass by accident."""
    originals = llama_gguf_writer(tmp_path / "t.gguf", dtype="f32", hidden=64, n_head=8, n_kv=4)
    src = load_gguf(tmp_path / "t.gguf")
    for name in ("blk.0.attn_q", "blk.0.attn_k", "blk.1.attn_k"):
        np.testing.assert_array_equal(src.weights[name].data, originals[name])
        assert src.weights[name].data.flags.c_contiguous


def test_tiny_qwen2_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """qwen2.* metadata, f32 q/k/v biases, and q/k rows as stored (no LLaMA permutation)."""
    originals = llama_gguf_writer(tmp_path / "q.gguf", arch="qwen2", dtype="f32", hidden=64, n_head=8, n_kv=4)
    src = load_gguf(tmp_path / "q.gguf")
    assert src.config.architecture == "qwen2" and src.config.attention_bias
    assert set(src.weights) == set(originals) == set(expected_weight_shapes(src.config))
    for name in ("blk.0.attn_q", "blk.1.attn_k", "blk.0.attn_q.bias", "blk.1.attn_v.bias"):
        assert src.weights[name].dtype == "f32"
        np.testing.assert_array_equal(src.weights[name].data, originals[name], err_msg=name)
    llama_gguf_writer(tmp_path / "m.gguf", arch="qwen2", skip=("blk.1.attn_k.bias",))
    with pytest.raises(FormatError, match=r"missing tensors blk\.1\.attn_k\.bias"):
        load_gguf(tmp_path / "m.gguf")


def test_tiny_qwen3_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """qwen3.* metadata and the q/k head norms (f32 [Dh]); q/k rows as stored."""
    originals = llama_gguf_writer(tmp_path / "q.gguf", arch="qwen3", dtype="f32", hidden=64, n_head=8, n_kv=4)
    src = load_gguf(tmp_path / "q.gguf")
    assert src.config.architecture == "qwen3" and src.config.qk_norm and not src.config.attention_bias
    assert set(src.weights) == set(originals) == set(expected_weight_shapes(src.config))
    for name in ("blk.0.attn_q", "blk.1.attn_k", "blk.0.attn_q_norm", "blk.1.attn_k_norm"):
        np.testing.assert_array_equal(src.weights[name].data, originals[name], err_msg=name)


def test_tiny_gemma3_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """gemma3.* metadata as llama.cpp runs it: q/k head norms and post norms, a GELU gate,
    scaled embeddings, every 6th layer global and the others local with the file's sliding
    window and RoPE base 10000; without a chat template in the file, Gemma's turns; the
    27B model's attention scale (1/sqrt(hidden / heads), not 1/sqrt(head_dim)) in its config."""
    from dovetail_ext.formats.tokenizer import GEMMA_TEMPLATE
    originals = llama_gguf_writer(tmp_path / "g.gguf", arch="gemma3", dtype="f32", hidden=64, n_head=4, n_kv=1,
                                  n_layers=7, meta=lambda w: w.add_sliding_window(32))
    src = load_gguf(tmp_path / "g.gguf")
    cfg = src.config
    assert (cfg.architecture, cfg.qk_norm, cfg.post_norms, cfg.activation, cfg.scale_embeddings) == \
        ("gemma3", True, True, "gelu_tanh", True)
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.rope_theta_local) == (32, 6, 10000.0)
    assert [cfg.local_layer(i) for i in range(7)] == [True] * 5 + [False, True]
    assert set(src.weights) == set(originals) == set(expected_weight_shapes(cfg))
    for name in ("blk.0.attn_q", "blk.1.post_attention_norm", "blk.6.post_ffw_norm"):
        np.testing.assert_array_equal(src.weights[name].data, originals[name], err_msg=name)
    assert src.chat_template == GEMMA_TEMPLATE
    assert src.config.query_pre_attn_scalar == 0.0
    # The 27B shape: 62 layers, hidden / heads = 24 against a head_dim of 16.
    llama_gguf_writer(tmp_path / "g27.gguf", arch="gemma3", dtype="f32", hidden=48, n_head=2, n_kv=1, head_dim=16,
                      ffn=32, n_layers=62)
    cfg = load_gguf(tmp_path / "g27.gguf").config
    assert (cfg.head_dim, cfg.query_pre_attn_scalar) == (16, 24.0)


def test_tiny_gemma2_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """gemma2.* metadata as llama.cpp runs it: post norms, GELU gate, scaled embeddings, even
    layers local with the file's window and the one RoPE base, soft-capping from the file
    (50 and 30 where it leaves them out); the 46-layer 27B model's attention scale; the
    C container keeps them all."""
    from dovetail_ext.formats.tokenizer import GEMMA_TEMPLATE

    def meta(w):
        w.add_sliding_window(32)
        w.add_float32("gemma2.attn_logit_softcapping", 20.0)
        w.add_float32("gemma2.final_logit_softcapping", 10.0)

    originals = llama_gguf_writer(tmp_path / "g.gguf", arch="gemma2", dtype="f32", n_layers=3, meta=meta)
    src = load_gguf(tmp_path / "g.gguf")
    cfg = src.config
    assert (cfg.architecture, cfg.qk_norm, cfg.post_norms, cfg.activation, cfg.scale_embeddings) == \
        ("gemma2", False, True, "gelu_tanh", True)
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.rope_theta_local) == (32, 2, 0.0)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (20.0, 10.0)
    assert set(src.weights) == set(originals) == set(expected_weight_shapes(cfg))
    assert src.chat_template == GEMMA_TEMPLATE
    llama_gguf_writer(tmp_path / "d.gguf", arch="gemma2", dtype="f32", n_layers=2, meta=lambda w: w.add_sliding_window(8))
    assert (load_gguf(tmp_path / "d.gguf").config.attn_logit_softcapping,
            load_gguf(tmp_path / "d.gguf").config.final_logit_softcapping) == (50.0, 30.0)
    llama_gguf_writer(tmp_path / "g27.gguf", arch="gemma2", dtype="f32", hidden=48, n_head=2, n_kv=1, head_dim=16,
                      ffn=32, n_layers=46)
    assert load_gguf(tmp_path / "g27.gguf").config.query_pre_attn_scalar == 24.0
    from dovetail_ext.capi import export_c_weights
    head = export_c_weights(tmp_path / "g.dtw", tmp_path / "g.gguf").read_bytes()
    assert np.frombuffer(head[168:180], np.float32).tolist() == [0.0, 20.0, 10.0]


def test_tiny_smollm3_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """smollm3.* files as llama.cpp runs them: LLaMA's tensors (q / k rows permuted), every
    fourth layer without RoPE."""
    originals = llama_gguf_writer(tmp_path / "s.gguf", arch="smollm3", dtype="f32", n_layers=4)
    src = load_gguf(tmp_path / "s.gguf")
    assert (src.config.architecture, src.config.nope_interval) == ("smollm3", 4)
    for name in ("blk.0.attn_q", "blk.3.attn_k"):
        np.testing.assert_array_equal(src.weights[name].data, originals[name], err_msg=name)


def _k_blocks(qtype):
    from conftest import random_k_blocks

    def make(value: np.ndarray):
        blocks, decoded = random_k_blocks(qtype, *value.shape, seed=int(qtype))
        return qtype, blocks, decoded
    return make


def test_k_quants_converted_at_load(tmp_path: Path, llama_gguf_writer) -> None:
    """formats.convert, checked against gguf.quants' decoding of the stored blocks: Q5_0
    becomes q8_0 exactly; Q4_K becomes q4_1 with float16 sub-block scales (within 2^-11 of
    each scale times 15, plus the offset's rounding); Q6_K / Q5_K become q8_0 within half
    a q8_0 step of each block (and the float16 rounding of its scale)."""
    types = {"blk.0.ffn_up": Q.Q5_0, "blk.0.ffn_gate": _k_blocks(Q.Q4_K), "blk.1.ffn_down": _k_blocks(Q.Q6_K),
             "blk.1.attn_output": _k_blocks(Q.Q5_K), "token_embd": Q.Q5_0}
    originals = llama_gguf_writer(tmp_path / "k.gguf", arch="qwen2", dtype="q8_0", types=types, hidden=256,
                                  n_head=4, n_kv=2, ffn=512)
    src = load_gguf(tmp_path / "k.gguf")
    assert src.metadata["converted"] == {"q5_0->q8_0": 2, "q4_k->q4_1": 1, "q6_k->q8_0": 1, "q5_k->q8_0": 1}
    want_q5 = {n: quants.dequantize(quants.quantize(originals[n], Q.Q5_0), Q.Q5_0) for n in ("blk.0.ffn_up", "token_embd")}
    for name, want in want_q5.items():
        assert src.weights[name].dtype == "q8_0"
        np.testing.assert_array_equal(dequant(src.weights[name]), want, err_msg=name)

    w = src.weights["blk.0.ffn_gate"]
    assert w.dtype == "q4_1"
    got, want = dequant(w), originals["blk.0.ffn_gate"]
    blocks = w.data.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32).reshape(want.shape[0], -1)
    m = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32).reshape(want.shape[0], -1)
    bound = np.repeat(15 * np.abs(d) * 2.0 ** -11 + np.abs(m) * 2.0 ** -11, 32, axis=1) * (1 + 1e-6)
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).max() > 0  # the scales did round: the bound is what is tested

    for name in ("blk.1.ffn_down", "blk.1.attn_output"):
        w = src.weights[name]
        assert w.dtype == "q8_0"
        got, want = dequant(w), originals[name]
        step = np.repeat(w.data.reshape(-1, 34)[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
                         .reshape(want.shape[0], -1), 32, axis=1)
        # ggml's Q8_0 rounds x / (amax / 127), then stores that scale as float16.
        assert np.all(np.abs(got - want) <= (0.5 + 127 * 2.0 ** -11) * step * (1 + 1e-3)), name


@pytest.mark.parametrize("qtype,cols", [(Q.Q5_0, 96), (Q.Q4_K, 512), (Q.Q6_K, 768)])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_conversion_matches_numpy_twin(qtype, cols: int, threads: int) -> None:
    """_core.convert_gguf_blocks against formats.convert's numpy twin, bit for bit, on 37
    rows whose block scales span 1e-8 .. 1e3 (subnormal and normal float16 sub-block
    scales; zero blocks). A scale that overflows float16 once converted is refused."""
    from conftest import random_k_blocks

    from dovetail_ext import _core
    from dovetail_ext.formats.convert import convert_blocks_numpy
    rng = np.random.default_rng(int(qtype))
    if qtype == Q.Q5_0:
        blocks = quants.quantize(rng.standard_normal((37, cols)).astype(np.float32), Q.Q5_0)
    else:
        blocks, _ = random_k_blocks(qtype, 37, cols, seed=int(qtype))
    per_row = blocks.reshape(37, -1, blocks.shape[1] // (cols // (32 if qtype == Q.Q5_0 else 256)))
    at = {Q.Q5_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [per_row.shape[2] - 2]}[qtype]
    scales = np.exp(rng.uniform(np.log(1e-8), np.log(1e3), per_row.shape[:2])).astype(np.float16)
    scales[0, 0] = 0
    for o in at:
        per_row[:, :, o:o + 2] = scales[..., None].view(np.uint8)
    blocks = per_row.reshape(37, -1)
    if qtype == Q.Q5_0:
        blocks[1, :] = 0
    want_dtype, want = convert_blocks_numpy(blocks, qtype, cols)
    dtype, got = _core.convert_gguf_blocks(qtype.name, blocks, cols, threads)
    assert dtype == want_dtype
    np.testing.assert_array_equal(got, want)
    if qtype != Q.Q5_0:  # (Q5_0 keeps its float16 scale)
        from dovetail_ext.formats.convert import convert_blocks
        for o in at:
            per_row[3, 1, o:o + 2] = np.array([6e4], np.float16).view(np.uint8)
        with pytest.raises(ValueError, match=f"{qtype.name} matrix holds a value that is not finite, or a scale"):
            convert_blocks(per_row.reshape(37, -1), qtype, cols)
        for o in at:  # a NaN or inf scale in the file (a corrupt block)
            per_row[3, 1, o:o + 2] = np.array([np.nan if o == at[0] else np.inf], np.float16).view(np.uint8)
        with pytest.raises(ValueError, match="not finite"):
            convert_blocks(per_row.reshape(37, -1), qtype, cols)
    with pytest.raises(ValueError, match="kind must be Q5_0, Q4_K or Q6_K"):
        _core.convert_gguf_blocks("Q2_K", blocks, cols, 1)
    with pytest.raises(ValueError, match="data has shape"):
        _core.convert_gguf_blocks(qtype.name, blocks[:, :-1].copy(), cols, 1)
    with pytest.raises(ValueError, match="not whole blocks"):
        _core.convert_gguf_blocks(qtype.name, blocks, cols + 1, 1)


def test_conversion_in_chunks_equals_whole_rows() -> None:
    """A matrix larger than one conversion chunk (about 4M values) is converted in parallel
    row chunks; each row's result must not depend on it."""
    from dovetail_ext.formats.convert import convert_blocks_numpy as convert_blocks
    values = np.random.default_rng(0).standard_normal((140_001, 32)).astype(np.float32)
    stored = quants.quantize(values, Q.Q5_1)
    dtype, whole = convert_blocks(stored, Q.Q5_1, 32)
    assert dtype == "q8_0" and whole.shape == (140_001, 34)
    for rows in (slice(0, 7), slice(131_070, 131_080), slice(140_000, 140_001)):
        np.testing.assert_array_equal(whole[rows], convert_blocks(stored[rows], Q.Q5_1, 32)[1])


def test_llama3_rope_freqs(tmp_path: Path, llama_gguf_writer) -> None:
    """A GGUF's rope_freqs tensor (LLaMA 3.1+) turns on the frequency divisors; a Hugging
    Face config with "llama3" RoPE scaling computes the same divisors, whose frequencies
    equal transformers' own."""
    originals = llama_gguf_writer(tmp_path / "l3.gguf", shapes={"rope_freqs": (8,)}, n_head=4)
    src = load_gguf(tmp_path / "l3.gguf")
    assert src.config.rope_freq_factors and src.weights["rope_freqs"].dtype == "f32"
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, originals["rope_freqs"])
    pytest.importorskip("torch")
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    save_tiny_llama(tmp_path / "hf", rope_scaling=scaling)
    src = load_hf(tmp_path / "hf")
    assert src.config.rope_freq_factors and set(src.weights) == set(expected_weight_shapes(src.config))
    import transformers
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").model.rotary_emb.inv_freq
    i = np.arange(0, src.config.head_dim, 2)
    ours = src.config.rope_theta ** (-i / src.config.head_dim) / src.weights["rope_freqs"].data
    np.testing.assert_allclose(ours, ref.numpy(), rtol=2e-6)
    f = src.weights["rope_freqs"].data  # kept, blended, divided
    assert f[0] == 1 and f[-1] == 32 and np.any((f > 1) & (f < 32))


def test_linear_rope_scaling(tmp_path: Path, llama_gguf_writer) -> None:
    """Linear RoPE scaling (rope.scaling.type "linear" in a GGUF, rope_scaling "linear" in a
    config.json) becomes rope_freqs divisors all equal to the factor; with a rope_freqs tensor
    too, or a factor that is not positive, the file is refused."""
    from gguf import RopeScalingType

    def linear(factor):
        return lambda w: (w.add_rope_scaling_type(RopeScalingType.LINEAR), w.add_rope_scaling_factor(factor))
    llama_gguf_writer(tmp_path / "lin.gguf", n_head=4, meta=linear(8.0))
    src = load_gguf(tmp_path / "lin.gguf")
    assert src.config.rope_freq_factors and set(src.weights) == set(expected_weight_shapes(src.config))
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, np.full(8, 8.0, np.float32))
    llama_gguf_writer(tmp_path / "both.gguf", n_head=4, shapes={"rope_freqs": (8,)}, meta=linear(8.0))
    with pytest.raises(FormatError, match="both linear RoPE scaling and a rope_freqs tensor"):
        load_gguf(tmp_path / "both.gguf")
    llama_gguf_writer(tmp_path / "zero.gguf", n_head=4, meta=linear(0.0))
    with pytest.raises(FormatError, match="rope.scaling.factor = 0.0 must be positive"):
        load_gguf(tmp_path / "zero.gguf")
    save_tiny_llama(tmp_path / "hf", rope_scaling=dict(rope_type="linear", factor=2.5))
    src = load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, np.full(src.config.head_dim // 2, 2.5, np.float32))


def test_gguf_eot_is_an_eos(tmp_path: Path, llama_gguf_writer) -> None:
    llama_gguf_writer(tmp_path / "t.gguf", meta=lambda w: w.add_eot_token_id(0))
    src = load_gguf(tmp_path / "t.gguf")
    assert src.config.eos_token_ids == (2, 0)
    assert src.tokenizer.eos_ids == frozenset({0, 2})
    assert src.tokenizer.eos_token == "<|im_end|>"  # the file's EOS, not the lowest id


# ------------------------------------------------------------------ Hugging Face checkpoints

def _mistral_spm() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "mistral-common (test dependency) ships the SentencePiece model"
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def save_tiny_llama(directory: Path, *, dtype: str = "float32", tied: bool = False,
                    shard: str | None = None, seed: int = 0, **config: Any) -> dict[str, np.ndarray]:
    """A random tiny LlamaForCausalLM saved by transformers; returns its state as numpy
    (bf16 as uint16 bit patterns)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2, **config)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # norms are all ones at init: make them distinct
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    shutil.copy(_mistral_spm(), directory / "tokenizer.model")
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


@pytest.mark.parametrize("tied,layout,scalar,caps", [(True, "layer_types", 16, None), (False, "pattern", 24, None),
                                                     (False, "layer_types", 16, (0.02, 3.0))])
def test_hf_gemma3_matches_transformers(tmp_path: Path, tied: bool, layout: str, scalar: int, caps) -> None:
    """A Gemma3ForCausalLM saved by transformers: its config (GELU gate, a window of 6, one
    global layer in three, the local RoPE base, linear scaling of the global layers), norms
    stored as 1 + w, and logits equal to transformers' over 20 tokens. ``pattern``: a
    config.json written by transformers < 4.53 (sliding_window_pattern, rope_local_base_freq).
    ``scalar``: query_pre_attn_scalar, the head_dim or, as in the 27B model, another.
    ``caps``: soft-capping of the scores and the logits, off by default in Gemma 3; the final
    one bites (without it the logits differ); the score cap is a key transformers keeps but
    does not apply to Gemma 3, and so does the loader."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    hc = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=scalar, sliding_window=6, layer_types=kinds,
        attn_logit_softcapping=caps and caps[0], final_logit_softcapping=caps and caps[1],
        attn_implementation="eager",
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}})
    model = transformers.Gemma3ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))  # (initialized to 0: the norms would all scale by 1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(_mistral_spm(), tmp_path / "tokenizer.model")
    if layout == "pattern":
        raw = json.loads((tmp_path / "config.json").read_text())
        raw.pop("layer_types"), raw.pop("rope_parameters")
        raw.update(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=10000.0,
                   rope_scaling={"rope_type": "linear", "factor": 4.0})
        (tmp_path / "config.json").write_text(json.dumps(raw))
    src = load_hf(tmp_path)
    cfg = src.config
    assert (cfg.architecture, cfg.activation, cfg.sliding_window, cfg.sliding_window_pattern, cfg.rope_theta_local,
            cfg.rope_theta) == ("gemma3", "gelu_tanh", 6, 3, 10000.0, 1e6)
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, np.full(8, 4.0, np.float32))
    np.testing.assert_array_equal(src.weights["blk.1.post_ffw_norm"].data,
                                  model.model.layers[1].post_feedforward_layernorm.weight.detach().numpy() + 1)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (0.0, caps[1] if caps else 0.0)
    _assert_logits_match(model, src)
    if caps:
        import dataclasses
        with pytest.raises(AssertionError):
            _assert_logits_match(model, dataclasses.replace(src, config=dataclasses.replace(cfg, final_logit_softcapping=0.0)))
    _refused_when_changed(tmp_path, [
        ("query_pre_attn_scalar", -4, "query_pre_attn_scalar -4 must be a positive number"),
        ("query_pre_attn_scalar", "16", "query_pre_attn_scalar = '16' has the wrong type"),
        ("final_logit_softcapping", -30.0, "final_logit_softcapping = -30.0 must be a positive number or null"),
        ("hidden_activation", "relu", "activation 'relu' is not supported")])


@pytest.mark.parametrize("final_cap,scalar", [(3.0, 16), (None, 24)])
def test_hf_gemma2_matches_transformers(tmp_path: Path, final_cap, scalar) -> None:
    """A Gemma2ForCausalLM saved by transformers: its soft-capped scores and logits (caps
    small enough to bite: without either the logits differ; a null final cap is off), a window of 6 in every other layer, norms
    stored as 1 + w, logits equal to transformers' over 20 tokens; with the 27B model's
    attention scale (query_pre_attn_scalar 24 over a head_dim of 16) too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    hc = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=scalar,
                                   sliding_window=6, attn_logit_softcapping=0.02, final_logit_softcapping=final_cap,
                                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(hc).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(_mistral_spm(), tmp_path / "tokenizer.model")
    src = load_hf(tmp_path)
    cfg = src.config
    assert (cfg.architecture, cfg.qk_norm, cfg.post_norms, cfg.sliding_window, cfg.sliding_window_pattern,
            cfg.rope_theta_local, cfg.attn_logit_softcapping, cfg.final_logit_softcapping,
            cfg.query_pre_attn_scalar) == ("gemma2", False, True, 6, 2, 0.0, 0.02, final_cap or 0.0,
                                           0.0 if scalar == 16 else 24.0)
    assert [cfg.local_layer(i) for i in range(4)] == [True, False, True, False]
    _assert_logits_match(model, src)
    import dataclasses  # (the caps bite: 2.6% of the logits' range without the score cap, 1.2% without the final)
    for other in (dataclasses.replace(cfg, attn_logit_softcapping=0.0), dataclasses.replace(cfg, final_logit_softcapping=0.0)):
        if other != cfg:
            with pytest.raises(AssertionError):
                _assert_logits_match(model, dataclasses.replace(src, config=other))
    _refused_when_changed(tmp_path, [("query_pre_attn_scalar", 0, "query_pre_attn_scalar 0 must be a positive number"),
                                     ("attn_logit_softcapping", -1.0, "attn_logit_softcapping = -1.0 must be")])


def test_hf_smollm3_matches_transformers(tmp_path: Path) -> None:
    """A SmolLM3ForCausalLM saved by transformers: every fourth layer without RoPE
    (no_rope_layers), logits equal to transformers' over 20 tokens; a pattern other than one
    layer every n is refused."""
    model, src = _tiny_checkpoint(tmp_path, "SmolLM3", 8, num_hidden_layers=8, rope_theta=10000.0,
                                  max_position_embeddings=128)
    assert (src.config.architecture, src.config.nope_interval) == ("smollm3", 4)
    assert [src.config.nope_layer(i) for i in range(8)] == [False, False, False, True] * 2
    _assert_logits_match(model, src)
    import dataclasses  # (RoPE in every layer is another model)
    with pytest.raises(AssertionError):
        _assert_logits_match(model, dataclasses.replace(src, config=dataclasses.replace(src.config, nope_interval=0)))
    _refused_when_changed(tmp_path, [("no_rope_layers", [1, 0, 1, 1, 1, 0, 1, 1], "is not one layer without RoPE")])


def _assert_logits_match(model: Any, src: ModelSource, n: int = 20, context: int = 32, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The engine's logits over n random tokens equal the transformers model's (within 3e-4
    of their largest); returns (ids, logits)."""
    import torch

    from dovetail_ext.target import TargetEngine
    ids = np.random.default_rng(seed).integers(0, src.config.vocab_size, n)
    got, _ = TargetEngine(src, context=context, threads=2).forward(ids, logit_rows=range(n))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4 * np.abs(want).max())
    return ids, want


def _refused_when_changed(directory: Path, changes: list[tuple[str, Any, str]]) -> None:
    """load_hf refuses the checkpoint with each (config.json key, value) set, naming it."""
    raw = json.loads((directory / "config.json").read_text())
    for key, value, message in changes:
        (directory / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(FormatError, match=message):
            load_hf(directory)
    (directory / "config.json").write_text(json.dumps(raw))


def _tiny_phi3(tmp_path: Path, seed: int, **config: Any) -> tuple[Any, ModelSource]:
    return _tiny_checkpoint(tmp_path, "Phi3", seed, num_hidden_layers=2, tie_word_embeddings=False, **config)


def _tiny_checkpoint(tmp_path: Path, family: str, seed: int, **config: Any) -> tuple[Any, ModelSource]:
    """A random ``{family}ForCausalLM`` (hidden 64, 4 heads over 2 KV heads, norms around 1)
    saved by transformers, and load_hf of it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hc = getattr(transformers, family + "Config")(**{**base, **config})
    model = getattr(transformers, family + "ForCausalLM")(hc).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(_mistral_spm(), tmp_path / "tokenizer.model")
    return model, load_hf(tmp_path)


@pytest.mark.parametrize("window", [0, 5])
def test_hf_phi3_matches_transformers(tmp_path: Path, window: int) -> None:
    """A Phi3ForCausalLM saved by transformers: its fused qkv_proj and gate_up_proj split
    into q / k / v and gate / up, and logits equal to transformers' over 20 tokens; with a
    sliding window, in every layer as transformers applies it. Partial rotary embeddings and
    other RoPE scalings are refused."""
    model, src = _tiny_phi3(tmp_path, 5, max_position_embeddings=128, original_max_position_embeddings=128,
                            sliding_window=window or None)
    cfg = src.config
    assert (cfg.architecture, cfg.sliding_window, cfg.sliding_window_pattern) == ("phi3", window, 0)
    assert set(src.weights) == set(expected_weight_shapes(cfg))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    qkv, gate_up = sd["model.layers.1.self_attn.qkv_proj.weight"], sd["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(src.weights["blk.1.attn_k"].data, qkv[64:96])
    np.testing.assert_array_equal(src.weights["blk.1.ffn_gate"].data, gate_up[:96])
    np.testing.assert_array_equal(src.weights["blk.1.ffn_up"].data, gate_up[96:])
    _assert_logits_match(model, src)
    _refused_when_changed(tmp_path, [("partial_rotary_factor", 0.75, "partial_rotary_factor 0.75"),
                                 ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "RoPE scaling 'yarn'")])


@pytest.mark.parametrize("attention_factor", [None, 1.25])
def test_hf_phi3_longrope_matches_transformers(tmp_path: Path, attention_factor) -> None:
    """Phi-3 LongRoPE (the 128k models, Phi-3.5): short and long factors, the attention
    factor (given, or derived from max / original context) on cos and sin. Within the
    original context, logits equal transformers' over 40 tokens (the short factors); an
    engine with a longer context takes the long ones for every position, as llama.cpp does
    (transformers switches once the sequence outgrows the original context)."""
    torch = pytest.importorskip("torch")
    from dovetail_ext.target import TargetEngine
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)], "long_factor": [9.0] * 8,
               **({"attention_factor": attention_factor} if attention_factor else {})}
    model, src = _tiny_phi3(tmp_path, 6, max_position_embeddings=1024, original_max_position_embeddings=64,
                            rope_scaling=scaling)
    cfg = src.config
    want_factor = attention_factor or np.sqrt(1 + np.log(1024 / 64) / np.log(64))
    assert cfg.rope_long_context == 64 and abs(cfg.rope_attn_factor - want_factor) < 1e-9 and cfg.rope_freq_factors
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, np.float32(scaling["short_factor"]))
    np.testing.assert_array_equal(src.weights["rope_freqs_long"].data, np.float32(scaling["long_factor"]))
    ids, want = _assert_logits_match(model, src, n=40, context=64, seed=2)
    with torch.no_grad():
        long_rope = model(torch.from_numpy(np.concatenate([ids, ids, [5]]))[None]).logits[0, :40].numpy()
    # (81 tokens: transformers recomputes every position with the long factors)
    beyond, _ = TargetEngine(src, context=128, threads=2).forward(ids, logit_rows=range(40))
    np.testing.assert_allclose(beyond, long_rope, rtol=0, atol=3e-4 * np.abs(want).max())
    assert np.abs(long_rope - want).max() > 1e-2 * np.abs(want).max()


def test_tiny_phi3_gguf(tmp_path: Path, llama_gguf_writer) -> None:
    """phi3.* files as llama.cpp's converter writes them: attn_qkv holds q, k and v, ffn_up
    holds gate then up, rows not permuted (NeoX RoPE); LongRoPE files run their short factors."""
    originals = llama_gguf_writer(tmp_path / "p.gguf", arch="phi3", dtype="q8_0", tied=False, n_layers=2)
    src = load_gguf(tmp_path / "p.gguf")
    assert src.config.architecture == "phi3" and set(src.weights) == set(expected_weight_shapes(src.config))
    from dovetail_ext.quant import dequantize
    for name in ("blk.0.attn_q", "blk.0.attn_k", "blk.1.attn_v", "blk.1.ffn_gate", "blk.1.ffn_up"):
        got = dequantize(src.weights[name])
        assert got.shape == originals[name].shape, name
        np.testing.assert_allclose(got, originals[name], atol=np.abs(originals[name]).max() / 100, err_msg=name)
    # LongRoPE (the 128k files): the short factors and the attention factor, up to the original context
    def longrope(w):
        w.add_rope_scaling_attn_factors(1.19)
        w.add_rope_scaling_orig_ctx_len(96)

    originals = llama_gguf_writer(tmp_path / "p128k.gguf", arch="phi3", dtype="f32", tied=False, meta=longrope,
                                  shapes={"rope_factors_short": (8,), "rope_factors_long": (8,)})
    src = load_gguf(tmp_path / "p128k.gguf")
    assert (src.config.rope_long_context, src.config.rope_attn_factor, src.config.rope_freq_factors) == (96, 1.19, True)
    np.testing.assert_array_equal(src.weights["rope_freqs"].data, originals["rope_factors_short"])
    np.testing.assert_array_equal(src.weights["rope_freqs_long"].data, originals["rope_factors_long"])
    llama_gguf_writer(tmp_path / "nolimit.gguf", arch="phi3", dtype="f32", tied=False,
                      shapes={"rope_factors_short": (8,), "rope_factors_long": (8,)})
    with pytest.raises(FormatError, match="original_context_length"):
        load_gguf(tmp_path / "nolimit.gguf")


HF_NAMES = {"token_embd": "model.embed_tokens.weight", "output": "lm_head.weight", "output_norm": "model.norm.weight"}
for _ours, _theirs in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
                       ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                       ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                       ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
    for _i in range(2):
        HF_NAMES[f"blk.{_i}.{_ours}"] = f"model.layers.{_i}.{_theirs}.weight"


def _f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x.astype(np.float32)


@pytest.mark.parametrize("dtype,tied,shard", [("float32", False, None), ("float16", True, None),
                                              ("bfloat16", False, "20KB"), ("bfloat16", True, None)])
def test_hf_weights_bit_exact(tmp_path: Path, dtype: str, tied: bool, shard: str | None) -> None:
    state = save_tiny_llama(tmp_path, dtype=dtype, tied=tied, shard=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    src = load_hf(tmp_path)
    cfg = src.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (96, 64, 2, 4, 2)
    assert cfg.rope_theta == 5000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_context == 128
    assert cfg.tie_word_embeddings == tied and ("output" in src.weights) != tied
    want_dtype = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    for name, w in src.weights.items():
        original = state[HF_NAMES[name]]
        if original.ndim == 1:  # norms are float32 whatever the checkpoint stores
            assert w.dtype == "f32"
            np.testing.assert_array_equal(w.data, _f32(original), err_msg=name)
        else:
            assert w.dtype == want_dtype and w.data.dtype == original.dtype
            np.testing.assert_array_equal(w.data, original, err_msg=name)  # raw bits (bf16 as uint16)
            assert not w.data.flags.writeable  # a view of the file


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_hf_qwen_checkpoint(tmp_path: Path, arch: str) -> None:
    """A Qwen2ForCausalLM / Qwen3ForCausalLM saved by transformers: config, the q/k/v biases
    or q/k head norms, and the weights bit for bit."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.Qwen3Config
    model_cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.Qwen3ForCausalLM
    cfg = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or p.ndim == 1:  # zeros / ones at init
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(_mistral_spm(), tmp_path / "tokenizer.model")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    src = load_hf(tmp_path)
    c = src.config
    assert c.architecture == arch and c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert c.rope_theta == 1e6 and set(src.weights) == set(expected_weight_shapes(c))
    for i in range(2):
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            if arch == "qwen2":
                np.testing.assert_array_equal(src.weights[f"blk.{i}.{ours}.bias"].data,
                                              state[f"model.layers.{i}.self_attn.{theirs}.bias"])
            np.testing.assert_array_equal(src.weights[f"blk.{i}.{ours}"].data,
                                          state[f"model.layers.{i}.self_attn.{theirs}.weight"])
        for ours, theirs in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")) if arch == "qwen3" else ():
            np.testing.assert_array_equal(src.weights[f"blk.{i}.{ours}"].data,
                                          state[f"model.layers.{i}.self_attn.{theirs}.weight"])


@pytest.mark.parametrize("target,nmse", [("q8_0", 1e-4), ("q4_0", 2e-2), ("q4_1", 2e-2)])
def test_hf_quantize_at_load(tmp_path: Path, target: str, nmse: float) -> None:
    state = save_tiny_llama(tmp_path, dtype="bfloat16")
    src = load_hf(tmp_path, weights=target)
    for name, w in src.weights.items():
        original = _f32(state[HF_NAMES[name]])
        if original.ndim == 1:
            assert w.dtype == "f32"
            continue
        assert w.dtype == target and w.data.dtype == np.uint8
        np.testing.assert_array_equal(w.data, quants.quantize(original, GGML[target]), err_msg=name)
        err = np.mean((dequant(w) - original) ** 2) / np.mean(original ** 2)
        assert err < nmse, (name, err)


@pytest.mark.parametrize("target", ["f32", "f16", "bf16"])
def test_hf_float_conversions(tmp_path: Path, target: str) -> None:
    state = save_tiny_llama(tmp_path, dtype="float32")
    src = load_hf(tmp_path, weights=target)
    w, original = src.weights["blk.1.ffn_up"], state["model.layers.1.mlp.up_proj.weight"]
    assert w.dtype == target
    if target == "bf16":
        import torch
        want = torch.from_numpy(original).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(w.data, want)
    else:
        np.testing.assert_array_equal(w.data, original.astype(np.float16 if target == "f16" else np.float32))


def test_hf_tokenizer_json_and_chat_template(tmp_path: Path, default_source: ModelSource) -> None:
    """A checkpoint with tokenizer.json + tokenizer_config.json, written from the default
    model's tokenizer: same ids, template from the config, no BOS by default."""
    save_tiny_llama(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    default_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    import json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": default_source.chat_template, "bos_token": "<|im_start|>",
         "eos_token": "<|im_end|>", "add_bos_token": False}))
    src = load_hf(tmp_path)
    tok: Tokenizer = src.tokenizer
    text = "<|im_start|>user\nPrint 12345 in Python:\n    print(12345)<|im_end|>"
    assert tok.encode(text) == default_source.tokenizer.encode(text)
    assert tok.bos_id == 1 and tok.eos_ids == frozenset({2}) and not tok.add_bos
    assert src.chat_template == default_source.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == default_source.tokenizer.apply_chat_template(msgs)


def test_hf_chat_template_file_wins(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    src = load_hf(tmp_path)
    assert src.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# ------------------------------------------------------------------ dispatch

def test_load_model_source_dispatch(tmp_path: Path, llama_gguf_writer, monkeypatch) -> None:
    gguf_path = tmp_path / "m.bin"  # the magic decides, not the file name
    llama_gguf_writer(gguf_path)
    assert load_model_source(gguf_path).metadata["format"] == "gguf"
    with pytest.raises(ValueError, match="GGUF model is used as stored"):
        load_model_source(gguf_path, weights="q8_0")

    hf_dir = tmp_path / "hf"
    save_tiny_llama(hf_dir)
    src = load_model_source(hf_dir, weights="q4_0")
    assert src.metadata["format"] == "hf" and src.weights["blk.0.ffn_up"].dtype == "q4_0"
    assert load_model_source(hf_dir / "config.json").metadata["format"] == "hf"

    import dovetail_ext.formats as formats
    seen = []
    monkeypatch.setattr(formats, "load_gguf", lambda p: seen.append(Path(p)) or "loaded")
    assert load_model_source(None) == "loaded"
    assert seen[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and seen[0].is_file()

    with pytest.raises(FileNotFoundError):
        load_model_source(tmp_path / "nothing-here")
