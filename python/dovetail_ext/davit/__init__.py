"""DaViT (Dual Attention Vision Transformers) on the dovetail_ext native core.

``ops``: window and channel-group attention as native CPU/CUDA ops; ``reference``: their
PyTorch twins; ``model``: DaViT Tiny / Small / Base with a timm state-dict loader.
"""

from __future__ import annotations

from .ops import PackedAttention, channel_attention, get_num_threads, set_num_threads, window_attention

__all__ = ["window_attention", "channel_attention", "PackedAttention", "set_num_threads", "get_num_threads",
           "DaViT", "DavitConfig",
           "CONFIGS", "create_model", "load_timm_state_dict"]


def __getattr__(name: str):
    # The model imports torch; keep `import dovetail_ext.davit` usable with numpy alone.
    if name in ("DaViT", "DavitConfig", "CONFIGS", "create_model", "load_timm_state_dict"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'dovetail_ext.davit' has no attribute {name!r}")
