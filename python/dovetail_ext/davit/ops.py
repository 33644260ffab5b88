"""DaViT attention ops on the native core: window attention and channel-group attention.

Both take torch tensors (CPU or CUDA) or numpy arrays, float32, and return the same kind
of object as ``x``. Inputs that are not contiguous are copied to a contiguous layout first.
Shapes and dtypes are checked here so that mistakes surface as ``ValueError`` naming the
argument, before any native code runs.

For repeated calls with the same weights (a model), pack them once with
:class:`PackedAttention`: the functional form repacks its weights on every call.

``precision``: "fp32" (default) computes everything in fp32; "bf16" runs the qkv and output
projections with bf16 weights and activations and fp32 sums (AVX512-BF16; elsewhere a slow
scalar emulation), while attention maps, softmax and the channel maps stay fp32.
Channel attention over many tokens per image (N >= 4C in fp32, N >= 8C with bf16) uses an
exact Gram-matrix rewrite that runs in fp32 either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from ..errors import as_int

__all__ = ["window_attention", "channel_attention", "PackedAttention", "MAX_WINDOW", "MAX_GROUP",
           "set_num_threads", "get_num_threads"]

#: The largest window side and channel group the native kernels take (the native limits).
MAX_WINDOW = 16
MAX_GROUP = 256
#: The most threads the CPU kernels take.
MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Threads the CPU ops use from now on, in [1, MAX_THREADS] (default: ``OMP_NUM_THREADS``,
    else every core)."""
    n = as_int("threads", n)
    if n > MAX_THREADS:
        raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {n}")
    _core.davit_set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU ops use."""
    return _core.davit_get_num_threads()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _check_float32(name: str, t: Any) -> None:
    dt = str(t.dtype)
    if dt not in ("float32", "torch.float32"):
        raise ValueError(f"{name} must be float32, got {dt}")


def _check_heads(C: int, heads: Any, what: str) -> int:
    if not isinstance(heads, (int, np.integer)) or isinstance(heads, bool) or not 0 < heads < 2 ** 31:
        raise ValueError(f"{what} must be a positive integer, got {heads!r}")
    if C % heads:
        raise ValueError(f"C={C} is not divisible by {what}={heads}")
    return int(heads)


def _check_window(window_size: Any) -> int:
    if not isinstance(window_size, (int, np.integer)) or isinstance(window_size, bool) \
            or not 1 <= window_size <= MAX_WINDOW:
        raise ValueError(f"window_size must be an integer in [1, {MAX_WINDOW}], got {window_size!r}")
    return int(window_size)


def _check_weights(C: int, heads: int, what: str, qkv_weight, qkv_bias, proj_weight, proj_bias) -> None:
    _check_heads(C, heads, what)
    want = {"qkv_weight": (3 * C, C), "qkv_bias": (3 * C,), "proj_weight": (C, C), "proj_bias": (C,)}
    for name, t in (("qkv_weight", qkv_weight), ("qkv_bias", qkv_bias),
                    ("proj_weight", proj_weight), ("proj_bias", proj_bias)):
        if t is None:
            if name.endswith("bias"):
                continue
            raise ValueError(f"{name} is required")
        if not (_is_torch(t) or isinstance(t, np.ndarray)):
            raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(t).__name__}")
        if _shape(t) != want[name]:
            raise ValueError(f"{name} has shape {_shape(t)}, expected {want[name]} for C={C}")
        _check_float32(name, t)


def _host(t: Any) -> np.ndarray | None:
    """A C-contiguous float32 numpy view (a copy only when the layout requires it)."""
    if t is None:
        return None
    if _is_torch(t):
        return t.detach().contiguous().numpy()
    return np.ascontiguousarray(t)


class PackedAttention:
    """qkv and proj weights of one attention layer, repacked once for the CPU kernels.

    ``qkv_weight`` [3C, C], ``qkv_bias`` [3C] or None, ``proj_weight`` [C, C], ``proj_bias``
    [C] or None (torch tensors or numpy arrays, float32).
    """

    def __init__(self, qkv_weight, qkv_bias, proj_weight, proj_bias, precision: str = "fp32"):
        if len(_shape(proj_weight)) != 2:
            raise ValueError(f"proj_weight must be 2-D [C, C], got shape {_shape(proj_weight)}")
        C = _shape(proj_weight)[1]
        _check_weights(C, 1, "num_heads", qkv_weight, qkv_bias, proj_weight, proj_bias)
        self.dim = C
        bf16 = _precision_is_bf16(precision)
        self.qkv = _core.davit_pack_linear(_host(qkv_weight), _host(qkv_bias), bf16)
        self.proj = _core.davit_pack_linear(_host(proj_weight), _host(proj_bias), bf16)

    def window(self, x: np.ndarray, num_heads: int, window_size: int = 7,
               residual: np.ndarray | None = None) -> np.ndarray:
        """Window attention on a contiguous float32 [B, H, W, C] array (+ residual)."""
        return _core.davit_window_attention(x, self.qkv, self.proj, _check_heads(self.dim, num_heads, "num_heads"),
                                            _check_window(window_size), residual)

    def channel(self, x: np.ndarray, num_groups: int, residual: np.ndarray | None = None) -> np.ndarray:
        """Channel attention on a contiguous float32 [B, N, C] array (+ residual)."""
        return _core.davit_channel_attention(x, self.qkv, self.proj, _check_heads(self.dim, num_groups, "num_groups"),
                                             residual)


def _check_no_grad(*tensors: Any) -> None:
    """The native ops have no backward: refused, rather than returning a detached result,
    when autograd would want one."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.is_grad_enabled() and any(
            _is_torch(t) and t.requires_grad for t in tensors if t is not None):
        raise ValueError("the native DaViT ops have no backward pass, and an input requires grad: run "
                         "dovetail_ext.davit.reference (the PyTorch twin) to train, or call under torch.no_grad()")


def _precision_is_bf16(precision: str) -> bool:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision == "bf16"


def _check_x(x: Any, ndim: int, layout: str) -> None:
    if not (_is_torch(x) or isinstance(x, np.ndarray)):
        raise ValueError(f"x must be a torch tensor or a numpy array, got {type(x).__name__}")
    if len(_shape(x)) != ndim:
        raise ValueError(f"x must be {layout}, got shape {_shape(x)}")
    if any(s == 0 for s in _shape(x)):
        raise ValueError(f"x must not be empty, got shape {_shape(x)}")
    _check_float32("x", x)


def _cuda_call(fn_name: str, x, weights, dims: list[int]):
    import torch

    if not _core.cuda_compiled():
        raise RuntimeError("x is a CUDA tensor but dovetail_ext was built without CUDA")
    for name, t in zip(("qkv_weight", "qkv_bias", "proj_weight", "proj_bias"), weights):
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != x.device):
            raise ValueError(f"{name} must be a tensor on {x.device} like x")
    x = x.contiguous()
    w = [t.detach().contiguous() if t is not None else None for t in weights]
    out = torch.empty_like(x)
    ptr = [t.data_ptr() if t is not None else 0 for t in w]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        getattr(_core, fn_name)(x.data_ptr(), out.data_ptr(), 0, *ptr, *dims, stream)
    return out


def window_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int,
                     window_size: int = 7, precision: str = "fp32"):
    """DaViT window attention on a normalised channels-last map.

    x: [B, H, W, C] float32; qkv_weight [3C, C], qkv_bias [3C] or None, proj_weight [C, C],
    proj_bias [C] or None. Zero padding to multiples of ``window_size`` (no mask: padded
    tokens are keys/values), per-window per-head softmax(q k^T / sqrt(C / num_heads)) v,
    projection, crop. Returns [B, H, W, C] of the same kind (numpy / torch, device) as x.
    ``precision``: "fp32" or "bf16" projections (see the module docstring; CUDA: fp32 only).
    """
    _check_x(x, 4, "[B, H, W, C]")
    C = _shape(x)[3]
    _check_weights(C, num_heads, "num_heads", qkv_weight, qkv_bias, proj_weight, proj_bias)
    _check_window(window_size)
    _check_no_grad(x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    bf16 = _precision_is_bf16(precision)
    if _is_torch(x) and x.is_cuda:
        if bf16:
            raise ValueError("precision='bf16' is implemented for CPU inputs only")
        B, H, W, _ = _shape(x)
        return _cuda_call("davit_window_attention_cuda", x,
                          (qkv_weight, qkv_bias, proj_weight, proj_bias),
                          [B, H, W, C, int(num_heads), int(window_size)])
    packed = PackedAttention(qkv_weight, qkv_bias, proj_weight, proj_bias, precision)
    y = packed.window(_host(x), int(num_heads), int(window_size))
    return _like(x, y)


def channel_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_groups: int,
                      precision: str = "fp32"):
    """DaViT channel-group attention on normalised tokens.

    x: [B, N, C] float32; weights as for :func:`window_attention`. Per group (C/num_groups
    channels): A = softmax_rows((C/num_groups)^-1/2 k^T v) accumulated over all N tokens in
    fp32, output q A^T, then the projection. Returns [B, N, C] like x.
    ``precision``: "fp32" or "bf16" projections (see the module docstring; CUDA: fp32 only).
    """
    _check_x(x, 3, "[B, N, C]")
    C = _shape(x)[2]
    _check_weights(C, num_groups, "num_groups", qkv_weight, qkv_bias, proj_weight, proj_bias)
    _check_no_grad(x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    bf16 = _precision_is_bf16(precision)
    if _is_torch(x) and x.is_cuda:
        if bf16:
            raise ValueError("precision='bf16' is implemented for CPU inputs only")
        B, N, _ = _shape(x)
        return _cuda_call("davit_channel_attention_cuda", x,
                          (qkv_weight, qkv_bias, proj_weight, proj_bias), [B, N, C, int(num_groups)])
    packed = PackedAttention(qkv_weight, qkv_bias, proj_weight, proj_bias, precision)
    y = packed.channel(_host(x), int(num_groups))
    return _like(x, y)


def _like(x: Any, y: np.ndarray):
    if _is_torch(x):
        import torch

        return torch.from_numpy(y)
    return y
