"""Model file formats: GGUF files and Hugging Face checkpoint directories.

:func:`load_model_source` picks the loader from what the path is: a directory is a
Hugging Face checkpoint, a file starting with the GGUF magic is a GGUF model, ``None`` is
the default model (:func:`dovetail_ext.models.default_model_path`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from .base import QUANT_BLOCK, WEIGHT_DTYPES, ModelSource, Weight, expected_weight_shapes, row_nbytes
from .gguf import GGUF_MAGIC, load_gguf
from .hf import HF_WEIGHT_CHOICES, load_hf
from .tokenizer import StreamDecoder, Tokenizer, tokenizer_from_gguf_vocab, tokenizer_from_hf_directory

__all__ = ["load_model_source", "load_gguf", "load_hf", "HF_WEIGHT_CHOICES", "ModelSource", "Weight",
           "WEIGHT_DTYPES", "QUANT_BLOCK", "expected_weight_shapes", "row_nbytes", "Tokenizer",
           "StreamDecoder", "tokenizer_from_gguf_vocab", "tokenizer_from_hf_directory"]


def load_model_source(path: str | Path | None = None, weights: str = "auto") -> ModelSource:
    """Loads a model from a GGUF file, a Hugging Face directory, or the default model.

    Args:
        path: a ``.gguf`` file, a checkpoint directory (or its ``config.json``), or None for
            the default model.
        weights: storage of the matrices for Hugging Face checkpoints (see
            :func:`load_hf`). GGUF weights are used as stored, so only ``"auto"`` applies.

    Raises:
        ModelNotFoundError: ``path`` is None and the default model is not installed.
        FileNotFoundError: ``path`` does not exist.
        FormatError: a file that is neither GGUF nor part of a checkpoint, or a bad file.
        ValueError: ``weights`` other than ``"auto"`` for a GGUF file.
    """
    if path is None:
        from ..models import default_model_path
        path = default_model_path()
    path = Path(path)
    if path.is_dir():
        return load_hf(path, weights=weights)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    if path.name == "config.json":
        return load_hf(path.parent, weights=weights)
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic == GGUF_MAGIC:
        if weights != "auto":
            raise ValueError(f"weights={weights!r}: a GGUF model is used as stored; only 'auto' applies")
        return load_gguf(path)
    raise FormatError(f"{path}: not a GGUF file (magic {magic!r}) and not a Hugging Face checkpoint "
                      f"directory")
