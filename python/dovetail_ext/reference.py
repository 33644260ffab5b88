"""PyTorch twin of every native op and of the LLaMA target model.

What it is: the executable specification the native ``_core`` ops and the native target
engine are tested against, written to be obviously correct. What it is not: fast. Each op
twin states its numerics (which dtype every step runs in) because the native kernels are
held to them; the model twin is nothing but a composition of the op twins.

Legend: T tokens in one call, D hidden size, H query heads, KV key/value heads, Dh head
dim, G = H / KV query heads per KV head, L keys one query may see (n_prefix + T),
F FFN size, V vocab size, K reduction size of a matmul, N its output features.

One target call serves prefill, decode and tree verification::

    logits, features = model(tokens, positions, ancestors, cache)   # batch written to scratch
    cache.commit(kept)                                               # keep some rows, compacted

Token ``t`` of the batch attends to the whole committed prefix plus the batch tokens ``j``
with ``ancestors[t, j]`` (a tree's ancestor-or-self matrix; lower-triangular = causal).

Growing a tree level by level (the draft's expansion) calls the model several times on
scratch without committing: with ``append=True`` the batch is written after the pending
rows of the earlier calls, and ``ancestors`` is [T, n_pending + T] over all pending rows
(earlier scratch, then this batch). ``commit(kept)`` indexes all pending rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .formats.base import QUANT_BLOCK, ModelSource, Weight, expected_weight_shapes
from .quant import dequantize, quantize_activations_q8, round_bf16, unpack_blocks

__all__ = ["rmsnorm", "rope_tables", "rope", "swiglu", "attention", "linear", "linear_q8",
           "KVCache", "RMSNorm", "Attention", "FeedForward", "Block", "LlamaReference",
           "causal_ancestors", "scratch_layout", "generate_greedy", "geglu"]


# ----------------------------------------------------------------------------------------
# Op twins


def rmsnorm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMS normalization: ``y = x * rsqrt(mean(x^2) + eps) * w``, computed in float32.

    Args:
        x: [T, D] float. w: [D] float. eps: added to the mean square.
    Returns:
        [T, D] in ``x.dtype``.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * w.float()).to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32,
                factors: Tensor | None = None, mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rotary-embedding cos/sin tables, as the native engine precomputes them.

    ``inv_freq[i] = theta ** (-2 i / Dh) / factors[i]`` for ``i < Dh/2`` (``factors``: the
    ``rope_freqs`` weight of LLaMA 3.1+, or None: all 1) and ``angle = pos * inv_freq``,
    both in float64; cos and sin of the float64 angle, times ``mscale`` (LongRoPE's attention
    factor, ``LlamaConfig.rope_attn_factor``) in float64, are then rounded once to ``dtype``
    (float32 for the engine). Hugging Face computes the angle in float32, which at
    position p is off by up to about ``1e-6 * p`` radians; float64 angles keep large
    positions accurate to the final rounding.

    Args:
        positions: [T] integer. head_dim: Dh (even). theta: RoPE base.
    Returns:
        cos, sin: [T, Dh/2] in ``dtype``, on the device of ``positions``.
    """
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    inv_freq = float(theta) ** (-2.0 * i / head_dim)
    if factors is not None:
        inv_freq = inv_freq / factors.to(device=positions.device, dtype=torch.float64)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return (angle.cos() * mscale).to(dtype), (angle.sin() * mscale).to(dtype)


def rope(x: Tensor, positions: Tensor, theta: float, factors: Tensor | None = None, mscale: float = 1.0) -> Tensor:
    """Rotary position embedding in the rotate-half layout (Hugging Face LLaMA).

    Element ``i < Dh/2`` pairs with ``i + Dh/2``; with c, s from :func:`rope_tables`
    (rounded to ``x.dtype``)::

        y[i]        = x[i] * c[i] - x[i + Dh/2] * s[i]
        y[i + Dh/2] = x[i + Dh/2] * c[i] + x[i] * s[i]

    each product and sum rounded in ``x.dtype`` (no fused multiply-add), as HF computes it.

    Args:
        x: [T, H, Dh] float. positions: [T] integer. theta: RoPE base. factors, mscale: see
            :func:`rope_tables`.
    Returns:
        [T, H, Dh] in ``x.dtype``.
    """
    T, H, Dh = x.shape
    if positions.shape != (T,):
        raise ValueError(f"rope: positions must have shape ({T},), got {tuple(positions.shape)}")
    cos, sin = rope_tables(positions, Dh, theta, x.dtype, factors, mscale)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU gate: ``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``.

    Args:
        gate, up: [T, F] float, same dtype.
    Returns:
        [T, F] in the input dtype.
    """
    return F.silu(gate) * up


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """GeGLU gate (Gemma): ``gelu_tanh(gate) * up``, GELU with the tanh approximation.

    Args:
        gate, up: [T, F] float, same dtype.
    Returns:
        [T, F] in the input dtype.
    """
    return F.gelu(gate, approximate="tanh") * up


def causal_ancestors(T: int) -> Tensor:
    """The ancestor matrix of a chain: bool [T, T], True on and below the diagonal."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def softcap(x: Tensor, cap: float) -> Tensor:
    """Gemma 2's soft-capping, ``cap * tanh(x / cap)`` (``cap`` 0: x unchanged)."""
    return x if not cap else cap * torch.tanh(x / cap)


def attention(q: Tensor, k: Tensor, v: Tensor, n_prefix: int, ancestors: Tensor,
              prefix_start: Tensor | None = None, softcap_scores: float = 0.0, scalar: float = 0.0) -> Tensor:
    """Grouped-query attention of a token batch over a committed prefix plus scratch rows.

    Keys ``0 .. n_prefix-1`` are the committed cache and are visible to every query; key
    ``n_prefix + j`` is scratch row ``j``, visible to query ``t`` iff ``ancestors[t, j]``.
    Usually the scratch is just the batch (S = T); in append mode it is the earlier
    uncommitted rows followed by the batch (S > T, the batch being the last T rows).
    Query head ``h`` reads KV head ``h // G`` (K/V are indexed per group, never repeated).
    ``softmax(q . k / sqrt(Dh))`` over the visible keys, then the weighted sum of values,
    all in ``q.dtype`` (K/V are cast to it first).

    Args:
        q: [T, H, Dh]. k, v: [KV, L, Dh] with L = n_prefix + S.
        n_prefix: committed keys in front of the scratch rows.
        ancestors: bool [T, S], S >= T; every query must see at least one key.
        prefix_start: long [T] or None: query t sees the committed keys from
            ``prefix_start[t]`` on only (a sliding window; None: all of them).
        softcap_scores: Gemma 2's cap on the scaled scores (:func:`softcap`; 0: none).
        scalar: the scores are scaled by ``scalar ** -0.5`` (0: ``Dh ** -0.5``).
    Returns:
        [T, H, Dh] in ``q.dtype``.
    """
    T, H, Dh = q.shape
    KV, L, _ = k.shape
    if k.shape != v.shape or k.shape[2] != Dh:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[KV, L, {Dh}]")
    if H % KV:
        raise ValueError(f"attention: {H} query heads are not a multiple of {KV} KV heads")
    S = ancestors.shape[1] if ancestors.dim() == 2 else T  # scratch rows the batch may see
    if L != n_prefix + S:
        what = "T" if S == T else "scratch rows"
        raise ValueError(f"attention: {L} keys, expected n_prefix + {what} = {n_prefix} + {S}")
    if ancestors.dim() != 2 or ancestors.shape[0] != T or S < T or ancestors.dtype != torch.bool:
        raise ValueError(f"attention: ancestors must be bool [{T}, S >= {T}], got "
                         f"{ancestors.dtype} {tuple(ancestors.shape)}")
    prefix = torch.ones(T, n_prefix, dtype=torch.bool)
    if prefix_start is not None:
        prefix = torch.arange(n_prefix)[None, :] >= prefix_start[:, None]
    visible = torch.cat([prefix, ancestors], dim=1)  # [T, L]
    if not visible.any(dim=1).all():
        raise ValueError("attention: a query sees no key (empty prefix and no ancestors)")

    G = H // KV
    qg = q.reshape(T, KV, G, Dh)  # head h = kv * G + g
    k, v = k.to(q.dtype), v.to(q.dtype)
    scores = softcap(torch.einsum("tkgd,kld->kgtl", qg, k) * (scalar or Dh) ** -0.5, softcap_scores)  # [KV, G, T, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("kgtl,kld->tkgd", probs, v)  # [T, KV, G, Dh]
    return out.reshape(T, H, Dh)


def _check_matmul(x: Tensor, shape: tuple[int, ...]) -> None:
    if x.dim() != 2 or len(shape) != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight [N, K] {shape}")


def linear(x: Tensor, w: Weight | Tensor) -> Tensor:
    """``y = x @ W^T``, the exact answer: float64 arithmetic on the decoded weight.

    Args:
        x: [T, K] float. w: a :class:`Weight` of shape [N, K] (any dtype, decoded with
            :func:`dovetail_ext.quant.dequantize`) or a float tensor [N, K].
    Returns:
        [T, N] in ``x.dtype`` (pass float64 ``x`` to keep the float64 result).
    """
    W = torch.from_numpy(dequantize(w)) if isinstance(w, Weight) else w
    _check_matmul(x, tuple(W.shape))
    return (x.double() @ W.double().T).to(x.dtype)


def linear_q8(x: Tensor, w: Weight) -> Tensor:
    """What the native int8 kernels compute for ``x @ W^T`` with a quantized weight.

    Activations go through :func:`dovetail_ext.quant.quantize_activations_q8` (codes aq,
    scales da, block sums sa); the weight is split by :func:`dovetail_ext.quant.unpack_blocks`
    into unsigned codes wq, scales dw and offsets cw. Then, per output::

        y[t, n] = sum_b da[t, b] * (dw[n, b] * isum[t, n, b] + cw[n, b] * sa[t, b])
        isum[t, n, b] = sum_{i in block b} wq[n, i] * aq[t, i]     (an integer)

    which is ``sum_i (da * aq_i) * (dw * wq_i + cw)``: the exact dot product of the
    quantized activations with the decoded weight. Evaluated in float64 (isum is exact
    there), as the reference for the native kernels that accumulate in float32.
    f32 and f16 weights are not paired with quantized activations: for them this is
    :func:`linear`. bf16 weights multiply the activations rounded to bf16
    (:func:`dovetail_ext.quant.round_bf16`), as the native vdpbf16ps kernel does.

    Args:
        x: [T, K] float (its values are taken as float32 for the quantization).
        w: a :class:`Weight` [N, K].
    Returns:
        [T, N] in ``x.dtype``.
    """
    if w.dtype == "bf16":
        _check_matmul(x, w.shape)
        return linear(torch.from_numpy(round_bf16(x.detach().cpu().float().numpy())).to(x.dtype), w)
    if w.dtype not in QUANT_BLOCK:
        return linear(x, w)
    _check_matmul(x, w.shape)
    aq, da, sa = quantize_activations_q8(x.detach().cpu().float().numpy())
    wq, dw, cw = unpack_blocks(w)
    T, K = aq.shape
    aq = torch.from_numpy(aq).double().reshape(T, K // 32, 32)
    da, sa = torch.from_numpy(da).double(), torch.from_numpy(sa).double()
    wq, dw, cw = (torch.from_numpy(a).double() for a in (wq, dw, cw))
    y = torch.zeros(T, w.shape[0], dtype=torch.float64)
    for b in range(K // 32):
        isum = aq[:, b, :] @ wq[:, b, :].T  # [T, N]; |isum| < 2^20: exact in float64
        y += da[:, b, None] * (dw[None, :, b] * isum + cw[None, :, b] * sa[:, b, None])
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer: ``k``, ``v`` [layers, KV, max_len, Dh].

    Slots ``[0, n_past)`` hold the committed tokens, in order. A forward writes its batch's
    K/V (after RoPE) to the scratch slots ``[n_past, n_past + T)`` in batch order;
    :meth:`commit` then keeps chosen batch rows, moved to sit right after the prefix.
    An appending forward instead writes after the ``n_pending`` rows already there (slots
    ``[n_past + n_pending, n_past + n_pending + T)``), so that successive tree levels stay
    in scratch together until one commit.
    """

    def __init__(self, config: LlamaConfig, max_len: int, dtype: torch.dtype = torch.float32):
        if max_len <= 0:
            raise ValueError(f"KVCache: max_len must be positive, got {max_len}")
        shape = (config.num_layers, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.n_past = 0     # committed tokens
        self.n_pending = 0  # scratch rows: the last plain forward's batch + any appended after it
        self.scratch_pos = torch.zeros(0, dtype=torch.long)  # positions of the pending rows

    def update(self, layer: int, k: Tensor, v: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """Write one layer's batch K/V to the scratch slots, from scratch row ``start`` on.

        ``start = 0`` (a plain forward) replaces whatever was pending; an appending forward
        passes the ``n_pending`` it found before its first layer, the same for every layer
        (see :func:`scratch_layout`). Afterwards ``n_pending = start + T``.

        Args:
            layer: layer index. k, v: [KV, T, Dh]. start: 0 <= start <= n_pending.
        Returns:
            keys, values: views [KV, n_past + start + T, Dh] (prefix, earlier scratch rows,
            then the batch).
        """
        T = k.shape[1]
        if not 0 <= start <= self.n_pending:
            raise ValueError(f"KVCache: scratch start {start} outside [0, {self.n_pending}] "
                             f"(the pending rows)")
        end = self.n_past + start + T
        if end > self.max_len:
            raise ValueError(f"KVCache: {self.n_past} committed + {start} pending + {T} new "
                             f"tokens exceed max_len {self.max_len}")
        self.k[layer, :, end - T:end] = k
        self.v[layer, :, end - T:end] = v
        self.n_pending = start + T
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, kept: Sequence[int] | None = None) -> None:
        """Keep batch rows ``kept`` of the last forward (None: all of them).

        After appending forwards, the rows are all pending rows in the order they were
        written (the last plain forward's batch, then each appended batch).

        Row ``kept[i]`` moves to slot ``n_past + i`` in every layer, then ``n_past`` grows by
        ``len(kept)``. Rows must be strictly increasing (a root-to-leaf path in a tree whose
        parents come before their children), so an in-place forward copy is safe natively.
        """
        kept = list(range(self.n_pending)) if kept is None else [int(i) for i in kept]
        if any(not 0 <= i < self.n_pending for i in kept):
            raise ValueError(f"KVCache.commit: rows {kept} outside the last batch of "
                             f"{self.n_pending}")
        if any(a >= b for a, b in zip(kept, kept[1:])):
            raise ValueError(f"KVCache.commit: rows must be strictly increasing, got {kept}")
        src = torch.tensor(kept, dtype=torch.long) + self.n_past
        dst = torch.arange(len(kept)) + self.n_past
        self.k[:, :, dst] = self.k[:, :, src]  # the right side is gathered into a copy first
        self.v[:, :, dst] = self.v[:, :, src]
        self.n_past += len(kept)
        self.n_pending = 0

    def reset(self) -> None:
        """Forget everything (buffers are kept)."""
        self.n_past = 0
        self.n_pending = 0


def scratch_layout(cache: KVCache, T: int, positions: Tensor | None, ancestors: Tensor | None,
                   append: bool) -> tuple[int, Tensor]:
    """Where a forward of T tokens writes its K/V and which scratch rows each token sees.

    Returns ``(start, ancestors)``: the batch goes to scratch rows ``start .. start + T - 1``
    (``start`` is 0, or ``n_pending`` when appending) and ``ancestors`` is bool
    [T, start + T]. ``ancestors=None`` means causal within the batch, with no earlier
    scratch row visible (what the native engine does with a null ancestor matrix). An
    appending call must give its positions: they are the tree depths, not slot indices.
    """
    start = cache.n_pending if append else 0
    if append and positions is None:
        raise ValueError("forward: append=True needs explicit positions")
    if ancestors is None:
        ancestors = torch.cat([torch.zeros(T, start, dtype=torch.bool), causal_ancestors(T)], dim=1)
    if tuple(ancestors.shape) != (T, start + T):
        raise ValueError(f"forward: with {start} earlier scratch rows (append={append}) ancestors "
                         f"must be [{T}, {start + T}], got {tuple(ancestors.shape)}")
    return start, ancestors


# ----------------------------------------------------------------------------------------
# Model twin (gpt-fast layout: RMSNorm, Attention, FeedForward, Block, Transformer)


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class RMSNorm(nn.Module):
    """:func:`rmsnorm` with a stored weight [D]: [T, D] -> [T, D]."""

    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        self.weight = _frozen(weight)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention of a batch over the cache: x [T, D] -> [T, D].

    wq [H*Dh, D], wk and wv [KV*Dh, D], wo [D, H*Dh]; ``biases`` (Qwen2): the q, k and v
    projection biases [H*Dh], [KV*Dh], [KV*Dh], added after the product; ``qk_norm`` (Qwen3):
    RMSNorm weights [Dh] of every q and k head, applied before RoPE; ``rope_factors``
    (LLaMA 3.1+): see :func:`rope_tables`. Writes the batch's K/V (after RoPE)
    into ``cache`` for ``layer``; see :func:`attention` for what each token sees.
    """

    def __init__(self, config: LlamaConfig, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor,
                 biases: tuple[Tensor, Tensor, Tensor] | None = None, rope_factors: Tensor | None = None,
                 qk_norm: tuple[Tensor, Tensor] | None = None, local: bool = False, nope: bool = False):
        super().__init__()
        self.config = config
        # A sliding-window layer: its own RoPE base, no frequency factors, the window.
        self.local, self.nope = local, nope  # (nope: SmolLM3's layers without RoPE)
        self.theta = (config.rope_theta_local or config.rope_theta) if local else config.rope_theta
        rope_factors = None if local else rope_factors
        self.mscale = 1.0 if local else config.rope_attn_factor
        self.wq, self.wk, self.wv, self.wo = (_frozen(w) for w in (wq, wk, wv, wo))
        self.biases = None if biases is None else nn.ParameterList(_frozen(b) for b in biases)
        self.rope_factors = None if rope_factors is None else _frozen(rope_factors)
        self.qk_norm = None if qk_norm is None else nn.ModuleList(RMSNorm(w, config.rms_norm_eps) for w in qk_norm)

    def _project(self, x: Tensor, w: Tensor, i: int) -> Tensor:
        y = linear(x, w)
        return y if self.biases is None else y + self.biases[i]

    def forward(self, x: Tensor, positions: Tensor, ancestors: Tensor, cache: KVCache,
                layer: int, start: int = 0) -> Tensor:
        c = self.config
        T = x.shape[0]
        f = self.rope_factors
        q = self._project(x, self.wq, 0).view(T, c.num_heads, c.head_dim)
        k = self._project(x, self.wk, 1).view(T, c.num_kv_heads, c.head_dim)
        if self.qk_norm is not None:
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        if not self.nope:
            q = rope(q, positions, self.theta, f, self.mscale)
            k = rope(k, positions, self.theta, f, self.mscale)
        v = self._project(x, self.wv, 2).view(T, c.num_kv_heads, c.head_dim)
        n_prefix = cache.n_past
        keys, values = cache.update(layer, k.transpose(0, 1), v.transpose(0, 1), start)  # [KV, L, Dh]
        prefix_start = None
        if self.local:  # (committed slot j holds position j; the caller windowed the scratch rows)
            prefix_start = positions.to(torch.long) - c.sliding_window + 1
        out = attention(q, keys, values, n_prefix, ancestors, prefix_start, c.attn_logit_softcapping,
                        c.query_pre_attn_scalar)  # [T, H, Dh]
        return linear(out.reshape(T, c.q_size), self.wo)


class FeedForward(nn.Module):
    """Gated MLP: ``w_down @ (act(w_gate @ x) * (w_up @ x))``, x [T, D] -> [T, D], with act
    SiLU (SwiGLU) or GELU-tanh (``activation="gelu_tanh"``, GeGLU).

    w_gate and w_up [F, D], w_down [D, F].
    """

    def __init__(self, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str = "silu"):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (_frozen(w) for w in (w_gate, w_up, w_down))
        self.gate = geglu if activation == "gelu_tanh" else swiglu

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.gate(linear(x, self.w_gate), linear(x, self.w_up)), self.w_down)


class Block(nn.Module):
    """One pre-norm decoder layer, ``blk.{i}.*`` weights: x [T, D] -> [T, D]. With
    ``config.post_norms`` (Gemma 3) each sub-block's output is RMS-normalized before its
    residual add."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, Tensor], i: int):
        super().__init__()
        p = f"blk.{i}."
        self.attention_norm = RMSNorm(weights[p + "attn_norm"], config.rms_norm_eps)
        biases = (tuple(weights[p + f"attn_{n}.bias"] for n in "qkv") if config.attention_bias else None)
        self.attention = Attention(config, weights[p + "attn_q"], weights[p + "attn_k"],
                                   weights[p + "attn_v"], weights[p + "attn_output"], biases,
                                   weights["rope_freqs"] if config.rope_freq_factors else None,
                                   (weights[p + "attn_q_norm"], weights[p + "attn_k_norm"]) if config.qk_norm else None,
                                   config.local_layer(i), config.nope_layer(i))
        self.ffn_norm = RMSNorm(weights[p + "ffn_norm"], config.rms_norm_eps)
        self.feed_forward = FeedForward(weights[p + "ffn_gate"], weights[p + "ffn_up"],
                                        weights[p + "ffn_down"], config.activation)
        self.post_norms = None
        if config.post_norms:
            self.post_norms = nn.ModuleList(RMSNorm(weights[p + n], config.rms_norm_eps)
                                            for n in ("post_attention_norm", "post_ffw_norm"))

    def _post(self, i: int, y: Tensor) -> Tensor:
        return y if self.post_norms is None else self.post_norms[i](y)

    def forward(self, x: Tensor, positions: Tensor, ancestors: Tensor, cache: KVCache,
                layer: int, start: int = 0) -> Tensor:
        h = x + self._post(0, self.attention(self.attention_norm(x), positions, ancestors, cache, layer, start))
        return h + self._post(1, self.feed_forward(self.ffn_norm(h)))


class LlamaReference(nn.Module):
    """The target model twin: a LLaMA decoder over a token batch and a :class:`KVCache`.

    Weights are frozen parameters in ``dtype``; every matmul runs in float64 (see
    :func:`linear`), everything else in the model dtype. The LM head is ``output``, or
    ``token_embd`` when the config ties them (and ``output`` is then absent).

    Args:
        config: the model's shape and numerics.
        weights: canonical name -> float tensor, exactly the names and shapes of
            ``formats.base.expected_weight_shapes(config)``.
        dtype: parameter and activation dtype.
    """

    def __init__(self, config: LlamaConfig, weights: Mapping[str, Tensor],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        expected = expected_weight_shapes(config)  # has "output" iff the head is untied
        missing = sorted(set(expected) - set(weights))
        unknown = sorted(set(weights) - set(expected))
        if missing or unknown:
            raise ValueError(f"LlamaReference: missing weights {missing}, unknown weights {unknown}")
        for name, t in weights.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"LlamaReference: {name} has shape {tuple(t.shape)}, "
                                 f"expected {expected[name]}")
        # (RoPE factors stay float32, as the engine keeps them, whatever the model dtype)
        w = {name: t.detach().to(torch.float32 if name == "rope_freqs" else dtype) for name, t in weights.items()}
        self.config = config
        self.tok_embeddings = _frozen(w["token_embd"])
        self.layers = nn.ModuleList(Block(config, w, i) for i in range(config.num_layers))
        self.norm = RMSNorm(w["output_norm"], config.rms_norm_eps)
        self.output = _frozen(w["output"]) if "output" in w else None

    @classmethod
    def from_source(cls, src: ModelSource, dtype: torch.dtype = torch.float32) -> LlamaReference:
        """Build from a loaded model file, decoding every weight to float32 once."""
        weights = {name: torch.from_numpy(dequantize(w)) for name, w in src.weights.items()}
        return cls(src.config, weights, dtype)

    def new_cache(self, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``max_len`` tokens, in the model dtype unless told otherwise."""
        return KVCache(self.config, max_len, dtype or self.tok_embeddings.dtype)

    def forward(self, tokens: Tensor, positions: Tensor | None, ancestors: Tensor | None,
                cache: KVCache, append: bool = False) -> tuple[Tensor, Tensor]:
        """One target call: prefill, decode or tree verification.

        Args:
            tokens: long [T].
            positions: long [T]; None means ``n_past + arange(T)`` (required when appending).
            ancestors: bool [T, T], ``ancestors[t, j]`` = batch token j is visible to t
                (include the diagonal: a token sees itself); None means causal. When
                appending: bool [T, n_pending + T] over all pending rows (None: causal in
                the batch, no earlier scratch row visible).
            cache: written at slots ``n_past .. n_past + T - 1``; not committed here.
            append: write after the pending rows instead of replacing them (see
                :class:`KVCache`).
        Returns:
            logits [T, V] and features [T, D] (final-norm hidden states, the LM head's input),
            both in the model dtype.
        """
        c = self.config
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"forward: tokens must be a non-empty 1-D tensor, got {tuple(tokens.shape)}")
        T = tokens.shape[0]
        if int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size:
            raise ValueError(f"forward: token ids must lie in [0, {c.vocab_size})")
        start, ancestors = scratch_layout(cache, T, positions, ancestors, append)
        if positions is None:
            positions = cache.n_past + torch.arange(T)
        if cache.k.shape[:2] != (c.num_layers, c.num_kv_heads) or cache.k.shape[3] != c.head_dim:
            raise ValueError(f"forward: cache of shape {tuple(cache.k.shape)} does not fit the model")

        x = self.tok_embeddings[tokens]  # [T, D]
        if c.scale_embeddings:  # (sqrt(D) rounded to the model dtype, as Gemma does)
            x = x * torch.tensor(c.hidden_size ** 0.5, dtype=x.dtype)
        positions = positions.to(torch.long)
        cache.scratch_pos = torch.cat([cache.scratch_pos[:start], positions])
        local_ancestors = ancestors
        if c.sliding_window:  # the scratch rows outside each token's window
            local_ancestors = ancestors & (cache.scratch_pos[None, :] > positions[:, None] - c.sliding_window)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, local_ancestors if c.local_layer(i) else ancestors, cache, i, start)
        features = self.norm(x)
        head = self.output if self.output is not None else self.tok_embeddings
        return softcap(linear(features, head), c.final_logit_softcapping), features


@torch.no_grad()
def generate_greedy(model: LlamaReference, prompt_ids: Sequence[int], n: int) -> list[int]:
    """Greedy decoding with the reference: prefill the prompt, then one token per call.

    Returns:
        the ``n`` new token ids (the prompt not included).
    """
    cache = model.new_cache(len(prompt_ids) + n)
    logits, _ = model(torch.tensor(list(prompt_ids), dtype=torch.long), None, None, cache)
    cache.commit()
    out: list[int] = []
    while len(out) < n:
        out.append(int(logits[-1].argmax()))
        if len(out) < n:
            logits, _ = model(torch.tensor(out[-1:], dtype=torch.long), None, None, cache)
            cache.commit()
    return out
