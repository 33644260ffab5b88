"""The native target engine: full forward against Hugging Face and the reference twin,
batch invariance across prefill / decode / trees, KV commit, bad inputs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from dovetail_ext import reference
from dovetail_ext.quant import quantize
from dovetail_ext.target import TargetEngine
from native_helpers import (isa_params, make_source, random_tree, random_weights, tiny_config, tree_ancestors,
                            tree_depths, use_isa)

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


@pytest.fixture(params=isa_params())
def isa(request):
    with use_isa(request.param):
        yield request.param


def hf_model(cfg, weights, rope_scaling=None):
    """transformers LlamaForCausalLM (Qwen2ForCausalLM for a config with attention biases)
    with our canonical weights (fp32, eager attention); ``rope_scaling``: its RoPE scaling
    parameters (the engine takes them as ``weights["rope_freqs"]``)."""
    if cfg.architecture == "gemma3":
        return hf_gemma3(cfg, weights, rope_scaling)
    if cfg.attention_bias:
        from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM as Model
    elif cfg.qk_norm:
        from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM as Model
    else:
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM as Model

    hc = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                  rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_context,
                  tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager",
                  **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    m = Model(hc).eval()
    sd = {"model.embed_tokens.weight": weights["token_embd"], "model.norm.weight": weights["output_norm"]}
    assert ("rope_freqs" in weights) == bool(rope_scaling)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = weights["output"]
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = weights[f"blk.{i}.{ours}"]
        for ours in ("attn_q", "attn_k", "attn_v") if cfg.attention_bias else ():
            sd[f"model.layers.{i}.{names[ours]}.bias"] = weights[f"blk.{i}.{ours}.bias"]
        for ours, theirs in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")) if cfg.qk_norm else ():
            sd[f"model.layers.{i}.self_attn.{theirs}.weight"] = weights[f"blk.{i}.{ours}"]
    missing, unexpected = m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m


def hf_gemma3(cfg, weights, rope_scaling=None):
    """transformers Gemma3ForCausalLM with our canonical weights (fp32, eager attention). Its
    RMSNorms scale by (1 + w): GGUF files store 1 + w, as our weights are. ``rope_scaling``:
    the global layers' RoPE parameters beyond the base."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    kinds = ["sliding_attention" if cfg.local_layer(i) else "full_attention" for i in range(cfg.num_layers)]
    glob = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})}
    hc = Gemma3TextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                          num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, query_pre_attn_scalar=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                          max_position_embeddings=cfg.max_context, sliding_window=cfg.sliding_window,
                          layer_types=kinds, hidden_activation="gelu_pytorch_tanh",
                          rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": cfg.rope_theta_local},
                                           "full_attention": glob},
                          tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    m = Gemma3ForCausalLM(hc).eval()
    sd = {"model.embed_tokens.weight": weights["token_embd"], "model.norm.weight": weights["output_norm"] - 1}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = weights["output"]
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = weights[f"blk.{i}.{ours}"]
        for ours, theirs in norms.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = weights[f"blk.{i}.{ours}"] - 1
    missing, unexpected = m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m


@pytest.mark.parametrize("gqa,tied,arch", [(1, True, "llama"), (3, False, "llama"), (3, True, "llama"),
                                           (1, False, "llama"), (3, False, "qwen2"), (1, True, "qwen2"),
                                           (3, True, "qwen3"), (1, False, "qwen3"), (3, True, "gemma3"),
                                           (1, False, "gemma3")])
def test_forward_matches_transformers(gqa, tied, arch):
    """LLaMA against LlamaForCausalLM; Qwen2 (q/k/v biases) against Qwen2ForCausalLM; Qwen3
    (q/k head norms) against Qwen3ForCausalLM; Gemma 3 (post norms, GELU gate, scaled
    embeddings, sliding-window layers: a window of 5 over 13 tokens) against
    Gemma3ForCausalLM."""
    cfg = tiny_config(gqa=gqa, tied=tied, theta=100000.0 if gqa == 3 else 10000.0, bias=arch == "qwen2",
                      qk_norm=arch == "qwen3", window=5 if arch == "gemma3" else 0, layers=3)
    w = random_weights(cfg, seed=gqa + 2 * tied)
    eng = TargetEngine(make_source(cfg, w, "f32"), context=64, threads=2)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 13)
    logits, _ = eng.forward(ids, logit_rows=range(13))
    with torch.no_grad():
        want = hf_model(cfg, w)(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference_every_format(isa, dtype):
    """Against the fp64-matmul twin on the same decoded weights; quantized formats add the
    int8 activation rounding (about 1/254 of each block's max per element), bf16 the bf16
    activation rounding (2^-9 of each element; measured 0.4% of the largest logit here)."""
    cfg = tiny_config(gqa=3, tied=False)
    src = make_source(cfg, random_weights(cfg, seed=11), dtype, embd_dtype="q8_0" if dtype.startswith("q") else None)
    assert_matches_reference(src, np.random.default_rng(1).integers(0, cfg.vocab_size, 9),
                             tol={"f32": 3e-4, "f16": 3e-4, "bf16": 1.5e-2}.get(dtype, 4e-2))


def assert_matches_reference(src, ids, tol: float) -> None:
    """The engine's logits and features for ``ids`` against the fp64-matmul twin's, within
    ``tol`` of each one's largest magnitude."""
    eng = TargetEngine(src, context=64, threads=2)
    T = len(ids)
    logits, feats = eng.forward(ids, logit_rows=range(T), feature_rows=range(T))
    model = reference.LlamaReference.from_source(src)
    with torch.no_grad():
        want_l, want_f = model(torch.from_numpy(ids), None, None, model.new_cache(16))
    np.testing.assert_allclose(logits, want_l.numpy(), rtol=0, atol=tol * np.abs(want_l.numpy()).max())
    np.testing.assert_allclose(feats, want_f.numpy(), rtol=0, atol=tol * np.abs(want_f.numpy()).max())


def test_mixed_formats_within_a_layer_match_reference(isa):
    """q|k|v and gate|up run as one stacked matrix when their parts share a format; a layer
    whose parts differ (as in llama.cpp's mixed quantizations) runs them apart and must give
    the same model."""
    cfg = tiny_config(gqa=3, tied=False)
    w = random_weights(cfg, seed=13)
    src = make_source(cfg, w, "q8_0", embd_dtype="q8_0")
    for name, dtype in (("blk.0.attn_v", "q4_0"), ("blk.1.ffn_up", "f16"), ("blk.1.attn_k", "q4_1")):
        src.weights[name] = quantize(w[name], dtype)
    assert_matches_reference(src, np.random.default_rng(3).integers(0, cfg.vocab_size, 7), tol=4e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_llama3_rope_scaling_matches_transformers(tied):
    """LLaMA 3.1's RoPE scaling as the rope_freqs divisors (llama.cpp's form, computed from
    the config by formats.hf) against transformers' "llama3" rope over 150 positions: one
    frequency kept, one blended, the rest divided by the factor."""
    from dovetail_ext.formats.hf import llama3_rope_factors
    cfg = tiny_config(gqa=3, tied=tied, theta=500000.0, rope_factors=True)
    w = random_weights(cfg, seed=21)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    w["rope_freqs"] = llama3_rope_factors(cfg.rope_theta, cfg.head_dim, 8.0, 1.0, 4.0, 64)
    assert w["rope_freqs"][0] == 1 and 1 < w["rope_freqs"][1] < 8 and w["rope_freqs"][2] == 8
    eng = TargetEngine(make_source(cfg, w, "f32"), context=256, threads=2, max_batch=160)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, 150)
    logits, _ = eng.forward(ids, logit_rows=range(150))
    with torch.no_grad():
        want = hf_model(cfg, w, scaling)(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=3e-4 * np.abs(want).max())
    plain = dict(w)
    plain.pop("rope_freqs")
    import dataclasses
    unscaled, _ = TargetEngine(make_source(dataclasses.replace(cfg, rope_freq_factors=False), plain, "f32"),
                               context=256, max_batch=160).forward(ids, logit_rows=range(150))
    assert np.abs(unscaled - logits).max() > 0.05 * np.abs(want).max()  # the factors matter here


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_linear_rope_scaling_matches_transformers(arch):
    """Linear RoPE scaling (positions divided by the factor; Gemma 3 4B+ on its global
    layers) as rope_freqs divisors all equal to the factor, against transformers' "linear"
    rope over 40 positions."""
    cfg = tiny_config(gqa=3, tied=True, rope_factors=True, window=6 if arch == "gemma3" else 0, layers=3)
    w = random_weights(cfg, seed=31)
    w["rope_freqs"] = np.full(cfg.head_dim // 2, 4.0, np.float32)
    eng = TargetEngine(make_source(cfg, w, "f32"), context=64, threads=2)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, 40)
    logits, _ = eng.forward(ids, logit_rows=range(40))
    with torch.no_grad():
        want = hf_model(cfg, w, dict(rope_type="linear", factor=4.0))(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=3e-4 * np.abs(want).max())


def test_rope_factors_match_reference(isa):
    cfg = tiny_config(gqa=3, tied=False, rope_factors=True)
    src = make_source(cfg, random_weights(cfg, seed=23), "q8_0", embd_dtype="q8_0")
    assert_matches_reference(src, np.random.default_rng(6).integers(0, cfg.vocab_size, 11), tol=4e-2)


def test_longrope_matches_reference(isa):
    """LongRoPE: the attention factor scales RoPE's cos and sin, in the engine as in its twin
    (an engine that left it out differs from both); an engine whose context is above the
    original one rotates with the long factors, exactly as one given them as rope_freqs."""
    import dataclasses
    cfg = tiny_config(gqa=3, tied=False, rope_factors=True)
    w = random_weights(cfg, seed=24)
    short, long = (np.linspace(1.0, f, cfg.head_dim // 2).astype(np.float32) for f in (3.0, 30.0))
    w["rope_freqs"] = short
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, 11)
    scaled = dataclasses.replace(cfg, rope_attn_factor=1.3, rope_long_context=64)
    src = make_source(scaled, {**w, "rope_freqs_long": long}, "f32")
    assert_matches_reference(src, ids, tol=1e-4)  # (context 64: the short factors)
    def last(source, context):
        return TargetEngine(source, context=context, threads=2).forward(ids, logit_rows=[10])[0]
    plain = last(make_source(cfg, w, "f32"), 64)
    assert np.abs(last(src, 64) - plain).max() > 1e-2 * np.abs(plain).max()
    beyond = last(src, 65)
    np.testing.assert_array_equal(beyond, last(make_source(scaled, {**w, "rope_freqs": long, "rope_freqs_long": short},
                                                           "f32"), 64))
    assert np.abs(beyond - last(src, 64)).max() > 1e-2 * np.abs(plain).max()


@pytest.mark.parametrize("stacked", [True, False])
def test_qkv_bias_matches_reference(isa, stacked):
    """Qwen2's q/k/v biases, on the stacked q|k|v matrix and on separate ones (formats
    differ), against the twin; and without them the model is not the same."""
    cfg = tiny_config(gqa=3, tied=False, bias=True)
    w = random_weights(cfg, seed=17)
    src = make_source(cfg, w, "q8_0", embd_dtype="q8_0")
    if not stacked:
        src.weights["blk.1.attn_k"] = quantize(w["blk.1.attn_k"], "q4_1")
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 9)
    assert_matches_reference(src, ids, tol=4e-2)
    zero = make_source(cfg, {k: (0 * v if k.endswith(".bias") else v) for k, v in w.items()}, "q8_0",
                       embd_dtype="q8_0")
    with_bias, _ = TargetEngine(src, context=16).forward(ids)
    without, _ = TargetEngine(zero, context=16).forward(ids)
    assert np.abs(with_bias - without).max() > 0.05 * np.abs(with_bias).max()


@pytest.mark.parametrize("stacked", [True, False])
def test_qk_norm_matches_reference(isa, stacked):
    """Qwen3's q/k head norms against the twin; without them the model is not the same."""
    cfg = tiny_config(gqa=3, tied=False, qk_norm=True)
    w = random_weights(cfg, seed=19)
    for name in w:
        if name.endswith(("attn_q_norm", "attn_k_norm")):
            w[name] = w[name] * 3.0  # far from the unit norm the heads would have without them
    src = make_source(cfg, w, "q8_0", embd_dtype="q8_0")
    if not stacked:
        src.weights["blk.0.attn_v"] = quantize(w["blk.0.attn_v"], "q4_0")
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, 9)
    assert_matches_reference(src, ids, tol=4e-2)
    import dataclasses
    plain = {k: v for k, v in w.items() if not k.endswith(("attn_q_norm", "attn_k_norm"))}
    without, _ = TargetEngine(make_source(dataclasses.replace(cfg, qk_norm=False, architecture="llama"), plain,
                                          "q8_0", embd_dtype="q8_0"), context=16).forward(ids)
    with_norm, _ = TargetEngine(src, context=16).forward(ids)
    assert np.abs(with_norm - without).max() > 0.05 * np.abs(with_norm).max()


@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_1"])
def test_gemma3_matches_reference(isa, dtype):
    """Gemma 3 layers (post norms, GELU gate, scaled embeddings, a window of 4 over 15
    tokens) against the twin; without the window or the post norms the model differs."""
    import dataclasses
    cfg = tiny_config(gqa=3, tied=False, window=4, layers=4)
    w = random_weights(cfg, seed=29)
    src = make_source(cfg, w, dtype, embd_dtype="q8_0" if dtype.startswith("q") else None)
    ids = np.random.default_rng(9).integers(0, cfg.vocab_size, 15)
    assert_matches_reference(src, ids, tol=3e-4 if dtype == "f32" else 4e-2)
    if dtype != "f32":
        return
    got, _ = TargetEngine(src, context=32).forward(ids, logit_rows=range(15))
    for other in (dataclasses.replace(cfg, sliding_window=0), dataclasses.replace(cfg, activation="silu"),
                  dataclasses.replace(cfg, rope_theta_local=0.0)):  # (far above the 3e-4 tolerance)
        changed, _ = TargetEngine(dataclasses.replace(src, config=other), context=32).forward(ids, logit_rows=range(15))
        assert np.abs(changed - got).max() > 0.01 * np.abs(got).max(), other


def test_nope_layers_match_reference(isa):
    """SmolLM3's layers without RoPE (every second one here) against the twin; rotating
    them too gives another model."""
    import dataclasses
    cfg = dataclasses.replace(tiny_config(gqa=3, tied=False, layers=4), architecture="smollm3", nope_interval=2)
    w = random_weights(cfg, seed=43)
    ids = np.random.default_rng(12).integers(0, cfg.vocab_size, 13)
    assert_matches_reference(make_source(cfg, w, "f32"), ids, tol=3e-4)
    got, _ = TargetEngine(make_source(cfg, w, "f32"), context=32).forward(ids, logit_rows=range(13))
    roped, _ = TargetEngine(make_source(dataclasses.replace(cfg, nope_interval=0), w, "f32"),
                            context=32).forward(ids, logit_rows=range(13))
    assert np.abs(roped - got).max() > 0.01 * np.abs(got).max()


def _gemma2_config(window: int = 4, layers: int = 4):
    """A Gemma 2 config: Gemma 3's layers without the head norms, even layers local with the
    one RoPE base, scores and logits soft-capped (small caps, so that they bite)."""
    import dataclasses
    return dataclasses.replace(tiny_config(gqa=3, tied=False, window=window, layers=layers), architecture="gemma2",
                               qk_norm=False, sliding_window_pattern=2, rope_theta_local=0.0,
                               attn_logit_softcapping=1.5, final_logit_softcapping=2.0)


@pytest.mark.parametrize("dtype", ["f32", "q4_1"])
def test_gemma2_matches_reference(isa, dtype):
    """Gemma 2's soft-capped scores and logits against the twin; without either cap the
    model differs."""
    import dataclasses
    cfg = _gemma2_config()
    w = random_weights(cfg, seed=37)
    src = make_source(cfg, w, dtype, embd_dtype="q8_0" if dtype.startswith("q") else None)
    ids = np.random.default_rng(10).integers(0, cfg.vocab_size, 15)
    assert_matches_reference(src, ids, tol=3e-4 if dtype == "f32" else 4e-2)
    got, _ = TargetEngine(src, context=32).forward(ids, logit_rows=range(15))
    assert np.abs(got).max() <= 2.0
    for other in (dataclasses.replace(cfg, attn_logit_softcapping=0.0),
                  dataclasses.replace(cfg, final_logit_softcapping=0.0)):
        changed, _ = TargetEngine(dataclasses.replace(src, config=other), context=32).forward(ids, logit_rows=range(15))
        assert np.abs(changed - got).max() > 0.01 * np.abs(got).max(), other


def test_gemma2_decode_equals_prefill(isa):
    """Bitwise batch invariance with soft-capped scores: one token at a time (the key
    chunks split between the threads) gives the logits of one 300-token prefill."""
    cfg = _gemma2_config(window=150, layers=2)
    src = make_source(cfg, random_weights(cfg, seed=41), "q4_1")
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, 300)
    whole, _ = TargetEngine(src, context=320, threads=2, max_batch=300).forward(ids, logit_rows=[260, 299])
    eng = TargetEngine(src, context=320, threads=2, max_batch=300)
    eng.forward(ids[:260]); eng.commit()
    rows = []
    for t in range(260, 300):
        logits, _ = eng.forward(ids[t:t + 1], logit_rows=[0]); eng.commit()
        rows.append(logits[0])
    np.testing.assert_array_equal(whole, np.stack([rows[0], rows[-1]]))


def test_gemma3_weights_must_match_the_config():
    import dataclasses
    cfg = tiny_config(window=4)
    src = make_source(cfg, random_weights(cfg))
    with pytest.raises(ValueError, match="weight 'blk.0.post_attention_norm' given but the model config has no post"):
        TargetEngine(dataclasses.replace(src, config=dataclasses.replace(cfg, post_norms=False)), context=16)
    with pytest.raises(ValueError, match="activation must be one of"):
        dataclasses.replace(cfg, activation="relu")


def test_qkv_bias_must_match_the_config():
    import dataclasses
    cfg = tiny_config(bias=True)
    src = make_source(cfg, random_weights(cfg))
    plain = dataclasses.replace(cfg, attention_bias=False, architecture="llama")
    with pytest.raises(ValueError, match="weight 'blk.0.attn_q.bias' given but the model config has no attention bias"):
        TargetEngine(dataclasses.replace(src, config=plain), context=16)
    del src.weights["blk.1.attn_v.bias"]
    with pytest.raises(ValueError, match="missing weight 'blk.1.attn_v.bias'"):
        TargetEngine(src, context=16)


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("dtype,n,prefix,window", [("f32", 40, 10, 0), ("q4_1", 40, 10, 0), ("q8_0", 40, 10, 0),
                                                   ("q4_1", 400, 260, 0), ("f32", 40, 10, 5),
                                                   ("q4_1", 400, 260, 150)])
def test_batch_invariance(isa, dtype, kv_dtype, n, prefix, window):
    """A token's logits and features are bitwise equal whether it runs alone, inside a
    prefill chunk, or inside a tree, at several batch sizes and thread counts; also past
    several 128-key attention chunks, where the threads split the keys of short batches.
    With ``window``, a Gemma 3 model whose local layers see only that many positions: a
    window of 5 cuts into prefill chunks and trees, one of 150 starts inside a key chunk
    and leaves whole chunks out."""
    cfg = tiny_config(gqa=3, tied=True, window=window)
    src = make_source(cfg, random_weights(cfg, seed=5), dtype)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, n)
    ctx = n + 24

    def run(chunks, threads):
        eng = TargetEngine(src, context=ctx, threads=threads, kv_dtype=kv_dtype, max_batch=max(chunks))
        out_l, out_f = [], []
        start = 0
        for c in chunks:
            part = ids[start:start + c]
            lg, ft = eng.forward(part, logit_rows=range(c), feature_rows=range(c))
            eng.commit()
            out_l.append(lg)
            out_f.append(ft)
            start += c
        return np.concatenate(out_l), np.concatenate(out_f)

    base_l, base_f = run([1] * n, 1)
    cuts = [[n], [16, 16, n - 32], [3, 1, n - 11, 7], [n // 2, n - n // 2]]
    for chunks, threads in zip(cuts, (2, 2, 1, 2)):
        got_l, got_f = run(chunks, threads)
        np.testing.assert_array_equal(got_l, base_l)
        np.testing.assert_array_equal(got_f, base_f)
    if n > 40:  # single tokens at 2 threads: the keys split between the threads
        got_l, got_f = run([1] * n, 2)
        np.testing.assert_array_equal(got_l, base_l)
        np.testing.assert_array_equal(got_f, base_f)

    # Trees: each tree token equals causal decoding of its root-to-node path.
    eng = TargetEngine(src, context=ctx + 40, threads=2, kv_dtype=kv_dtype, max_batch=max(prefix, 40))
    eng.forward(ids[:prefix]); eng.commit()
    for T in (2, 7, 16, 33):
        parents = random_tree(rng, T)
        anc = tree_ancestors(parents)
        toks = rng.integers(0, cfg.vocab_size, T)
        pos = prefix + tree_depths(parents)
        lg, ft = eng.forward(toks, pos, anc, logit_rows=range(T), feature_rows=range(T))
        ref = TargetEngine(src, context=ctx + 40, threads=1, kv_dtype=kv_dtype, max_batch=max(prefix, 40))
        ref.forward(ids[:prefix]); ref.commit()
        for t in rng.choice(T, size=min(T, 4), replace=False):
            path = np.flatnonzero(anc[t])
            ref.truncate(prefix)
            l2, f2 = ref.forward(toks[path], logit_rows=[len(path) - 1], feature_rows=[len(path) - 1])
            np.testing.assert_array_equal(l2[0], lg[t])
            np.testing.assert_array_equal(f2[0], ft[t])


def test_commit_compacts_kv_like_plain_decoding():
    cfg = tiny_config(gqa=3, tied=True)
    src = make_source(cfg, random_weights(cfg, seed=9), "q4_0", embd_dtype="q8_0")
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, cfg.vocab_size, 6)
    for trial in range(5):
        T = int(rng.integers(2, 20))
        parents = random_tree(rng, T)
        toks = rng.integers(0, cfg.vocab_size, T)
        leaf = int(rng.integers(0, T))
        path = np.flatnonzero(tree_ancestors(parents)[leaf])
        eng = TargetEngine(src, context=64, threads=2)
        eng.forward(prompt); eng.commit()
        eng.forward(toks, 6 + tree_depths(parents), tree_ancestors(parents))
        eng.commit(path)
        assert eng.n_past == 6 + len(path)
        plain = TargetEngine(src, context=64, threads=2)
        plain.forward(np.concatenate([prompt, toks[path]])); plain.commit()
        for layer in range(cfg.num_layers):
            for a, b in zip(eng.read_kv(layer), plain.read_kv(layer)):
                np.testing.assert_array_equal(a, b)
        # the next token's logits agree too
        nxt = [int(rng.integers(0, cfg.vocab_size))]
        np.testing.assert_array_equal(eng.forward(nxt)[0], plain.forward(nxt)[0])


def test_reference_cache_agrees_on_tree_commit():
    """The twin's commit and the engine's commit keep the same rows."""
    cfg = tiny_config(gqa=1, tied=True, layers=1)
    w = random_weights(cfg, seed=3)
    src = make_source(cfg, w, "f32")
    model = reference.LlamaReference.from_source(src)
    eng = TargetEngine(src, context=32, threads=1)
    rng = np.random.default_rng(8)
    parents = random_tree(rng, 9)
    anc = tree_ancestors(parents)
    toks = rng.integers(0, cfg.vocab_size, 9)
    pos = tree_depths(parents)
    path = np.flatnonzero(anc[8])
    cache = model.new_cache(32)
    with torch.no_grad():
        model(torch.from_numpy(toks), torch.from_numpy(pos), torch.from_numpy(anc), cache)
    cache.commit(path.tolist())
    eng.forward(toks, pos, anc)
    eng.commit(path)
    k, v = eng.read_kv(0)
    np.testing.assert_allclose(k, cache.k[0, :, :len(path)].numpy(), atol=1e-5)
    np.testing.assert_allclose(v, cache.v[0, :, :len(path)].numpy(), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    cfg = tiny_config()
    eng = TargetEngine(make_source(cfg, random_weights(cfg), "q8_0"), context=16, max_batch=8, threads=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.forward([cfg.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.forward([-1])
    with pytest.raises(ValueError, match="position 16 .* outside the context"):
        eng.forward([1], positions=[16])
    with pytest.raises(ValueError, match="exceeds the engine's max_batch"):
        eng.forward(list(range(9)))
    with pytest.raises(ValueError, match="at least one token"):
        eng.forward([])
    with pytest.raises(ValueError, match="must be set"):
        eng.forward([1, 2], ancestors=np.array([[1, 0], [1, 0]], bool))
    with pytest.raises(ValueError, match="earlier batch tokens"):
        eng.forward([1, 2], ancestors=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="ancestors has shape"):
        eng.forward([1, 2], ancestors=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="dtype bool or uint8"):
        eng.forward([1, 2], ancestors=np.eye(2))
    with pytest.raises(ValueError, match="positions has 1 entries for 2 tokens"):
        eng.forward([1, 2], positions=[0])
    with pytest.raises(ValueError, match="logit row 5"):
        eng.forward([1, 2], logit_rows=[5])
    with pytest.raises(ValueError, match="int32 range"):
        eng.forward([2**40])
    eng.forward([1, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        eng.commit([1, 0])
    with pytest.raises(ValueError, match="outside the pending rows"):
        eng.commit([3])
    eng.commit([0, 2])
    with pytest.raises(ValueError, match="uncommitted rows"):
        eng.commit([0])
    for _ in range(2):
        eng.forward(list(range(7))); eng.commit()
    assert eng.n_past == 16
    with pytest.raises(ValueError, match="context full"):
        eng.forward([1])
    with pytest.raises(ValueError, match="context must be an integer >= 1"):
        TargetEngine(make_source(cfg, random_weights(cfg), "f32"), context=0)
    bad = make_source(cfg, random_weights(cfg), "f32")
    del bad.weights["blk.1.ffn_up"]
    with pytest.raises(ValueError, match="missing weight 'blk.1.ffn_up'"):
        TargetEngine(bad, context=8)
    with pytest.raises(TypeError, match="source must be a ModelSource or a model path, got int"):
        TargetEngine(3, context=8)
    with pytest.raises(FileNotFoundError):
        TargetEngine("/nonexistent/model.gguf", context=8)


@pytest.mark.parametrize("window", [0, 5])
def test_sequences_decode_together_as_they_would_alone(isa, window):
    """Several sequences in one engine: each prefilled on its own (select), then decoded one
    token each per forward_sequences call, in changing subsets and orders; every logits row
    equals, bit for bit, a one-token forward of the same sequence in an engine of its own
    (one with a sliding window too). The selected sequence keeps its place for later calls."""
    cfg = tiny_config(window=window) if window else tiny_config()
    src = make_source(cfg, random_weights(cfg, seed=3), "q4_1")
    multi = TargetEngine(src, context=64, threads=2, sequences=3)
    alone = [TargetEngine(src, context=64, threads=2) for _ in range(3)]
    rng = np.random.default_rng(0)
    nxt = []
    for s in range(3):
        prompt = rng.integers(0, cfg.vocab_size, 4 + 3 * s).tolist()
        multi.select(s)
        a, _ = multi.forward(prompt)
        multi.commit()
        b, _ = alone[s].forward(prompt)
        alone[s].commit()
        np.testing.assert_array_equal(a, b)
        nxt.append(int(np.argmax(a[0])))
    assert multi.sequence == 2 and [multi.n_past_of(s) for s in range(3)] == [4, 7, 10]
    for step, seqs in enumerate([[0, 1, 2], [2, 0], [1], [0, 2, 1], [1, 2, 0], [2, 1, 0], [0, 1, 2]]):
        logits = multi.forward_sequences([nxt[s] for s in seqs], seqs)
        for r, s in enumerate(seqs):
            want, _ = alone[s].forward([nxt[s]])
            alone[s].commit()
            np.testing.assert_array_equal(logits[r], want[0])
            nxt[s] = int(np.argmax(want[0]))
    assert [multi.n_past_of(s) for s in range(3)] == [alone[s].n_past for s in range(3)]
    multi.select(1)  # back to single-sequence calls on one of them
    a, _ = multi.forward([nxt[1]])
    b, _ = alone[1].forward([nxt[1]])
    np.testing.assert_array_equal(a, b)


def test_sequences_refuse_bad_calls():
    cfg = tiny_config()
    src = make_source(cfg, random_weights(cfg, seed=1), "f32")
    e = TargetEngine(src, context=8, threads=1, sequences=2)
    e.forward([1, 2])
    with pytest.raises(ValueError, match="uncommitted rows"):
        e.select(1)
    with pytest.raises(ValueError, match="uncommitted rows"):
        e.forward_sequences([1], [1])
    e.commit()
    for toks, seqs, match in (([1, 2], [1, 1], "appears twice"), ([1], [2], r"sequence 2 at index 0 outside \[0, 2\)"),
                              ([1, 2], [0], "one length"), ([999], [0], "outside the vocabulary"),
                              ([1.5], [0], "integer arrays")):
        with pytest.raises(ValueError, match=match):
            e.forward_sequences(toks, seqs)
    with pytest.raises(ValueError, match="sequence 5 outside"):
        e.select(5)
    with pytest.raises(ValueError, match="sequences must be an integer >= 1"):
        TargetEngine(src, context=8, sequences=0)
    for _ in range(6):
        e.forward_sequences([3], [0])
    with pytest.raises(ValueError, match="context full: sequence 0 holds 8 of 8"):
        e.forward_sequences([3, 4], [1, 0])
    assert e.n_past_of(1) == 0 and e.n_past == 8  # (a refused call changes nothing)
    assert e.kv_bytes == 2 * TargetEngine(src, context=8, threads=1).kv_bytes
