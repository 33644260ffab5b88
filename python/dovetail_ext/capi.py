"""The C API's files and its weight container.

``get_include()`` / ``get_library()`` locate ``dovetail/dovetail.h`` and ``libdovetail.so``
(installed with the wheel under ``dovetail_ext/include`` and ``dovetail_ext/lib``; in a
source checkout, ``include/`` and a CMake build directory). :func:`export_c_weights` writes
a model's weights into a container that a C program reads without Python or a GGUF
parser (``examples/c/greedy.c`` does).

Weight container, format version 3 (all integers little-endian)::

    offset  size        field
    0       8           magic b"DTWEIGHT"
    8       4           u32 format version (3; version 1 ends its header at 136, without
                            the Gemma 3 fields, which are then all zero; version 2 at 168,
                            with 0 at 164)
    12      4           u32 n_tensors
    16      8           u64 data_offset: start of the tensor data (a multiple of 64)
    24      7 x 8       i64 vocab_size, hidden_size, intermediate_size, num_layers,
                            num_heads, num_kv_heads, head_dim
    80      4           f32 rope_theta
    84      4           f32 rms_norm_eps
    88      8           i64 max_context
    96      4           i32 bos_token_id (-1: none)
    100     4           u32 n_eos (at most 8)
    104     8 x 4       i32 eos_token_ids (the first n_eos are used)
    136     4           i32 activation (dt_activation: silu 0, gelu_tanh 1)
    140     4           i32 scale_embeddings (0 or 1)
    144     8           i64 sliding_window (0: none)
    152     8           i64 sliding_window_pattern
    160     4           f32 rope_theta_local (0: rope_theta)
    164     4           f32 rope_attn_factor (LongRoPE; 0: none)
    168     4           f32 query_pre_attn_scalar (0: head_dim)
    172     4           f32 attn_logit_softcapping (Gemma 2; 0: none)
    176     4           f32 final_logit_softcapping (Gemma 2; 0: none)
    180     4           u32 nope_interval (SmolLM3; 0: none)
    184     ...         tensor table, n_tensors entries, each (version 2: from 168):
                            u32 name_len, name (UTF-8, no terminator),
                            u32 dtype (dt_dtype: f32 0, f16 1, bf16 2, q8_0 3, q4_0 4, q4_1 5),
                            u32 ndim (1 or 2), i64 shape[ndim],
                            u64 offset (from data_offset, a multiple of 64), u64 nbytes
    data_offset ...     tensor data, each tensor 64-byte aligned, zero padding between

Tensors carry the canonical names of :mod:`dovetail_ext.formats.base` in their stored
format (the layout of ``dt_weight`` in ``dovetail.h``); norm vectors are float32. A LongRoPE
model is written with its short factors as ``rope_freqs`` and its original context as
max_context, the contexts those factors serve.

A draft (:func:`export_c_draft`) uses the same container: the header holds the draft's
layer shape (vocab_size is its target's; max_context 0, no bos or eos ids), the tensors
are the ``dt_weight`` draft names with matrices in ``DEFAULT_DRAFT_WEIGHTS`` (q4_1, as
the Python package runs the draft on the CPU) and, for a reduced draft vocabulary, ``vocab_map``: int32 target token
ids with the container-only dtype code 32 (not a ``dt_dtype``: pass it to
``dt_draft_create`` as the vocab_map, not as a weight).

A corpus for corpus lookup (:func:`export_c_corpus`) uses it too: the target's header and
one tensor, ``corpus_tokens``, int32 token ids with the same code 32, for
``dt_speculator_set_corpus``.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any
from pathlib import Path

import numpy as np

__all__ = ["get_include", "get_library", "export_c_weights", "export_c_draft", "target_container", "draft_container",
           "write_container",
           "LIBRARY_ENV", "C_WEIGHTS_MAGIC",
           "C_WEIGHTS_VERSION", "C_DTYPE_CODES", "C_VOCAB_MAP_CODE"]

#: Environment variable naming the shared library to use (overrides every other place).
LIBRARY_ENV = "DOVETAIL_LIBRARY"
C_WEIGHTS_MAGIC = b"DTWEIGHT"
C_WEIGHTS_VERSION = 3
#: Weight dtype name -> ``dt_dtype`` code.
C_DTYPE_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5}
#: The container's code for the draft's int32 ``vocab_map`` (not a ``dt_dtype``).
C_VOCAB_MAP_CODE = 32
_ALIGN = 64
_MAX_EOS = 8
_PACKAGE_DIR = Path(__file__).resolve().parent


def _library_name() -> str:
    if sys.platform == "darwin":
        return "libdovetail.dylib"
    if sys.platform == "win32":
        return "dovetail.dll"
    return "libdovetail.so"


def _package_dirs() -> list[Path]:
    """This package's directory, and the one holding ``_core`` when that differs (an
    editable install keeps the compiled files in site-packages, the sources here)."""
    dirs = [_PACKAGE_DIR]
    import importlib.util
    try:
        spec = importlib.util.find_spec(f"{__package__}._core")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        core_dir = Path(spec.origin).resolve().parent
        if core_dir != _PACKAGE_DIR:
            dirs.append(core_dir)
    return dirs


def _source_root() -> Path | None:
    """The repository root when running from a source checkout (``python/dovetail_ext``)."""
    root = _PACKAGE_DIR.parents[1]
    if (root / "CMakeLists.txt").is_file() and (root / "include" / "dovetail" / "dovetail.h").is_file():
        return root
    return None


def _is_sanitizer_build(build_dir: Path) -> bool:
    # A sanitizer build's library only loads with the sanitizer runtimes preloaded.
    cache = build_dir / "CMakeCache.txt"
    try:
        return "DOVETAIL_SANITIZE:BOOL=ON" in cache.read_text(errors="replace")
    except OSError:
        return False


def get_include() -> Path:
    """Directory to put on the C compiler's include path (``-I``): it holds
    ``dovetail/dovetail.h``.

    Raises:
        FileNotFoundError: neither an installed copy nor a source checkout has the header.
    """
    candidates = [d / "include" for d in _package_dirs()]
    root = _source_root()
    if root is not None:
        candidates.append(root / "include")
    for inc in candidates:
        if (inc / "dovetail" / "dovetail.h").is_file():
            return inc
    raise FileNotFoundError("dovetail/dovetail.h not found (looked in " +
                            ", ".join(str(c) for c in candidates) + "); install the package with pip")


def get_library() -> Path:
    """Path of the C API's shared library (``libdovetail.so`` on Linux).

    Looked for in order: the file named by ``$DOVETAIL_LIBRARY``; ``lib/`` of the installed
    package; in a source checkout, the newest ``build*/`` or ``build/*/`` CMake build
    directory that has it (sanitizer builds are skipped).

    Raises:
        FileNotFoundError: ``$DOVETAIL_LIBRARY`` names no file, or no library was found.
    """
    name = _library_name()
    env = os.environ.get(LIBRARY_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={env} does not name a file")
        return path.resolve()
    for d in _package_dirs():
        if (d / "lib" / name).is_file():
            return d / "lib" / name
    root = _source_root()
    if root is not None:
        built = [p for pattern in (f"build*/{name}", f"build/*/{name}") for p in root.glob(pattern)
                 if p.is_file() and not _is_sanitizer_build(p.parent)]
        if built:
            return max(built, key=lambda p: p.stat().st_mtime)
    hint = (f"build it with `cmake -S {root} -B {root}/build-capi -DDOVETAIL_CUDA=OFF "
            f"-Dpybind11_DIR=$(python -m pybind11 --cmakedir) && cmake --build {root}/build-capi "
            f"--target dovetail`, or " if root else "")
    raise FileNotFoundError(f"{name} not found: install the package with pip, {hint}"
                            f"set {LIBRARY_ENV} to the library's path")


def export_c_weights(out: str | Path, model: str | Path | None = None) -> Path:
    """Write a model's weights and config into the C weight container (see the module doc).

    Args:
        out: the file to write (replaced atomically).
        model: a GGUF file or Hugging Face directory (LLaMA, Qwen2, Qwen3, Gemma 2 and 3, Phi-3, SmolLM3); None for the default model.
    Returns:
        the path written.
    Raises:
        ModelNotFoundError / FileNotFoundError / FormatError: as
            :func:`dovetail_ext.formats.load_model_source`.
        ValueError: the model has more than 8 end-of-sequence ids.
    """
    from .formats import load_model_source

    return write_container(out, *target_container(load_model_source(model)))


def target_container(source: Any) -> tuple[bytes, list[tuple[str, int, tuple[int, ...], np.ndarray]]]:
    """The container contents of a loaded model (:func:`export_c_weights`): the header fields
    after data_offset and the tensors, written by nothing yet."""
    from .quant import dequantize

    cfg = source.config
    eos = list(dict.fromkeys([*cfg.eos_token_ids, *(source.tokenizer.eos_ids if source.tokenizer else ())]))
    if len(eos) > _MAX_EOS:
        raise ValueError(f"the model has {len(eos)} end-of-sequence ids; the container holds at most {_MAX_EOS}")
    tensors: list[tuple[str, int, tuple[int, ...], np.ndarray]] = []
    for name in sorted(source.weights):
        if name == "rope_freqs_long":  # (contexts past rope_long_context; see max_context below)
            continue
        w = source.weights[name]
        if len(w.shape) == 1 and w.dtype != "f32":  # the engine reads norm vectors as float32
            tensors.append((name, C_DTYPE_CODES["f32"], w.shape, np.ascontiguousarray(dequantize(w), dtype=np.float32)))
        else:
            tensors.append((name, C_DTYPE_CODES[w.dtype], w.shape, np.ascontiguousarray(w.data)))
    max_context = min(cfg.max_context, cfg.rope_long_context or cfg.max_context)
    return _fixed_header(cfg.vocab_size, cfg, max_context, -1 if cfg.bos_token_id is None else cfg.bos_token_id,
                         eos), tensors


def export_c_draft(out: str | Path, model: str | Path | None = None, draft: str | Path = "auto") -> Path:
    """Write a draft's weights and layer shape into the C weight container (see the module
    doc), for ``dt_draft_create`` next to the target written by :func:`export_c_weights`.

    Args:
        out: the file to write (replaced atomically).
        model: the draft's target (GGUF file or Hugging Face directory; None: the default model).
        draft: a draft checkpoint directory, or ``"auto"``: the draft shipped for the model.
    Raises:
        FileNotFoundError: no draft ships for the model (with ``"auto"``), or no checkpoint there.
        DraftMismatchError: the draft was trained for another target.
    """
    from .formats import load_model_source

    return write_container(out, *draft_container(load_model_source(model), draft))


def draft_container(source: Any, draft: str | Path = "auto"
                    ) -> tuple[bytes, list[tuple[str, int, tuple[int, ...], np.ndarray]]]:
    """The container contents of a draft for a loaded target (:func:`export_c_draft`)."""
    from .draft import DEFAULT_DRAFT_WEIGHTS
    from .draft_model import TargetSignature, load_draft_weights
    from .errors import DraftMismatchError
    from .models import packaged_draft_for
    from .quant import quantize

    config, weights = load_draft_weights(_given_or_shipped(source, draft, packaged_draft_for, "draft",
                                                           "a checkpoint directory"))
    diff = config.target.differences(TargetSignature.from_source(source))
    if diff:
        raise DraftMismatchError(f"this draft was trained for another target model ({'; '.join(diff)})")
    tensors: list[tuple[str, int, tuple[int, ...], np.ndarray]] = []
    for name in sorted(weights):
        arr = np.asarray(weights[name])
        if name == "vocab_map":
            tensors.append((name, C_VOCAB_MAP_CODE, arr.shape, np.ascontiguousarray(arr, dtype=np.int32)))
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        q = quantize(arr, "f32" if arr.ndim == 1 else DEFAULT_DRAFT_WEIGHTS)
        tensors.append((name, C_DTYPE_CODES[q.dtype], tuple(q.shape), np.ascontiguousarray(q.data)))
    return _fixed_header(source.config.vocab_size, config, 0, -1, []), tensors


def export_c_corpus(out: str | Path, model: str | Path | None = None, corpus: str | Path = "auto") -> Path:
    """Write a token corpus (:class:`dovetail_ext.lookup.TokenCorpus` file) into the C
    weight container (see the module doc), for ``dt_speculator_set_corpus``.

    Args:
        out: the file to write (replaced atomically).
        model: the corpus's target (GGUF file or Hugging Face directory; None: the default model).
        corpus: a corpus file, or ``"auto"``: the corpus shipped for the model.
    Raises:
        FileNotFoundError: no corpus ships for the model (with ``"auto"``), or no such file.
        FormatError: not a corpus file.
        ValueError: the corpus was made for another target.
    """
    from .formats import load_model_source

    return write_container(out, *corpus_container(load_model_source(model), corpus))


def corpus_container(source: Any, corpus: str | Path = "auto"
                     ) -> tuple[bytes, list[tuple[str, int, tuple[int, ...], np.ndarray]]]:
    """The container contents of a corpus for a loaded target (:func:`export_c_corpus`)."""
    from .lookup import TokenCorpus
    from .models import packaged_corpus_for

    tc = TokenCorpus.load(_given_or_shipped(source, corpus, packaged_corpus_for, "corpus", "a corpus file"))
    tc.check_target(source)
    tokens = np.ascontiguousarray(tc.tokens, dtype=np.int32)
    return _fixed_header(source.config.vocab_size, source.config, 0, -1, []), \
        [("corpus_tokens", C_VOCAB_MAP_CODE, tokens.shape, tokens)]


def _given_or_shipped(source: Any, given: str | Path, shipped_for, what: str, hint: str) -> str | Path:
    """``given``, or with ``"auto"`` the file ``shipped_for(source)`` finds; FileNotFoundError
    naming ``what`` when nothing ships for the model."""
    path = shipped_for(source) if str(given) == "auto" else given
    if not path:
        raise FileNotFoundError(f"no {what} ships for {source.name or source.path}; pass {hint}")
    return path


def _fixed_header(vocab_size: int, shape, max_context: int, bos: int, eos: list[int]) -> bytes:
    """The header fields after data_offset; ``shape`` has the layer fields of a model or
    draft config (a draft has none of the Gemma or LongRoPE fields: zeros)."""
    gelu = getattr(shape, "activation", "silu") == "gelu_tanh"
    return struct.pack("<7qffqiI8i", vocab_size, shape.hidden_size, shape.intermediate_size, shape.num_layers,
                       shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rope_theta, shape.rms_norm_eps,
                       max_context, bos, len(eos), *(list(eos) + [0] * (_MAX_EOS - len(eos)))) + \
        struct.pack("<iiqqff", int(gelu), int(getattr(shape, "scale_embeddings", False)),
                    getattr(shape, "sliding_window", 0), getattr(shape, "sliding_window_pattern", 0),
                    getattr(shape, "rope_theta_local", 0.0), float(getattr(shape, "rope_attn_factor", 0.0))) + \
        struct.pack("<fffI", *(float(getattr(shape, k, 0.0)) for k in ("query_pre_attn_scalar", "attn_logit_softcapping",
                                                                      "final_logit_softcapping")),
                    int(getattr(shape, "nope_interval", 0)))


def write_container(out: str | Path, fixed: bytes, tensors: list[tuple[str, int, tuple[int, ...], np.ndarray]]
                    ) -> Path:
    """Write a container (:func:`target_container` / :func:`draft_container` give its parts)
    to ``out`` through a temporary file, replaced atomically; a failed write leaves nothing."""
    table = bytearray()
    offset = 0
    offsets = []
    for name, code, shape, data in tensors:
        encoded = name.encode()
        table += struct.pack("<I", len(encoded)) + encoded
        table += struct.pack("<II", code, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
        table += struct.pack("<QQ", offset, data.nbytes)
        offsets.append(offset)
        offset = _aligned(offset + data.nbytes)
    header = struct.pack("<8sII", C_WEIGHTS_MAGIC, C_WEIGHTS_VERSION, len(tensors))
    data_offset = _aligned(len(header) + 8 + len(fixed) + len(table))

    out = Path(out)
    if not out.name or out.is_dir():
        raise ValueError(f"{out}: not a file name to write the container to")
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header + struct.pack("<Q", data_offset) + fixed + table)
            for (_, _, _, data), start in zip(tensors, offsets):
                f.write(b"\0" * (data_offset + start - f.tell()))
                f.write(data.reshape(-1).view(np.uint8).data)
        os.replace(tmp, out)
    except BaseException as e:  # (a full disk, a size limit, an interrupt: no half-written file stays)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (there was none: its directory cannot be)
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
