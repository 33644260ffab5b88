"""What every loader returns: a config, weights in their stored format, a tokenizer.

Weights use canonical GGUF-style names (no ``.weight`` suffix) and PyTorch's
``[out_features, in_features]`` orientation. Query/key rows are in the rotate-half RoPE
layout used by Hugging Face LLaMA (the GGUF loader undoes llama.cpp's interleaving).

Canonical names::

    token_embd                [V, D]
    output                    [V, D]   absent when the LM head is tied to token_embd
    output_norm               [D]
    blk.{i}.attn_norm         [D]
    blk.{i}.attn_q            [H*Dh, D]
    blk.{i}.attn_k            [KV*Dh, D]
    blk.{i}.attn_v            [KV*Dh, D]
    blk.{i}.attn_output       [D, H*Dh]
    blk.{i}.ffn_norm          [D]
    blk.{i}.ffn_gate          [F, D]
    blk.{i}.ffn_up            [F, D]
    blk.{i}.ffn_down          [D, F]
    blk.{i}.attn_q.bias       [H*Dh]   f32, only with ``config.attention_bias`` (Qwen2)
    blk.{i}.attn_k.bias       [KV*Dh]
    blk.{i}.attn_v.bias       [KV*Dh]
    blk.{i}.attn_q_norm       [Dh]     f32, only with ``config.qk_norm`` (Qwen3)
    blk.{i}.attn_k_norm       [Dh]
    rope_freqs                [Dh/2]   f32, only with ``config.rope_freq_factors`` (LLaMA 3.1+)
    rope_freqs_long           [Dh/2]   f32, only with ``config.rope_long_context`` (LongRoPE)

Phi-3 files store two fused matrices per layer (``stored_weight_shapes``), which the
loaders split into the names above (``unfuse``)::

    blk.{i}.attn_qkv          [H*Dh + 2*KV*Dh, D]   attn_q, attn_k, attn_v, top to bottom
    blk.{i}.ffn_gate_up       [2*F, D]              ffn_gate, then ffn_up
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LlamaConfig
from ..errors import FormatError

__all__ = ["WEIGHT_DTYPES", "QUANT_BLOCK", "Weight", "ModelSource", "expected_weight_shapes",
           "stored_weight_shapes", "stored_tensors_per_layer", "unfuse", "row_nbytes", "read_json_object"]

#: Storage formats the native engine executes directly.
WEIGHT_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")

#: Quantized formats: (values per block, bytes per block). Layouts follow GGUF:
#: q8_0 = f16 d + 32 x int8; q4_0 = f16 d + 16 bytes of nibbles (value = (q - 8) * d);
#: q4_1 = f16 d + f16 m + 16 bytes of nibbles (value = q * d + m). Low nibbles hold
#: elements 0..15 of the block, high nibbles elements 16..31.
QUANT_BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20)}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, draft.json, ...); a file that cannot be read,
    is not JSON or holds something else is a FormatError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def row_nbytes(dtype: str, cols: int) -> int:
    """Bytes one row of ``cols`` values takes in ``dtype``."""
    if dtype in QUANT_BLOCK:
        n, nbytes = QUANT_BLOCK[dtype]
        if cols % n:
            raise ValueError(f"{dtype} rows need a multiple of {n} columns, got {cols}")
        return cols // n * nbytes
    return cols * {"f32": 4, "f16": 2, "bf16": 2}[dtype]


@dataclass
class Weight:
    """One tensor in its stored format.

    ``data`` holds the raw storage: float32 for ``f32``, float16 for ``f16``, uint16 bit
    patterns for ``bf16``, and for quantized types uint8 blocks shaped ``[rows, row_nbytes]``.
    It may be a read-only memory map of the model file.
    """

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unsupported weight dtype {self.dtype!r}; expected one of {WEIGHT_DTYPES}")
        self.shape = tuple(int(s) for s in self.shape)
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        want = rows * row_nbytes(self.dtype, self.shape[-1])
        if self.data.nbytes != want:
            raise ValueError(f"weight of shape {self.shape} in {self.dtype} needs {want} bytes, "
                             f"got {self.data.nbytes}")


@dataclass
class ModelSource:
    """A loaded model file: everything the engine and the generator need."""

    config: LlamaConfig
    weights: dict[str, Weight]
    tokenizer: Any  # dovetail_ext.formats.tokenizer.Tokenizer
    chat_template: str | None = None
    name: str = ""
    path: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def expected_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for every tensor a model with ``cfg`` must have."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"token_embd": (V, D), "output_norm": (D,)}
    if cfg.rope_freq_factors:
        shapes["rope_freqs"] = (cfg.head_dim // 2,)
    if cfg.rope_long_context:
        shapes["rope_freqs_long"] = (cfg.head_dim // 2,)
    if not cfg.tie_word_embeddings:
        shapes["output"] = (V, D)
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm": (D,), p + "ffn_norm": (D,),
            p + "attn_q": (cfg.q_size, D), p + "attn_k": (cfg.kv_size, D),
            p + "attn_v": (cfg.kv_size, D), p + "attn_output": (D, cfg.q_size),
            p + "ffn_gate": (F, D), p + "ffn_up": (F, D), p + "ffn_down": (D, F),
        })
        if cfg.qk_norm:
            shapes.update({p + "attn_q_norm": (cfg.head_dim,), p + "attn_k_norm": (cfg.head_dim,)})
        if cfg.post_norms:
            shapes.update({p + "post_attention_norm": (D,), p + "post_ffw_norm": (D,)})
        if cfg.attention_bias:
            shapes.update({p + "attn_q.bias": (cfg.q_size,), p + "attn_k.bias": (cfg.kv_size,),
                           p + "attn_v.bias": (cfg.kv_size,)})
    return shapes


def _fused_parts(cfg: LlamaConfig) -> dict[str, list[tuple[str, int]]]:
    """Per fused leaf name, its parts (leaf name, rows), top to bottom; empty but for Phi-3."""
    if cfg.architecture != "phi3":
        return {}
    F = cfg.intermediate_size
    return {"attn_qkv": [("attn_q", cfg.q_size), ("attn_k", cfg.kv_size), ("attn_v", cfg.kv_size)],
            "ffn_gate_up": [("ffn_gate", F), ("ffn_up", F)]}


def stored_tensors_per_layer(cfg: LlamaConfig) -> int:
    """How many tensors a layer of a file holds at least (9, or 6 with fused matrices)."""
    return 9 - sum(len(parts) - 1 for parts in _fused_parts(cfg).values())


def stored_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """:func:`expected_weight_shapes` as a file stores them: with Phi-3's fused matrices."""
    shapes = expected_weight_shapes(cfg)
    for i in range(cfg.num_layers):
        for fused, parts in _fused_parts(cfg).items():
            rows = 0
            for leaf, n in parts:
                rows += n
                del shapes[f"blk.{i}.{leaf}"]
            shapes[f"blk.{i}.{fused}"] = (rows, cfg.hidden_size)
    return shapes


def unfuse(weights: dict[str, Weight], cfg: LlamaConfig) -> None:
    """Splits each fused matrix of ``weights`` (:func:`stored_weight_shapes`) into its parts,
    by rows: views of the same storage, whatever the format (a quantized row is whole blocks)."""
    for i in range(cfg.num_layers):
        for fused, parts in _fused_parts(cfg).items():
            w = weights.pop(f"blk.{i}.{fused}")
            r = 0
            for leaf, n in parts:
                weights[f"blk.{i}.{leaf}"] = Weight(w.dtype, (n, w.shape[1]), w.data[r:r + n])
                r += n
