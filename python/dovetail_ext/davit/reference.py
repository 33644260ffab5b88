"""PyTorch twins of the native DaViT ops: the original code's math, step for step.

These are the ground truth for tests (run them in float64 for a reference) and the path the
model takes when gradients are needed. Layouts are channels-last, as in the native ops:
window attention on [B, H, W, C], channel attention on [B, N, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "channel_attention", "conv_pos_enc", "mlp"]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype | None):
    """F.linear, or PyTorch's own `dtype` matmul (e.g. bf16) with the result back in x's dtype:
    the twin of the native bf16 projections, for deriving their tolerance."""
    if dtype is None:
        return F.linear(x, w, b)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).to(x.dtype)


def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                     proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, num_heads: int,
                     window_size: int = 7, linear_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Window MHSA on a normalised map ``x`` [B, H, W, C]; returns [B, H, W, C].

    Zero padding (after the norm) to multiples of ``window_size``, no mask: padded tokens
    are keys and values like any other; their query rows are cropped away.
    """
    B, H, W, C = x.shape
    ws, d = window_size, C // num_heads
    pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    # partition: (B, Hp/ws, ws, Wp/ws, ws, C) -> (B * nW, ws * ws, C)
    win = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    qkv = _linear(win, qkv_weight, qkv_bias, linear_dtype).reshape(win.shape[0], ws * ws, 3, num_heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(win.shape[0], ws * ws, C)
    o = _linear(o, proj_weight, proj_bias, linear_dtype)
    # reverse and crop
    o = o.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return o[:, :H, :W, :].contiguous()


def channel_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                      proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                      num_groups: int, linear_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Channel-group attention on normalised tokens ``x`` [B, N, C]; returns [B, N, C].

    Per group g (C_g = C / num_groups channels): A_g = softmax_rows(C_g^-1/2 K_g^T V_g),
    o_g = Q_g A_g^T, then the output projection (the original code's q/k/v roles).
    """
    B, N, C = x.shape
    d = C // num_groups
    qkv = _linear(x, qkv_weight, qkv_bias, linear_dtype).reshape(B, N, 3, num_groups, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((k * d ** -0.5).transpose(-1, -2) @ v).softmax(dim=-1)
    o = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
    return _linear(o.transpose(1, 2).reshape(B, N, C), proj_weight, proj_bias, linear_dtype)


def conv_pos_enc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """ConvPosEnc on [B, H, W, C]: x + depthwise 3x3 conv(x) (zero padding 1, with bias)."""
    xc = x.permute(0, 3, 1, 2)
    return x + F.conv2d(xc, weight, bias, padding=1, groups=x.shape[-1]).permute(0, 2, 3, 1)


def mlp(x: torch.Tensor, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        eps: float = 1e-5, linear_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x + fc2(GELU(fc1(LayerNorm(x)))) over the last axis (exact erf GELU)."""
    z = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = F.gelu(_linear(z, fc1_weight, fc1_bias, linear_dtype))
    return x + _linear(h, fc2_weight, fc2_bias, linear_dtype)
