"""Typed model configuration shared by the loaders, the native engine and the reference.

Legend used across the package: B batch, T new tokens in one target call, D hidden size,
H query heads, KV key/value heads, Dh head dim, F FFN size, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LlamaConfig", "ARCHITECTURES", "ACTIVATIONS"]

#: The decoders the engine runs (GGUF ``general.architecture`` / Hugging Face ``model_type``)
#: and the LlamaConfig fields each one sets: Qwen2 adds q/k/v biases, Qwen3 q/k head norms,
#: Gemma 3 q/k head norms, post norms, a GELU gate and scaled embeddings (its sliding-window
#: layers come from the GGUF metadata or config.json); Gemma 2 is Gemma 3 without the head
#: norms, with soft-capped attention scores and logits; SmolLM3 is LLaMA with no RoPE in every
#: fourth layer; Phi-3 is LLaMA with fused q|k|v and
#: gate|up matrices in its files, which the loaders split. Hugging Face model types map to
#: these names in ``formats.hf`` (``gemma3_text`` is "gemma3").
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False, "qk_norm": False},
    "qwen2": {"attention_bias": True, "qk_norm": False},
    "qwen3": {"attention_bias": False, "qk_norm": True},
    "gemma3": {"attention_bias": False, "qk_norm": True, "post_norms": True, "activation": "gelu_tanh",
               "scale_embeddings": True},
    "phi3": {"attention_bias": False, "qk_norm": False},
    "gemma2": {"attention_bias": False, "qk_norm": False, "post_norms": True, "activation": "gelu_tanh",
               "scale_embeddings": True},
    "smollm3": {"attention_bias": False, "qk_norm": False},
}
#: The FFN gates: silu (SwiGLU) and gelu_tanh (GeGLU, GELU with the tanh approximation).
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA-architecture decoder.

    ``head_dim`` defaults to ``hidden_size // num_heads``. ``max_context`` is the context
    the model was trained for (the engine may be loaded with a shorter one).
    ``attention_bias``: the q / k / v projections add a bias (Qwen2: ``architecture`` "qwen2");
    ``qk_norm``: each q and k head is RMS-normalized (weights ``attn_q_norm`` /
    ``attn_k_norm`` [head_dim]) before RoPE (Qwen3: ``architecture`` "qwen3");
    otherwise the architectures are the same decoder. ``rope_freq_factors``: RoPE
    frequencies are divided by the per-frequency factors of the weight ``rope_freqs``
    [head_dim / 2] (LLaMA 3.1+ "llama3" scaling).

    Gemma 3: ``post_norms``: each block's attention and FFN output is RMS-normalized
    (``post_attention_norm`` / ``post_ffw_norm`` [D]) before its residual add;
    ``activation``: the FFN gate (one of ``ACTIVATIONS``); ``scale_embeddings``: token
    embeddings are multiplied by sqrt(hidden_size); ``sliding_window`` > 0: layer i is a
    local layer, seeing only the keys of the last ``sliding_window`` positions, unless
    ``(i + 1) % sliding_window_pattern == 0`` (pattern 0: every layer is local); local layers
    rotate with ``rope_theta_local`` (0: ``rope_theta``) and without ``rope_freqs``.

    LongRoPE (Phi-3 128k, Phi-3.5): ``rope_attn_factor`` multiplies RoPE's cos and sin (every
    q . k by its square) in the global layers; ``rope_long_context`` > 0, the original
    training context: an engine with a longer context rotates with the long factors (the
    weight ``rope_freqs_long``), otherwise with the short ones (``rope_freqs``), chosen once
    for the context size as llama.cpp chooses them.

    Gemma 2: ``attn_logit_softcapping`` / ``final_logit_softcapping`` > 0 soft-cap the
    attention scores (after their scale) and the logits: x -> cap tanh(x / cap).
    ``query_pre_attn_scalar`` > 0: the scores are scaled by its -1/2 power instead of
    head_dim's (Gemma 2 and 3's 27B models: hidden / heads).

    SmolLM3: with ``nope_interval`` > 0, layer i rotates no q / k (NoPE) when
    ``(i + 1) % nope_interval == 0``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_context: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "llama"
    attention_bias: bool = False
    qk_norm: bool = False
    rope_freq_factors: bool = False
    post_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    sliding_window: int = 0
    sliding_window_pattern: int = 0
    rope_theta_local: float = 0.0
    rope_attn_factor: float = 1.0
    rope_long_context: int = 0
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0
    query_pre_attn_scalar: float = 0.0
    nope_interval: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by "
                    f"num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even integer, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("sliding_window", "sliding_window_pattern", "nope_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LlamaConfig.{name} must be a non-negative integer, got {value!r}")
        if not self.rope_theta_local >= 0:
            raise ValueError(f"LlamaConfig.rope_theta_local must be non-negative, got {self.rope_theta_local}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"LlamaConfig.{name} must be a number >= 0 (0: none), got {getattr(self, name)!r}")
        if not 0 < self.rope_attn_factor < float("inf"):
            raise ValueError(f"LlamaConfig.rope_attn_factor must be a positive number, got {self.rope_attn_factor}")
        if not isinstance(self.rope_long_context, int) or isinstance(self.rope_long_context, bool) \
                or self.rope_long_context < 0 or (self.rope_long_context and not self.rope_freq_factors):
            raise ValueError(f"LlamaConfig.rope_long_context must be a non-negative integer, and needs "
                             f"rope_freq_factors; got {self.rope_long_context!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for t in self.eos_token_ids + ((self.bos_token_id,) if self.bos_token_id is not None else ()):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"LlamaConfig: special token id {t} is outside the vocabulary "
                                 f"(size {self.vocab_size})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def nope_layer(self, i: int) -> bool:
        """Whether layer i rotates no q / k (SmolLM3's NoPE layers)."""
        return self.nope_interval > 0 and (i + 1) % self.nope_interval == 0

    def local_layer(self, i: int) -> bool:
        """Whether layer i is a sliding-window layer."""
        pattern = self.sliding_window_pattern
        return self.sliding_window > 0 and (pattern == 0 or (i + 1) % pattern != 0)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads
