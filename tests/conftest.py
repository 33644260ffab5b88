"""Shared fixtures: the default model, and writers of small GGUF / Hugging Face models.

No test may reach a model hub: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY = dict(n_layers=2, hidden=64, n_head=4, n_kv=2, ffn=96)


def byte_level_vocab() -> dict[str, Any]:
    """A small valid gpt2-type GGUF vocabulary: 3 control tokens, 256 bytes, 2 merges."""
    from dovetail_ext.formats.tokenizer import _bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [_bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he"]
    types = [3, 3, 3] + [1] * 258
    return dict(model="gpt2", pre="smollm", tokens=tokens, types=types, merges=["Ġ t", "h e"],
                bos=1, eos=2)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, *, dtype: str = "q8_0", tied: bool = True, vocab: dict | None = None,
                     arch: str = "llama", skip: tuple[str, ...] = (),
                     shapes: dict[str, tuple[int, ...]] | None = None,
                     types: dict[str, Any] | None = None, meta: Callable[[Any], None] | None = None,
                     omit_meta: tuple[str, ...] = (), seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
    """Writes a random LLaMA (or Qwen2) GGUF the way llama.cpp's converter does; returns the originals.

    Matrices are stored as ``dtype`` (``types`` overrides per canonical name; a callable
    type ``f(values) -> (qtype, blocks, decoded)`` writes blocks it made itself), norms F32,
    q/k rows permuted for ``arch="llama"`` and ``"smollm3"``; ``arch="qwen2"`` adds q/k/v biases, ``"qwen3"``
    q/k head norms, ``"gemma3"`` q/k head norms and post norms. ``skip`` leaves tensors out, ``shapes`` writes other shapes, ``meta``
    may add metadata, ``omit_meta`` leaves out model keys (``block_count``...), a ``head_dim``
    dimension other than hidden / n_head is written as the key and value lengths. Returns canonical name -> float32 [rows, cols] in Hugging Face order.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    d = {**TINY, **dims}
    vocab = vocab or byte_level_vocab()
    V, D, F, H, KV = len(vocab["tokens"]), d["hidden"], d["ffn"], d["n_head"], d["n_kv"]
    Dh = d.get("head_dim", D // H)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    if Dh != D // H:
        w.add_key_length(Dh)
        w.add_value_length(Dh)
    model_keys = {"block_count": d["n_layers"], "context_length": 256, "embedding_length": D,
                  "feed_forward_length": F, "head_count": H, "head_count_kv": KV,
                  "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-5}
    for key, value in model_keys.items():
        if key not in omit_meta:
            getattr(w, "add_" + key)(value)
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("merges") is not None:
        w.add_token_merges(vocab["merges"])
    if vocab.get("scores") is not None:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "add_bos" in vocab:
        w.add_add_bos_token(vocab["add_bos"])
    if meta is not None:
        meta(w)

    want = {"token_embd": (V, D), "output_norm": (D,)}
    if not tied:
        want["output"] = (V, D)
    for i in range(d["n_layers"]):
        p = f"blk.{i}."
        want.update({p + "attn_norm": (D,), p + "ffn_norm": (D,), p + "attn_q": (H * Dh, D),
                     p + "attn_k": (KV * Dh, D), p + "attn_v": (KV * Dh, D), p + "attn_output": (D, H * Dh),
                     p + "ffn_gate": (F, D), p + "ffn_up": (F, D), p + "ffn_down": (D, F)})
        if arch == "qwen2":
            want.update({p + "attn_q.bias": (H * Dh,), p + "attn_k.bias": (KV * Dh,),
                         p + "attn_v.bias": (KV * Dh,)})
        if arch in ("qwen3", "gemma3"):
            want.update({p + "attn_q_norm": (Dh,), p + "attn_k_norm": (Dh,)})
        if arch in ("gemma2", "gemma3"):
            want.update({p + "post_attention_norm": (D,), p + "post_ffw_norm": (D,)})
    want.update(shapes or {})
    qtypes = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
    originals = {}
    # Phi-3 files fuse q|k|v into attn_qkv and gate|up into ffn_up: the parts wait for each other.
    fused = {"attn_q": ("attn_qkv", 0), "attn_k": ("attn_qkv", 1), "attn_v": ("attn_qkv", 2),
             "ffn_gate": ("ffn_up", 0), "ffn_up": ("ffn_up", 1)} if arch == "phi3" else {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for name, shape in want.items():
        if name in skip:
            continue
        value = (rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 1.0)).astype(np.float32)
        if len(shape) == 1:
            value = 1.0 + 0.1 * value
        originals[name] = value
        if name.endswith(".bias"):
            value = 0.5 * value - 0.5  # biases around 0, large enough to matter
            originals[name] = value
        stored = value
        permute = arch in ("llama", "smollm3")
        if permute and name.endswith("attn_q"):
            stored = llama_permute(value, H)
        elif permute and name.endswith("attn_k"):
            stored = llama_permute(value, KV)
        qtype = (types or {}).get(name, Q.F32 if len(shape) == 1 else qtypes[dtype])
        full = name if name.endswith(".bias") else name + ".weight"
        prefix, _, leaf = name.rpartition(".")
        if leaf in fused:
            into, k = fused[leaf]
            got = parts.setdefault(f"{prefix}.{into}", {})
            got[k] = stored
            if len(got) < (3 if into == "attn_qkv" else 2):
                continue
            full, stored = f"{prefix}.{into}.weight", np.concatenate([got[j] for j in sorted(got)])
        if callable(qtype):
            assert not permute or not name.endswith(("attn_q", "attn_k")), "blocks are written as made"
            qtype, blocks, originals[name] = qtype(value)
            w.add_tensor(full, blocks, raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(full, stored)
        elif qtype == Q.F16:
            w.add_tensor(full, stored.astype(np.float16))
        elif qtype == Q.F64:
            w.add_tensor(full, stored.astype(np.float64))
        else:
            w.add_tensor(full, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


def random_k_blocks(qtype: Any, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random valid blocks of a type ``gguf.quants`` cannot quantize (Q4_K, Q6_K...):
    random bytes with small positive float16 scales. Returns (uint8 [rows, row bytes],
    float32 [rows, cols] as ``gguf.quants.dequantize`` decodes them)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    # Where each type keeps its float16 scale(s): Q4_K / Q5_K d and dmin first, Q6_K d last.
    spots = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (nbytes - 2,), Q.Q2_K: (nbytes - 4, nbytes - 2),
             Q.Q3_K: (nbytes - 2,)}[qtype]
    for at in spots:
        raw[:, at:at + 2] = rng.uniform(1e-4, 2e-3, raw.shape[0]).astype(np.float16)[:, None].view(np.uint8)
    blocks = raw.reshape(rows, -1)
    return blocks, quants.dequantize(blocks, qtype).reshape(rows, cols).astype(np.float32)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Keep torch to one thread for a module (small reference computations only lose to
    thread start-up, and the 2 cores are shared)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF file; tests that need it skip (saying why) without it."""
    from dovetail_ext.models import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="session")
def default_source(default_gguf_path: Path) -> Any:
    """The default model loaded once per session (about 2 s)."""
    from dovetail_ext.formats import load_gguf
    return load_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def random_draft_gen(default_gguf_path: Path) -> Any:
    """A generator for the default model (context 512, 2 threads) with an untrained 1-layer
    draft: speculation whose proposals the target mostly rejects."""
    import dovetail_ext
    from dovetail_ext.draft import Draft
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig
    g = dovetail_ext.load(default_gguf_path, context=512, threads=2, draft=None)
    module = DovetailDraft.random(DraftConfig.for_target(g.source, num_layers=1), seed=0, std=0.05)
    g.draft = Draft.from_module(module, g.target)
    return g


@pytest.fixture(scope="session")
def llama_gguf_writer() -> Callable[..., dict[str, np.ndarray]]:
    """:func:`write_llama_gguf`, as a fixture so test modules need not import conftest."""
    return write_llama_gguf


@pytest.fixture(scope="session")
def tiny_byte_vocab() -> dict[str, Any]:
    return byte_level_vocab()
