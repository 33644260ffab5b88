"""DaViT Tiny / Small / Base for inference on the native core, with a PyTorch reference path.

The module tree and parameter names follow timm's ``DaVit`` (``stem.conv``,
``stages.{i}.downsample.{norm,conv}``, ``stages.{i}.blocks.{j}.{0|1}.{cpe1,norm1,attn,cpe2,
norm2,mlp}``, ``head.{norm,fc}``), so a timm state dict loads key for key; the original
Microsoft checkpoint naming is translated first (:func:`load_timm_state_dict`).

Two forward paths over channels-last activations [B, H, W, C]:
- native (CPU, float32, no gradients needed): ConvPosEnc, LayerNorm, both attentions (with
  the residual fused) and the MLP block (LN + fc1 + GELU + fc2 + residual) run in _core;
  the stem / downsample convolutions and the head stay in PyTorch (<5 % of the work).
- reference: the same graph in PyTorch (``reference.py``), used when autograd needs it,
  for other dtypes, and on CUDA (where the attention ops run as CUDA kernels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _core
from . import ops, reference

__all__ = ["DavitConfig", "CONFIGS", "DaViT", "create_model", "load_timm_state_dict"]


@dataclass(frozen=True)
class DavitConfig:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]   # also the number of channel groups
    window_size: int = 7
    mlp_ratio: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    eps: float = 1e-5

    def __post_init__(self) -> None:
        """Refuses what neither path could run, naming the field (instead of an error deep
        in forward, or a native path that disagrees with the reference)."""
        def pos_int(name: str, v: Any, hi: int | None = None) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"DavitConfig.{name} must be an integer in [1, {hi}], got {v!r}" if hi else
                                 f"DavitConfig.{name} must be a positive integer, got {v!r}")
        for name in ("embed_dims", "depths", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not v:
                raise ValueError(f"DavitConfig.{name} must be a non-empty tuple, got {v!r}")
            object.__setattr__(self, name, tuple(v))
            for i, x in enumerate(getattr(self, name)):
                pos_int(f"{name}[{i}]", x)
        if not len(self.embed_dims) == len(self.depths) == len(self.num_heads):
            raise ValueError(f"DavitConfig: embed_dims, depths and num_heads need one entry per stage, got "
                             f"{len(self.embed_dims)}, {len(self.depths)} and {len(self.num_heads)}")
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads or dim // heads > ops.MAX_GROUP:
                raise ValueError(f"DavitConfig: stage {i} has embed_dims {dim} over num_heads {heads}: the heads "
                                 f"(and channel groups) must divide it, into at most {ops.MAX_GROUP} channels")
        pos_int("window_size", self.window_size, ops.MAX_WINDOW)
        for name in ("mlp_ratio", "in_chans", "num_classes"):
            pos_int(name, getattr(self, name))
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"DavitConfig.eps must be a positive number, got {self.eps!r}")


CONFIGS: dict[str, DavitConfig] = {
    "davit_tiny": DavitConfig((96, 192, 384, 768), (1, 1, 3, 1), (3, 6, 12, 24)),
    "davit_small": DavitConfig((96, 192, 384, 768), (1, 1, 9, 1), (3, 6, 12, 24)),
    "davit_base": DavitConfig((128, 256, 512, 1024), (1, 1, 9, 1), (4, 8, 16, 32)),
}


class _ConvPosEnc(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _SubBlock(nn.Module):
    """cpe1 -> x + attn(norm1(x)) -> cpe2 -> x + mlp(norm2(x)); attention 'spatial' or 'channel'."""

    def __init__(self, kind: str, dim: int, heads: int, cfg: DavitConfig):
        super().__init__()
        self.kind, self.heads, self.window_size, self.eps = kind, heads, cfg.window_size, cfg.eps
        self.cpe1 = _ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = _Attention(dim)
        self.cpe2 = _ConvPosEnc(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = _Mlp(dim, cfg.mlp_ratio * dim)

    def _attend(self, z: torch.Tensor) -> torch.Tensor:
        a = self.attn
        w = (a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias)
        fast = z.is_cuda and z.dtype == torch.float32 and not torch.is_grad_enabled()
        if self.kind == "spatial":
            fn = ops.window_attention if fast else reference.window_attention
            return fn(z, *w, self.heads, self.window_size)
        B, H, W, C = z.shape
        fn = ops.channel_attention if fast else reference.channel_attention
        return fn(z.reshape(B, H * W, C), *w, self.heads).view(B, H, W, C)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x = reference.conv_pos_enc(x, self.cpe1.proj.weight, self.cpe1.proj.bias)
        x = x + self._attend(F.layer_norm(x, x.shape[-1:], self.norm1.weight, self.norm1.bias, self.eps))
        x = reference.conv_pos_enc(x, self.cpe2.proj.weight, self.cpe2.proj.bias)
        m = self.mlp
        return reference.mlp(x, self.norm2.weight, self.norm2.bias, m.fc1.weight, m.fc1.bias,
                             m.fc2.weight, m.fc2.bias, self.eps)

    def forward_native(self, x, packed: dict[str, Any]):
        """x: contiguous float32 numpy [B, H, W, C] -> same."""
        x1 = _core.davit_conv_pos_enc(x, *packed["cpe1"])
        z = _core.davit_layer_norm(x1, *packed["norm1"], self.eps)
        att: ops.PackedAttention = packed["attn"]
        if self.kind == "spatial":
            x2 = att.window(z, self.heads, self.window_size, residual=x1)
        else:
            B, H, W, C = z.shape
            x2 = att.channel(z.reshape(B, H * W, C), self.heads,
                             residual=x1.reshape(B, H * W, C)).reshape(B, H, W, C)
        x3 = _core.davit_conv_pos_enc(x2, *packed["cpe2"])
        return _core.davit_mlp(x3, *packed["norm2"], packed["fc1"], packed["fc2"], self.eps)

    def pack(self, precision: str) -> dict[str, Any]:
        def h(t):
            return t.detach().contiguous().numpy()

        bf16 = precision == "bf16"
        m = self.mlp
        return {
            "cpe1": (h(self.cpe1.proj.weight), h(self.cpe1.proj.bias)),
            "norm1": (h(self.norm1.weight), h(self.norm1.bias)),
            "attn": ops.PackedAttention(self.attn.qkv.weight, self.attn.qkv.bias,
                                        self.attn.proj.weight, self.attn.proj.bias, precision),
            "cpe2": (h(self.cpe2.proj.weight), h(self.cpe2.proj.bias)),
            "norm2": (h(self.norm2.weight), h(self.norm2.bias)),
            "fc1": _core.davit_pack_linear(h(m.fc1.weight), h(m.fc1.bias), bf16),
            "fc2": _core.davit_pack_linear(h(m.fc2.weight), h(m.fc2.bias), bf16),
        }


class _Stem(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 7, stride=4, padding=3)
        self.norm = nn.LayerNorm(cout, eps=eps)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """NCHW image -> channels-last [B, H/4, W/4, C] (right/bottom zero pad to multiples of 4)."""
        H, W = img.shape[-2:]
        img = F.pad(img, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
        return self.norm(self.conv(img).permute(0, 2, 3, 1))


class _Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(cin, eps=eps)
        self.conv = nn.Conv2d(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, Cin] -> LayerNorm, zero pad right/bottom to even, conv 2x2/2 -> [B, H/2, W/2, Cout]."""
        H, W = x.shape[1:3]
        x = F.pad(self.norm(x), (0, 0, 0, W % 2, 0, H % 2))
        # A channels-last view: the convolution runs on (and returns) channels-last memory.
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _Stage(nn.Module):
    def __init__(self, i: int, cfg: DavitConfig):
        super().__init__()
        dim, heads = cfg.embed_dims[i], cfg.num_heads[i]
        self.downsample = _Downsample(cfg.embed_dims[i - 1], dim, cfg.eps) if i > 0 else None
        self.blocks = nn.ModuleList(
            nn.ModuleList([_SubBlock("spatial", dim, heads, cfg), _SubBlock("channel", dim, heads, cfg)])
            for _ in range(cfg.depths[i]))


class _Head(nn.Module):
    def __init__(self, dim: int, classes: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(1, 2))))  # pool, then norm (DaViT order)


class DaViT(nn.Module):
    """DaViT classifier. ``forward(img)``: [B, 3, H, W] float image -> [B, num_classes] logits.

    Any H, W (padding everywhere). The native path is taken for CPU inputs when no gradient
    is required (of the parameters or the image); otherwise the PyTorch reference path runs
    (same math). The image must be a float32 tensor [B, in_chans, H, W] with B >= 1.
    """

    def __init__(self, cfg: DavitConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = _Stem(cfg.in_chans, cfg.embed_dims[0], cfg.eps)
        self.stages = nn.ModuleList(_Stage(i, cfg) for i in range(len(cfg.depths)))
        self.head = _Head(cfg.embed_dims[-1], cfg.num_classes, cfg.eps)
        self.precision = "fp32"
        self._packed: list[dict[str, Any]] | None = None
        self._packed_key: tuple | None = None

    def set_precision(self, precision: str) -> "DaViT":
        """Native path precision: "fp32" (default) or "bf16" (the attention projections and
        MLP run with bf16 weights and activations, fp32 sums; everything else fp32)."""
        ops._precision_is_bf16(precision)  # validates the name
        self.precision = precision
        self._packed = None
        return self

    def _needs_grad(self, img: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (img.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _check_image(self, img: Any) -> None:
        if not isinstance(img, torch.Tensor):
            raise ValueError(f"the image must be a torch tensor [B, {self.cfg.in_chans}, H, W], got "
                             f"{type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != self.cfg.in_chans or img.shape[0] == 0 or 0 in img.shape[2:]:
            raise ValueError(f"the image must be [B, {self.cfg.in_chans}, H, W] with B, H, W >= 1, got shape "
                             f"{tuple(img.shape)}")
        if img.dtype != torch.float32:
            raise ValueError(f"the image must be float32 (the weights are), got {img.dtype}: convert it with "
                             f".float()")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self._check_image(img)
        if img.is_cuda or self._needs_grad(img):
            return self.forward_reference(img)
        return self.forward_native(img)

    def forward_reference(self, img: torch.Tensor) -> torch.Tensor:
        self._check_image(img)
        x = self.stem(img)
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for pair in stage.blocks:
                for block in pair:
                    x = block.forward_reference(x)
        return self.head(x)

    @torch.no_grad()
    def forward_native(self, img: torch.Tensor) -> torch.Tensor:
        self._check_image(img)
        if img.is_cuda:
            raise ValueError(f"the native path needs a CPU image, got one on {img.device}")
        packed = self._packed_blocks()
        x = self.stem(img).contiguous().numpy()
        k = 0
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(torch.from_numpy(x)).contiguous().numpy()
            for pair in stage.blocks:
                for block in pair:
                    x = block.forward_native(x, packed[k])
                    k += 1
        return self.head(torch.from_numpy(x))

    def _packed_blocks(self) -> list[dict[str, Any]]:
        # Repack when any parameter was replaced or modified in place since the last pack.
        key = (self.precision,) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._packed is None or key != self._packed_key:
            self._packed = [b.pack(self.precision) for s in self.stages for pair in s.blocks for b in pair]
            self._packed_key = key
        return self._packed


def create_model(name: str = "davit_tiny", **overrides: Any) -> DaViT:
    """A randomly initialised DaViT by name ('davit_tiny', 'davit_small', 'davit_base');
    ``overrides`` replace config fields (e.g. ``num_classes``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown DaViT model {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = DavitConfig(**{**CONFIGS[name].__dict__, **overrides})
    return DaViT(cfg).eval()


def _from_original(key: str) -> str:
    """Microsoft checkpoint key -> timm key (timm's own checkpoint_filter_fn rules)."""
    key = re.sub(r"^patch_embeds\.([0-9]+)", r"stages.\1.downsample", key)
    key = re.sub(r"^main_blocks\.([0-9]+)", r"stages.\1.blocks", key)
    key = key.replace("downsample.proj", "downsample.conv")
    key = key.replace("stages.0.downsample", "stem")
    key = re.sub(r"^head\.", "head.fc.", key)
    key = re.sub(r"^norms\.", "head.norm.", key)
    return key.replace("cpe.0", "cpe1").replace("cpe.1", "cpe2")


def load_timm_state_dict(model: DaViT, state_dict: Mapping[str, Any]) -> DaViT:
    """Load a timm ``davit_*`` state dict (or an original DaViT checkpoint, possibly under
    'state_dict' or 'model') into ``model``. Every key must match in name and shape: a
    missing, unexpected or misshaped tensor raises ValueError naming it. Returns ``model``."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors (read a file with torch.load "
                         f"first, or pass model.state_dict()), got {type(state_dict).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if "stem.conv.weight" not in state_dict:
        state_dict = {_from_original(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} tensor(s), first: {missing[0]!r}")
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} unexpected tensor(s), first: {unexpected[0]!r}")
    converted = {}
    for k, ref in own.items():
        v = state_dict[k]
        try:
            v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        except (TypeError, RuntimeError, ValueError) as e:
            raise ValueError(f"{k!r} is not a tensor or an array of numbers ({type(v).__name__}): {e}") from None
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{k!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        converted[k] = v
    model.load_state_dict(converted, strict=True)
    model._packed = None
    return model
