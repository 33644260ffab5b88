"""dovetail-ext: Dovetail speculative decoding and DaViT attention ops with a native core.

Heavy submodules are imported on first use so that ``import dovetail_ext`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import DraftMismatchError, FormatError, ModelNotFoundError

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Generator", "GenerationStats", "TokenLogprob", "ChatSession", "Grammar",
           "LlamaConfig", "FormatError", "ModelNotFoundError", "DraftMismatchError", "get_include", "get_library"]

_LAZY = {"load": "api", "Generator": "api", "GenerationStats": "api", "TokenLogprob": "api", "ChatSession": "chat",
         "Grammar": "grammar", "LlamaConfig": "config", "get_include": "capi", "get_library": "capi"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dovetail_ext' has no attribute {name!r}")

