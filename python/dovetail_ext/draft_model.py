"""The Dovetail draft model in PyTorch: config, inference twin, training forward, checkpoint.

What it is: the draft of the Dovetail method (Dynamic Gating Fusion of a target feature
and the next token's embedding, then L LLaMA layers) as a trainable ``nn.Module`` whose
inference path is the twin of the native draft engine (``csrc/model/draft.cpp``), plus
the on-disk checkpoint format both read. What it is not: a trainer (data, loss and
optimizer live elsewhere), or fast at inference.

Legend: B sequences, N positions per sequence, T tokens in one call, D hidden size,
H query heads, KV key/value heads, Dh head dim, F FFN size, V vocab size, L draft layers,
P scratch rows pending before an appending call.

At position j the draft reads the target's final-norm feature f_j and the next token
x_{j+1} and predicts the next feature (row vectors, no biases)::

    e  = RMSNorm_e(Emb(x_{j+1}))        Emb: the target's token embedding, frozen, passed in
    h1 = f_j W1^T                       feature path, no activation
    h2 = SiLU(e W2^T)                   token path
    z  = sigmoid([h1 ; h2] Wz^T)        per-channel gate
    g  = z * h1 + (1 - z) * h2
    f^_{j+1} = layers(g)                layer 0 has no input norm; no final norm
    logits   = f^_{j+1} H^T             H: the target's LM head, frozen, passed in

Checkpoint: a directory with ``draft.safetensors`` (canonical names, f32 or bf16) and
``draft.json``::

    {"format": "dovetail-draft", "version": 1,
     "config": {hidden_size, num_layers, ...}, "target": {TargetSignature}, "card": {...}}

torch is optional for this module: the configs, :func:`expected_draft_shapes` and
:func:`load_draft_weights` (what the native engine uses) need only numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .config import LlamaConfig
from .errors import DraftMismatchError, FormatError
from .formats.base import ModelSource, Weight, read_json_object
from .formats.hf import _as_f32, _SafetensorsFile

try:  # the native engine loads drafts without torch installed
    import torch
except ImportError:
    torch = None

if torch is not None:
    import torch.nn.functional as F
    from torch import Tensor, nn

    from .reference import KVCache, attention, linear, rmsnorm, rope, scratch_layout, swiglu

    _Module = nn.Module
else:
    _Module = object  # the model classes then refuse to be built (see _need_torch)

__all__ = ["TargetSignature", "DraftConfig", "expected_draft_shapes", "check_vocab_map", "DGF",
           "DraftLayer", "DovetailDraft", "load_draft", "load_draft_weights", "DRAFT_FORMAT",
           "DRAFT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE", "VOCAB_MAP"]

DRAFT_FORMAT = "dovetail-draft"
DRAFT_VERSION = 1
WEIGHTS_FILE = "draft.safetensors"
CONFIG_FILE = "draft.json"
_SAVE_DTYPES = ("f32", "bf16")
#: Checkpoint tensor of a reduced-vocabulary draft: int64 [draft_vocab_size], the target
#: token ids the draft can propose (strictly ascending, the EOS ids among them).
VOCAB_MAP = "vocab_map"


# ----------------------------------------------------------------------------------------
# Config and the target a draft belongs to


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _check_positive_float(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_keys(owner: str, d: Any, required: set[str], optional: set[str] = frozenset()) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{owner}: expected a dict, got {type(d).__name__}")
    missing, unknown = sorted(required - set(d)), sorted(set(d) - required - optional)
    if missing or unknown:
        raise ValueError(f"{owner}: missing keys {missing}, unknown keys {unknown}")


# id(weight) -> (weak references to it and to its data, sha256): loading a model with its
# draft and corpus checks the signature three times, 25-30 ms of hashing each for the
# default model. Only read-only data (a memory map of the model file) is remembered: it
# cannot change under the hash.
_EMBEDDING_HASHES: dict[int, tuple[weakref.ref, weakref.ref, str]] = {}


def _embedding_sha256(w: Weight) -> str:
    """sha256 of a stored embedding: its dtype and shape, then its raw bytes as stored."""
    key = id(w)
    hit = _EMBEDDING_HASHES.get(key)
    read_only = isinstance(w.data, np.ndarray) and not w.data.flags.writeable
    if hit is not None and hit[0]() is w and hit[1]() is w.data and read_only:
        return hit[2]
    h = hashlib.sha256(f"{w.dtype}:{list(w.shape)}:".encode())
    h.update(np.ascontiguousarray(w.data).view(np.uint8))
    sha = h.hexdigest()
    if read_only:
        _EMBEDDING_HASHES[key] = (weakref.ref(w, lambda _: _EMBEDDING_HASHES.pop(key, None)), weakref.ref(w.data), sha)
    return sha


@dataclass(frozen=True)
class TargetSignature:
    """What identifies the target a draft was trained for.

    The draft reads the target's features and shares its embedding and LM head, so a draft
    is only valid next to the exact target it was trained with. ``embedding_sha256`` hashes
    the token embedding as stored (dtype, shape, raw bytes): the same model stored in
    another format (say q8_0 instead of bf16) has another signature. ``name`` is kept for
    error messages only and takes no part in comparisons.
    """

    architecture: str
    hidden_size: int
    vocab_size: int
    embedding_sha256: str
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"TargetSignature.architecture must be a non-empty string, "
                             f"got {self.architecture!r}")
        _check_positive_int("TargetSignature", "hidden_size", self.hidden_size)
        _check_positive_int("TargetSignature", "vocab_size", self.vocab_size)
        sha = self.embedding_sha256
        if not (isinstance(sha, str) and len(sha) == 64
                and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"TargetSignature.embedding_sha256 must be 64 lowercase hex digits, "
                             f"got {sha!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"TargetSignature.name must be a string, got {self.name!r}")

    @classmethod
    def from_source(cls, src: ModelSource) -> TargetSignature:
        """The signature of a loaded target (hashes its token embedding once)."""
        if "token_embd" not in src.weights:
            raise ValueError(f"target {src.name or src.path!r} has no token_embd weight")
        return cls(architecture=src.config.architecture, hidden_size=src.config.hidden_size,
                   vocab_size=src.config.vocab_size,
                   embedding_sha256=_embedding_sha256(src.weights["token_embd"]),
                   name=src.name or src.path)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetSignature:
        names = {f.name for f in fields(cls)}
        _check_keys("TargetSignature", d, names - {"name"}, {"name"})
        return cls(**d)

    def differences(self, other: TargetSignature) -> list[str]:
        """One line per compared field that differs, ``field: mine vs other``."""
        out = []
        for f in fields(self):
            if f.compare and getattr(self, f.name) != getattr(other, f.name):
                out.append(f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}")
        return out


@dataclass(frozen=True)
class DraftConfig:
    """Shape and numerics of a Dovetail draft, and the target it belongs to.

    ``hidden_size`` and ``vocab_size`` are the target's (the draft reads its features and
    shares its embedding and head); the layer dims default to the target's too
    (:meth:`for_target`) but may differ, except that D is fixed.

    ``draft_vocab_size`` > 0 makes a reduced-vocabulary draft: its head is the target's
    head restricted to the ``vocab_map`` rows (a checkpoint tensor), so it only proposes
    those tokens; on a CPU the full head would dominate the draft's cost. 0 means the full
    vocabulary. ``eos_token_ids`` are the target's end tokens, which every vocab map must
    hold (empty in checkpoints written before these fields existed).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    target: TargetSignature
    draft_vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size"):
            _check_positive_int("DraftConfig", name, getattr(self, name))
        if self.head_dim % 2:
            raise ValueError(f"DraftConfig.head_dim must be even (RoPE pairs), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DraftConfig: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        for name in ("rope_theta", "rms_norm_eps"):
            object.__setattr__(self, name, _check_positive_float("DraftConfig", name, getattr(self, name)))
        if not isinstance(self.target, TargetSignature):
            raise ValueError(f"DraftConfig.target must be a TargetSignature, got {type(self.target).__name__}")
        for name in ("hidden_size", "vocab_size"):
            if getattr(self, name) != getattr(self.target, name):
                raise ValueError(f"DraftConfig.{name} = {getattr(self, name)} differs from the "
                                 f"target's {getattr(self.target, name)}")
        dv = self.draft_vocab_size
        if not isinstance(dv, int) or isinstance(dv, bool) or not 0 <= dv <= self.vocab_size:
            raise ValueError(f"DraftConfig.draft_vocab_size must be an integer in [0, {self.vocab_size}] "
                             f"(0: the full vocabulary), got {dv!r}")
        eos = self.eos_token_ids
        if not isinstance(eos, (list, tuple)) or not all(
                isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.vocab_size for e in eos):
            raise ValueError(f"DraftConfig.eos_token_ids must be token ids in [0, {self.vocab_size}), got {eos!r}")
        object.__setattr__(self, "eos_token_ids", tuple(sorted(set(eos))))
        if dv and len(self.eos_token_ids) > dv:
            raise ValueError(f"DraftConfig: draft_vocab_size {dv} cannot hold the {len(self.eos_token_ids)} EOS ids")

    @classmethod
    def for_target(cls, src: ModelSource, num_layers: int = 1,
                   intermediate_size: int | None = None, draft_vocab_size: int = 0) -> DraftConfig:
        """A draft shaped like the target's layers (``intermediate_size`` defaults to its F),
        with the target's EOS ids; ``draft_vocab_size`` 0 keeps the full vocabulary."""
        c = src.config
        return cls(hidden_size=c.hidden_size, num_layers=num_layers, num_heads=c.num_heads,
                   num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                   intermediate_size=c.intermediate_size if intermediate_size is None
                   else intermediate_size,
                   rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                   target=TargetSignature.from_source(src), draft_vocab_size=draft_vocab_size,
                   eos_token_ids=tuple(c.eos_token_ids))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_config(self) -> LlamaConfig:
        """The draft's decoder layers as a :class:`LlamaConfig` (for ``reference.KVCache``)."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, rope_theta=self.rope_theta,
                           rms_norm_eps=self.rms_norm_eps, architecture=self.target.architecture)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``target`` nested as :meth:`TargetSignature.to_dict`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["target"] = self.target.to_dict()
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DraftConfig:
        optional = {"draft_vocab_size", "eos_token_ids"}  # absent from older draft.json files
        _check_keys("DraftConfig", d, {f.name for f in fields(cls)} - optional, optional)
        return cls(**{**d, "target": TargetSignature.from_dict(d["target"])})


def expected_draft_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every draft-owned tensor, in checkpoint order.

    No ``token_embd`` or ``output``: those are the target's. ``blk.0.attn_norm`` is absent
    (the fused input enters layer 0's attention un-normalized). A reduced-vocabulary draft
    ends with ``vocab_map`` [draft_vocab_size] (int64 token ids, not a float weight).
    """
    D, F_, QD, KVD = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "fuse.e_norm": (D,), "fuse.w1": (D, D), "fuse.w2": (D, D), "fuse.wz": (D, 2 * D)}
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        if i > 0:
            shapes[p + "attn_norm"] = (D,)
        shapes.update({
            p + "attn_q": (QD, D), p + "attn_k": (KVD, D), p + "attn_v": (KVD, D),
            p + "attn_output": (D, QD), p + "ffn_norm": (D,),
            p + "ffn_gate": (F_, D), p + "ffn_up": (F_, D), p + "ffn_down": (D, F_)})
    if cfg.draft_vocab_size:
        shapes[VOCAB_MAP] = (cfg.draft_vocab_size,)
    return shapes


def check_vocab_map(cfg: DraftConfig, vocab_map: Any) -> np.ndarray:
    """A validated copy of a draft's vocabulary map as int64 [draft_vocab_size].

    Raises:
        ValueError: the config has no reduced vocabulary, or the map is not 1-D integral of
            length ``draft_vocab_size``, not strictly ascending, outside [0, V), or lacks
            one of the config's EOS ids (each named).
    """
    if not cfg.draft_vocab_size:
        raise ValueError("vocab_map given for a full-vocabulary draft (draft_vocab_size is 0)")
    vm = np.asarray(vocab_map.cpu().numpy() if torch is not None and isinstance(vocab_map, torch.Tensor)
                    else vocab_map)
    if vm.ndim != 1 or not (np.issubdtype(vm.dtype, np.integer)
                            or (np.issubdtype(vm.dtype, np.floating) and np.all(vm == np.round(vm)))):
        raise ValueError(f"vocab_map must be a 1-D array of integer token ids, got {vm.dtype} {list(vm.shape)}")
    if vm.shape[0] != cfg.draft_vocab_size:
        raise ValueError(f"vocab_map has {vm.shape[0]} entries, draft_vocab_size is {cfg.draft_vocab_size}")
    vm = vm.astype(np.int64)
    if vm.min() < 0 or vm.max() >= cfg.vocab_size:
        raise ValueError(f"vocab_map has token ids outside [0, {cfg.vocab_size}): min {vm.min()}, max {vm.max()}")
    if np.any(np.diff(vm) <= 0):
        at = int(np.argmax(np.diff(vm) <= 0))
        raise ValueError(f"vocab_map must be strictly ascending (entry {at + 1} = {vm[at + 1]} follows {vm[at]})")
    missing = [e for e in cfg.eos_token_ids if e not in set(vm.tolist())]
    if missing:
        raise ValueError(f"vocab_map lacks the EOS id(s) {missing}: the draft could never propose the end")
    return vm


# ----------------------------------------------------------------------------------------
# Model (parameter names are the canonical names: fuse.*, blk.{i}.*)


def _need_torch(what: str) -> None:
    if torch is None:
        raise ImportError(f"{what} needs PyTorch (pip install torch); "
                          f"load_draft_weights() reads checkpoints without it")


def _linear_exact(x: Tensor, w: Tensor) -> Tensor:
    """:func:`reference.linear` (float64 matmul, result in ``x.dtype``) over any leading dims."""
    return linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


def _rope_rows(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """:func:`reference.rope` for x [B, T, H, Dh] whose B rows share positions [T]."""
    B, T, H, Dh = x.shape
    y = rope(x.transpose(0, 1).reshape(T, B * H, Dh), positions, theta)  # rows fold into heads
    return y.view(T, B, H, Dh).transpose(0, 1)


# mm(x [..., K], w [N, K]) -> [..., N]; attend(layer, q [B,T,H,Dh], k, v [B,T,KV,Dh]) -> [B,T,H,Dh]
MatMul = Callable[["Tensor", "Tensor"], "Tensor"]
Attend = Callable[[int, "Tensor", "Tensor", "Tensor"], "Tensor"]


def _param(t: Tensor) -> nn.Parameter:
    # a float32 copy: the draft must never alias (and train) the caller's tensors
    return nn.Parameter(t.detach().to(torch.float32).clone())


class DGF(_Module):
    """Dynamic Gating Fusion: (f [.., D], Emb(x) [.., D]) -> g [.., D].

    Weights ``fuse.e_norm`` [D], ``fuse.w1`` [D, D], ``fuse.w2`` [D, D], ``fuse.wz`` [D, 2D].
    """

    def __init__(self, config: DraftConfig, w: Mapping[str, Tensor]):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.e_norm, self.w1, self.w2, self.wz = (
            _param(w["fuse." + n]) for n in ("e_norm", "w1", "w2", "wz"))

    def forward(self, features: Tensor, emb: Tensor, mm: MatMul | None = None) -> Tensor:
        mm = mm or F.linear
        e = rmsnorm(emb, self.e_norm, self.eps)                    # e  = RMSNorm_e(Emb(x))
        h1 = mm(features, self.w1)                                  # h1 = f W1^T
        h2 = F.silu(mm(e, self.w2))                                 # h2 = SiLU(e W2^T)
        z = torch.sigmoid(mm(torch.cat([h1, h2], dim=-1), self.wz))  # z = sigmoid([h1; h2] Wz^T)
        return z * h1 + (1 - z) * h2                                # g  = z h1 + (1 - z) h2


class DraftLayer(_Module):
    """One pre-norm LLaMA decoder layer of the draft, ``blk.{i}.*``: x [B, T, D] -> [B, T, D].

    The target's layer math (twins from ``reference``); layer 0 has no ``attn_norm``. The
    caller supplies the matmul (``mm``) and the attention core (``attend``: cache-backed
    tree attention at inference, causal SDPA in training), so both paths share this code.
    """

    def __init__(self, config: DraftConfig, w: Mapping[str, Tensor], index: int):
        super().__init__()
        self.config, self.index = config, index
        p = f"blk.{index}."
        self.attn_norm = _param(w[p + "attn_norm"]) if index > 0 else None
        self.attn_q, self.attn_k, self.attn_v, self.attn_output = (
            _param(w[p + n]) for n in ("attn_q", "attn_k", "attn_v", "attn_output"))
        self.ffn_norm = _param(w[p + "ffn_norm"])
        self.ffn_gate, self.ffn_up, self.ffn_down = (
            _param(w[p + n]) for n in ("ffn_gate", "ffn_up", "ffn_down"))

    def forward(self, x: Tensor, positions: Tensor, attend: Attend, mm: MatMul) -> Tensor:
        c = self.config
        B, T, _ = x.shape
        eps = c.rms_norm_eps
        xn = x if self.attn_norm is None else rmsnorm(x, self.attn_norm, eps)
        q = _rope_rows(mm(xn, self.attn_q).view(B, T, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = _rope_rows(mm(xn, self.attn_k).view(B, T, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = mm(xn, self.attn_v).view(B, T, c.num_kv_heads, c.head_dim)
        h = x + mm(attend(self.index, q, k, v).reshape(B, T, c.q_size), self.attn_output)
        hn = rmsnorm(h, self.ffn_norm, eps)
        return h + mm(swiglu(mm(hn, self.ffn_gate), mm(hn, self.ffn_up)), self.ffn_down)


def _default_vocab_map(config: DraftConfig) -> Tensor:
    """The EOS ids plus the lowest other ids, ascending (a placeholder for untrained drafts)."""
    eos = set(config.eos_token_ids)
    rest = [i for i in range(config.draft_vocab_size + len(eos)) if i not in eos]
    return torch.tensor(sorted(eos | set(rest[:config.draft_vocab_size - len(eos)])), dtype=torch.int64)


def _init_weights(config: DraftConfig, std: float, generator: Any) -> dict[str, Tensor]:
    """Norm weights 1, matrices N(0, std^2) drawn from ``generator`` (None: torch's global);
    a reduced-vocabulary draft gets :func:`_default_vocab_map`."""
    out = {name: torch.ones(shape) if len(shape) == 1
           else torch.randn(shape, generator=generator) * std
           for name, shape in expected_draft_shapes(config).items() if name != VOCAB_MAP}
    if config.draft_vocab_size:
        out[VOCAB_MAP] = _default_vocab_map(config)
    return out


class DovetailDraft(_Module):
    """The draft: DGF then ``config.num_layers`` decoder layers; float32 trainable parameters.

    Its parameter names are the canonical checkpoint names (``fuse.w1``, ``blk.0.attn_q``...).
    The target's embedding [V, D] and LM head [V, D] are arguments of each call, never
    stored. Use :meth:`forward` for inference with a :class:`reference.KVCache` (the native
    engine's twin) and :meth:`forward_train` for teacher-forced training.

    A reduced-vocabulary draft (``config.draft_vocab_size`` > 0) keeps its ``vocab_map``
    (int64 [Vd]) as a buffer: :meth:`logits` then gives [..., Vd], column j for target
    token ``vocab_map[j]``.

    Args:
        config: the draft's shape and its target.
        weights: canonical name -> tensor, exactly :func:`expected_draft_shapes`; copied to
            float32 (``vocab_map`` to int64, checked by :func:`check_vocab_map`). None: norms
            1, matrices N(0, 0.02^2) from torch's global generator.
    """

    def __init__(self, config: DraftConfig, weights: Mapping[str, Tensor] | None = None):
        _need_torch("DovetailDraft")
        super().__init__()
        if weights is None:
            weights = _init_weights(config, 0.02, None)
        expected = expected_draft_shapes(config)
        missing = [n for n in expected if n not in weights]
        unknown = sorted(n for n in weights if n not in expected)
        if missing or unknown:
            raise ValueError(f"DovetailDraft: missing weights {missing}, unexpected weights {unknown}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"DovetailDraft: weight {name} has shape {tuple(weights[name].shape)}, "
                                 f"expected {shape}")
        vocab_map = None
        if config.draft_vocab_size:
            vocab_map = torch.from_numpy(check_vocab_map(config, weights[VOCAB_MAP]))
        self.config = config
        self.card: dict[str, Any] = {}  # free-form description, saved in draft.json
        self.fuse = DGF(config, weights)
        self.blk = nn.ModuleList(DraftLayer(config, weights, i) for i in range(config.num_layers))
        self.vocab_map: Tensor | None
        self.register_buffer("vocab_map", vocab_map)

    @classmethod
    def random(cls, config: DraftConfig, seed: int = 0, std: float = 0.02) -> DovetailDraft:
        """A seeded initialization: norm weights 1, matrices N(0, std^2)."""
        _need_torch("DovetailDraft.random")
        return cls(config, _init_weights(config, std, torch.Generator().manual_seed(seed)))

    @property
    def dtype(self) -> torch.dtype:
        return self.fuse.w1.dtype

    def state_weights(self) -> dict[str, Tensor]:
        """Canonical name -> tensor (detached, sharing storage with the parameters); with
        ``vocab_map`` (int64) last for a reduced-vocabulary draft."""
        out = {name: p.detach() for name, p in self.named_parameters()}
        if self.vocab_map is not None:
            out[VOCAB_MAP] = self.vocab_map
        return out

    def new_cache(self, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty draft KV cache for ``max_len`` tokens, in the parameter dtype by default."""
        return KVCache(self.config.layer_config(), max_len, dtype or self.dtype)

    def _check_io(self, features: Tensor, next_tokens: Tensor, embed: Tensor, lead: int) -> None:
        c = self.config
        if features.dim() != lead + 1 or features.shape[-1] != c.hidden_size:
            dims = "T" if lead == 1 else "B, N"
            raise ValueError(f"draft: features must be [{dims}, {c.hidden_size}], "
                             f"got {tuple(features.shape)}")
        if tuple(next_tokens.shape) != tuple(features.shape[:-1]) or next_tokens.dtype != torch.long:
            raise ValueError(f"draft: next_tokens must be long {tuple(features.shape[:-1])}, got "
                             f"{next_tokens.dtype} {tuple(next_tokens.shape)}")
        if tuple(embed.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"draft: embed must be the target's token embedding "
                             f"[{c.vocab_size}, {c.hidden_size}], got {tuple(embed.shape)}")

    def _run(self, features: Tensor, emb: Tensor, positions: Tensor, attend: Attend,
             mm: MatMul) -> Tensor:
        x = self.fuse(features, emb, mm)
        for layer in self.blk:
            x = layer(x, positions, attend, mm)
        return x  # no final norm: this is the predicted feature

    def forward(self, features: Tensor, next_tokens: Tensor, positions: Tensor | None,
                ancestors: Tensor | None, cache: KVCache, embed: Tensor,
                append: bool = False) -> Tensor:
        """One inference call over T tokens with a KV cache (the native draft engine's twin).

        Token t attends to the committed prefix and to the scratch rows marked in
        ``ancestors``. A plain call (``append=False``) first drops pending scratch rows; an
        appending call (tree expansion) writes after them. Matmuls run in float64 like
        ``reference.linear``; no autograd (train with :meth:`forward_train`).

        Args:
            features: [T, D] float, the target feature f_j of each token (or, deeper in a
                tree, the parent's draft output).
            next_tokens: long [T], x_{j+1}.
            positions: long [T] (None: ``n_past + arange(T)``, plain calls only).
            ancestors: bool [T, P + T] over the pending rows then the batch (P = 0 unless
                appending); None means causal within the batch.
            cache: from :meth:`new_cache`; the batch's K/V go to scratch, not committed.
            embed: [V, D] the target's token embedding.
            append: keep the pending scratch rows and write after them.
        Returns:
            hidden [T, D] in the parameter dtype: the predicted features f^_{j+1}.
        """
        self._check_io(features, next_tokens, embed, lead=1)
        c = self.config
        T = features.shape[0]
        if int(next_tokens.min()) < 0 or int(next_tokens.max()) >= c.vocab_size:
            raise ValueError(f"draft: token ids must lie in [0, {c.vocab_size})")
        if cache.k.shape[:2] != (c.num_layers, c.num_kv_heads) or cache.k.shape[3] != c.head_dim:
            raise ValueError(f"draft: cache of shape {tuple(cache.k.shape)} does not fit the draft")
        start, ancestors = scratch_layout(cache, T, positions, ancestors, append)
        if positions is None:
            positions = cache.n_past + torch.arange(T)
        if tuple(positions.shape) != (T,):
            raise ValueError(f"draft: positions must have shape ({T},), got {tuple(positions.shape)}")
        n_prefix = cache.n_past

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = cache.update(i, k[0].transpose(0, 1), v[0].transpose(0, 1), start)
            return attention(q[0], keys, values, n_prefix, ancestors)[None]

        with torch.no_grad():  # the cache holds no autograd history
            emb = embed[next_tokens].to(self.dtype)
            return self._run(features.to(self.dtype)[None], emb[None], positions, attend,
                             _linear_exact)[0]

    def forward_train(self, features: Tensor, next_tokens: Tensor, embed: Tensor) -> Tensor:
        """Teacher-forced, differentiable forward over B sequences, causal, positions 0..N-1.

        Batched matmuls in the parameter dtype and ``F.scaled_dot_product_attention``
        (query head h reads KV head h // G, as in ``reference.attention``). Works on any
        device holding the parameters and inputs.

        Args:
            features: [B, N, D] f_0..f_{N-1} (noise, if any, already added).
            next_tokens: long [B, N] x_1..x_N.
            embed: [V, D] the target's token embedding (frozen unless the caller says so).
        Returns:
            hidden [B, N, D] in the parameter dtype: predictions of f_1..f_N.
        """
        self._check_io(features, next_tokens, embed, lead=2)
        positions = torch.arange(features.shape[1], device=features.device)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)

        emb = F.embedding(next_tokens, embed).to(self.dtype)
        return self._run(features.to(self.dtype), emb, positions, attend, F.linear)

    def draft_head(self, head: Tensor) -> Tensor:
        """The rows of the target's LM head [V, D] the draft proposes from: [Vd, D] (all V
        rows for a full-vocabulary draft)."""
        c = self.config
        if tuple(head.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"draft: head must be the target's LM head [{c.vocab_size}, "
                             f"{c.hidden_size}], got {tuple(head.shape)}")
        return head if self.vocab_map is None else head[self.vocab_map.to(head.device)]

    def logits(self, hidden: Tensor, head: Tensor) -> Tensor:
        """Draft logits in ``hidden.dtype``: hidden [..., D], head [V, D] (the target's full
        head) -> [..., V], or [..., Vd] for a reduced-vocabulary draft (column j is target
        token ``vocab_map[j]``)."""
        return F.linear(hidden, self.draft_head(head).to(hidden.dtype))

    def save(self, directory: str | os.PathLike, dtype: str = "bf16",
             card: Mapping[str, Any] | None = None) -> Path:
        """Write the checkpoint directory (created if needed; both files replaced atomically).

        Args:
            directory: destination. dtype: ``"bf16"`` (rounded to nearest even) or ``"f32"``.
            card: JSON-safe free-form description (training data, steps, metrics...);
                None saves :attr:`card`.
        Returns:
            the directory.
        """
        from safetensors.torch import save_file

        if dtype not in _SAVE_DTYPES:
            raise ValueError(f"save: dtype must be one of {_SAVE_DTYPES}, got {dtype!r}")
        card = dict(self.card if card is None else card)
        doc = {"format": DRAFT_FORMAT, "version": DRAFT_VERSION,
               "config": {k: v for k, v in self.config.to_dict().items() if k != "target"},
               "target": self.config.target.to_dict(), "card": card}
        text = json.dumps(doc, indent=2, allow_nan=False)  # a bad card fails before any write
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        tensors = {n: t.to(device="cpu", dtype=torch.int64 if n == VOCAB_MAP else torch_dtype).contiguous()
                   for n, t in self.state_weights().items()}
        for n, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"save: weight {n} holds NaN or inf (training diverged?); nothing written")
        # Weights first, config last: an interrupted save leaves no loadable half-checkpoint.
        save_file(tensors, str(directory / (WEIGHTS_FILE + ".tmp")), metadata={"format": "pt"})
        os.replace(directory / (WEIGHTS_FILE + ".tmp"), directory / WEIGHTS_FILE)
        (directory / (CONFIG_FILE + ".tmp")).write_text(text + "\n", encoding="utf-8")
        os.replace(directory / (CONFIG_FILE + ".tmp"), directory / CONFIG_FILE)
        return directory


# ----------------------------------------------------------------------------------------
# Checkpoint reading


def _read_draft_json(directory: Path) -> tuple[DraftConfig, dict[str, Any]]:
    """(config, card) from ``draft.json``; every problem is a FormatError naming the file."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FormatError(f"{directory}: missing {CONFIG_FILE} (not a Dovetail draft checkpoint)")
    doc = read_json_object(path)
    if doc.get("format") != DRAFT_FORMAT:
        raise FormatError(f"{path}: format is {doc.get('format')!r}, expected {DRAFT_FORMAT!r}")
    if doc.get("version") != DRAFT_VERSION:
        raise FormatError(f"{path}: version {doc.get('version')!r} is not supported "
                          f"(this reader knows version {DRAFT_VERSION})")
    for key in ("config", "target"):
        if not isinstance(doc.get(key), dict):
            raise FormatError(f"{path}: {key!r} must be a JSON object, got {doc.get(key)!r}")
    if "target" in doc["config"]:
        raise FormatError(f"{path}: 'config' must not hold 'target' (it is a top-level key)")
    card = doc.get("card", {})
    if not isinstance(card, dict):
        raise FormatError(f"{path}: 'card' must be a JSON object, got {type(card).__name__}")
    try:
        cfg = DraftConfig.from_dict({**doc["config"], "target": doc["target"]})
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: {e}") from e
    return cfg, card


class _DraftSafetensors(_SafetensorsFile):
    """The safetensors reader plus integer entries (``I64``/``I32``: only ``vocab_map``)."""

    _INT = {"I64": np.int64, "I32": np.int32}

    def _check(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        if isinstance(entry, dict) and entry.get("dtype") in self._INT:
            if name != VOCAB_MAP:
                raise FormatError(f"{self.path}: tensor {name} has integer dtype {entry['dtype']}; "
                                  f"only {VOCAB_MAP} may be integral")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            itemsize = np.dtype(self._INT[entry["dtype"]]).itemsize
            if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0
                    and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] and offsets[1] - offsets[0] == shape[0] * itemsize
                    and self.data_start + offsets[1] <= self.size):
                raise FormatError(f"{self.path}: tensor {name}: malformed or truncated entry {entry!r}")
            return entry["dtype"], (shape[0],), offsets[0], offsets[1]
        return super()._check(name, entry)

    def tensor(self, name: str) -> tuple[str, np.ndarray]:
        dtype, shape, begin, end = self.entries[name]
        if dtype not in self._INT:
            return super().tensor(name)
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        return dtype.lower(), raw.view(self._INT[dtype]).reshape(shape)


def _open_checkpoint(directory: str | os.PathLike) -> tuple[Path, DraftConfig, dict[str, Any],
                                                             dict[str, np.ndarray]]:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no such draft directory: {directory}")
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory (a draft checkpoint is a directory)")
    cfg, card = _read_draft_json(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FormatError(f"{directory}: missing {WEIGHTS_FILE}")
    st = _DraftSafetensors(path)  # header checked against the file; bf16 kept as uint16 bits
    # The tensor count a config implies, before listing names: a draft.json claiming a
    # million layers is refused at once instead of building a million layers' names
    # (a near miss still gets the list of missing names below).
    n_needed = 4 + 8 * cfg.num_layers + (cfg.num_layers - 1) + (1 if cfg.draft_vocab_size else 0)
    if n_needed > 2 * len(st.entries) + 16:
        raise FormatError(f"{path}: a {cfg.num_layers}-layer draft needs {n_needed} tensors, "
                          f"the file has {len(st.entries)}")
    expected = expected_draft_shapes(cfg)
    missing = [n for n in expected if n not in st.entries]
    unexpected = sorted(n for n in st.entries if n not in expected)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FormatError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if unexpected:
        raise FormatError(f"{path}: unexpected tensor(s) {', '.join(unexpected)} "
                          f"(not part of a {cfg.num_layers}-layer draft)")
    weights = {}
    for name, shape in expected.items():
        dtype, data = st.tensor(name)
        if data.shape != shape:
            raise FormatError(f"{path}: tensor {name} has shape {list(data.shape)}, "
                              f"expected {list(shape)}")
        if name == VOCAB_MAP:
            if dtype not in ("i64", "i32"):
                raise FormatError(f"{path}: tensor {VOCAB_MAP} must be I64 (token ids), got {dtype}")
            try:
                weights[name] = check_vocab_map(cfg, data)
            except ValueError as e:
                raise FormatError(f"{path}: {e}") from e
            continue
        if dtype in ("i64", "i32"):
            raise FormatError(f"{path}: tensor {name} must be floating point, got {dtype}")
        weights[name] = _as_f32(dtype, data)  # a fresh float32 array, not a view of the file
        if not np.isfinite(weights[name]).all():
            raise FormatError(f"{path}: tensor {name} holds NaN or inf (a training run that diverged?)")
    return directory, cfg, card, weights


def load_draft_weights(directory: str | os.PathLike) -> tuple[DraftConfig, dict[str, np.ndarray]]:
    """Read a draft checkpoint with numpy only (the native engine's path).

    Returns:
        the config and canonical name -> float32 array (bf16 and f16 widened exactly;
        ``vocab_map`` of a reduced-vocabulary draft as int64, checked),
        in :func:`expected_draft_shapes` order.
    Raises:
        FileNotFoundError: no such directory.
        FormatError: a missing or malformed ``draft.json`` or ``draft.safetensors``, a
            missing, unexpected or mis-shaped tensor (named).
    """
    _, cfg, _, weights = _open_checkpoint(directory)
    return cfg, weights


def load_draft(directory: str | os.PathLike, target: ModelSource | None = None) -> DovetailDraft:
    """Load a draft checkpoint as a float32 :class:`DovetailDraft`.

    Args:
        directory: holds ``draft.json`` and ``draft.safetensors``.
        target: when given, the draft must have been made for it (same
            :class:`TargetSignature`).
    Raises:
        FileNotFoundError, FormatError: as :func:`load_draft_weights`.
        DraftMismatchError: ``target`` is not the draft's target; says which fields differ.
    """
    _need_torch("load_draft")
    directory, cfg, card, weights = _open_checkpoint(directory)
    if target is not None:
        have = TargetSignature.from_source(target)
        if have != cfg.target:
            raise DraftMismatchError(
                f"draft {directory} was made for target {cfg.target.name or '(unnamed)'!r}, not for "
                f"{have.name or '(unnamed)'!r}: " + "; ".join(cfg.target.differences(have)))
    draft = DovetailDraft(cfg, {n: torch.from_numpy(a) for n, a in weights.items()})
    draft.card = card
    return draft
