"""GGUF loader: a llama.cpp model file -> :class:`ModelSource`, weights kept as stored.

What it is: config from the ``llama.*``, ``qwen2.*``, ``qwen3.*``, ``gemma2.*``, ``gemma3.*``,
``phi3.*`` or ``smollm3.*`` metadata (Qwen2 is LLaMA with a bias on the q / k / v projections, Qwen3 with an
RMSNorm on every q / k head instead, Gemma 2 and 3 see ``config.LlamaConfig``, Phi-3 LLaMA with fused
``attn_qkv`` and gate|up ``ffn_up`` matrices; LLaMA 3.1+ files carry
``rope_freqs``, the divisors of the RoPE frequencies, and linear RoPE scaling becomes the
same divisors), every tensor the engine executes (F32, F16, BF16,
Q8_0, Q4_0, Q4_1) as a zero-copy view of the file's memory map, the tokenizer and chat
template from the ``tokenizer.*`` metadata. Copies are made only of ``attn_q`` /
``attn_k`` of ``llama`` files (whose rows are reordered, see below), of 1-D weights
stored in another type than F32 (made F32, as the engine expects), and of matrices in
other ggml types (K-quants, Q5_0...), which ``formats.convert`` rewrites into the
engine's block types (``ModelSource.metadata["converted"]`` counts them).

GGUF writes shapes fastest-varying first (``ne0`` = columns); here shapes are PyTorch's
``[rows, cols]``. Quantized data is ``uint8 [rows, row_nbytes]``; BF16 is ``uint16``.

llama.cpp's LLaMA RoPE rotates interleaved pairs (x0, x1), (x2, x3)... so its converter
permuted the rows of ``attn_q`` / ``attn_k`` within each head (not for Qwen2 / Qwen3, whose RoPE
is rotate-half in llama.cpp too). The loader undoes it to give the
rotate-half layout of Hugging Face LLaMA (pairs (x_i, x_{i + Dh/2})); whole rows move, so
this works on quantized row bytes unchanged.

The header is parsed here rather than by ``gguf.GGUFReader``, which walks metadata arrays
element by element through numpy views trusting the counts (10 s for a 150k-token
vocabulary, minutes or a read past the end for a corrupted count). Every count and offset
is bounded by the file size before use, numeric arrays stay in the file until asked for,
and every problem surfaces as :class:`FormatError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ARCHITECTURES, LlamaConfig
from ..errors import FormatError
from .base import ModelSource, Weight, stored_tensors_per_layer, stored_weight_shapes, unfuse
from .tokenizer import GEMMA_TEMPLATE, tokenizer_from_gguf_vocab

__all__ = ["load_gguf", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types -> byte size of a scalar (8 = string, 9 = array).
_STRING, _ARRAY = 8, 9
# Longest metadata array accepted: real vocabularies and merge lists stay far below.
_MAX_ARRAY = 1 << 22
_MAX_DIMS = 4


def _ggml_types() -> dict[Any, str]:
    from gguf import GGMLQuantizationType as Q
    return {Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16", Q.Q8_0: "q8_0", Q.Q4_0: "q4_0",
            Q.Q4_1: "q4_1"}


@dataclass
class _Array:
    """A metadata array: numbers stay in the file until asked for; strings as bytes."""

    itype: int
    count: int
    offset: int = 0                      # numbers: where they start
    strings: list[bytes] | None = None   # strings: each one (nested arrays: None)


@dataclass
class _TensorInfo:
    name: str
    tensor_type: Any       # gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: ne0 (columns) first
    offset: int            # from the start of the data section
    nbytes: int
    data: np.ndarray | None = None  # typed [..., cols] for float / int types, else uint8 [..., row bytes]


# GGUF metadata scalar types -> struct format (also a numpy dtype), and its size.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_SIZE = {k: struct.calcsize(f) for k, f in _SCALAR_FMT.items()}


class _HeaderScan:
    """Reads a GGUF header with bounds checks; raises FormatError on the first problem.

    Collects the metadata (``fields``: key -> (value type, value)) and the tensor table
    (``tensors``), every count and offset checked against the file size before use.
    """

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.size = path, buf, len(buf)
        self.fields: dict[str, tuple[int, Any]] = {}
        self.tensors: list[_TensorInfo] = []
        self.data_start = 0

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.path}: {problem}")

    def read(self, fmt: str, off: int, what: str) -> tuple[Any, int]:
        n = struct.calcsize(fmt)
        if off + n > self.size:
            raise self.fail(f"file is truncated: it ends at byte {self.size} inside {what} "
                            f"(needs {off + n})")
        return struct.unpack_from(fmt, self.buf, off)[0], off + n

    def string(self, off: int, what: str) -> tuple[bytes, int]:
        n, off = self.read("<Q", off, what)
        if off + n > self.size:
            raise self.fail(f"file is truncated: {what} claims {n} bytes at offset {off}, "
                            f"the file has {self.size}")
        return bytes(self.buf[off:off + n]), off + n

    def value(self, off: int, vtype: int, what: str, depth: int = 0) -> tuple[Any, int]:
        """One metadata value: a scalar, bytes for a string, an :class:`_Array`."""
        if vtype in _SCALAR_FMT:
            return self.read(_SCALAR_FMT[vtype], off, what)
        if vtype == _STRING:
            return self.string(off, what)
        if vtype != _ARRAY or depth > 1:
            raise self.fail(f"{what} has unknown value type {vtype}")
        itype, off = self.read("<I", off, what)
        count, off = self.read("<Q", off, what)
        if count > _MAX_ARRAY:
            raise self.fail(f"{what} claims {count} array elements (limit {_MAX_ARRAY})")
        if itype in _SCALAR_SIZE:
            end = off + count * _SCALAR_SIZE[itype]
            if end > self.size:
                raise self.fail(f"file is truncated: {what} needs bytes up to {end}, the file has {self.size}")
            return _Array(itype, count, offset=off), end
        if count * 8 > self.size - off:  # every string or array element takes >= 8 bytes
            raise self.fail(f"file is truncated: {what} claims {count} elements, more than the file holds")
        items = []
        for _ in range(count):
            item, off = self.value(off, itype, what, depth + 1)
            items.append(item)
        return _Array(itype, count, strings=items if itype == _STRING else None), off

    def run(self) -> None:
        magic = bytes(self.buf[:4])
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        version, off = self.read("<I", 4, "the header")
        if version & 0xFFFF == 0:
            raise self.fail("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise self.fail(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, off = self.read("<Q", off, "the header")
        n_kv, off = self.read("<Q", off, "the header")
        # Each entry takes at least 13 (metadata) / 24 (tensor info) bytes.
        if n_kv * 13 + n_tensors * 24 > self.size:
            raise self.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, "
                            f"more than a {self.size}-byte file can hold")
        alignment = 32
        for k in range(n_kv):
            key, off = self.string(off, f"metadata key #{k}")
            name = key.decode("utf-8", "replace")
            vtype, off = self.read("<I", off, f"metadata {name}")
            value, off = self.value(off, vtype, f"metadata {name}")
            if name in self.fields:
                raise self.fail(f"metadata key {name} appears twice")
            self.fields[name] = (vtype, value)
            if name == "general.alignment":
                if vtype != 4 or value == 0 or value & (value - 1):
                    raise self.fail(f"general.alignment must be a power of two uint32, got {value!r}")
                alignment = value
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        names = set()
        for k in range(n_tensors):
            raw_name, off = self.string(off, f"tensor info #{k}")
            name = raw_name.decode("utf-8", "replace")
            n_dims, off = self.read("<I", off, f"tensor info of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self.fail(f"tensor {name} has {n_dims} dimensions")
            dims = []
            for _ in range(n_dims):
                d, off = self.read("<Q", off, f"tensor info of {name}")
                dims.append(d)
            raw_type, off = self.read("<I", off, f"tensor info of {name}")
            data_off, off = self.read("<Q", off, f"tensor info of {name}")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise self.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
            n_elems = int(np.prod(dims, dtype=object))
            block, type_size = GGML_QUANT_SIZES[qtype]
            if n_elems <= 0 or n_elems > self.size * 8 or dims[0] % block:
                raise self.fail(f"tensor {name} has invalid shape {dims} for type {qtype.name}")
            if name in names:
                raise self.fail(f"tensor {name} appears twice")
            names.add(name)
            self.tensors.append(_TensorInfo(name, qtype, tuple(dims), data_off, n_elems // block * type_size))
        self.data_start = -(-off // alignment) * alignment
        for t in self.tensors:
            end = self.data_start + t.offset + t.nbytes
            if end > self.size:
                raise self.fail(f"file is truncated: tensor {t.name} needs bytes up to {end}, "
                                f"the file has {self.size}")


# ggml types whose tensors are read as typed arrays; every other type as uint8 row bytes.
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class _Reader:
    """A GGUF file: ``fields`` and ``tensors`` from :class:`_HeaderScan`, each tensor's
    ``data`` a read-only view of the file's memory map."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        if path.stat().st_size < 24:
            raise FormatError(f"{path}: file is truncated ({path.stat().st_size} bytes; a GGUF header "
                              f"alone takes 24)")
        from gguf import GGML_QUANT_SIZES
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        scan = _HeaderScan(path, memoryview(mm))
        scan.run()
        self.fields, self.tensors, self.buf = scan.fields, scan.tensors, scan.buf
        for t in self.tensors:
            start = scan.data_start + t.offset
            raw = np.ndarray((t.nbytes,), np.uint8, buffer=mm, offset=start)
            dims = list(reversed(t.dims))
            typed = _TYPED.get(t.tensor_type.name)
            if typed is not None:
                t.data = raw.view(typed).reshape(dims)
            else:
                block, type_size = GGML_QUANT_SIZES[t.tensor_type]
                t.data = raw.reshape(dims[:-1] + [dims[-1] // block * type_size])


class _Metadata:
    """Typed access to GGUF key/value fields, naming the key and file on a problem."""

    def __init__(self, reader: _Reader, path: Path) -> None:
        self.fields, self.buf, self.path = reader.fields, reader.buf, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        field = self.fields.get(key)
        if field is None:
            if required:
                raise FormatError(f"{self.path}: metadata key {key} is missing")
            return default
        value = self._contents(key, field)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise FormatError(f"{self.path}: metadata {key} = {value!r} has the wrong type "
                              f"(expected {getattr(kind, '__name__', kind)})")
        return value

    def _contents(self, key: str, field: tuple[int, Any]) -> Any:
        _, value = field
        try:  # strings are decoded only here
            if isinstance(value, bytes):
                return value.decode("utf-8")
            if isinstance(value, _Array):
                if value.itype in _SCALAR_FMT:
                    return np.frombuffer(self.buf, dtype=_SCALAR_FMT[value.itype], count=value.count,
                                         offset=value.offset).tolist()
                return [v.decode("utf-8") for v in value.strings] if value.strings is not None else None
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: metadata {key} holds a string that is not UTF-8: {e}") from e
        return value

    def scalars(self) -> dict[str, Any]:
        """Every non-array field, for ``ModelSource.metadata``."""
        return {key: self._contents(key, field) for key, field in self.fields.items()
                if field[0] != _ARRAY and key != "tokenizer.chat_template"}


def _f32_decimal(value: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(value)))


def _config(meta: _Metadata, vocab_size: int, tied: bool, rope_freqs: bool,
            end_of_turn: int | None = None, longrope: bool = False) -> LlamaConfig:
    arch = meta.get("general.architecture", str, required=True)
    if arch not in ARCHITECTURES:
        raise FormatError(f"{meta.path}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(map(repr, ARCHITECTURES))})")
    a = arch + "."
    rope_scaling = meta.get(a + "rope.scaling.type", str, "none")
    if rope_scaling not in ("none", "", "linear") and not (longrope and rope_scaling in ("longrope", "su")):
        raise FormatError(f"{meta.path}: RoPE scaling {rope_scaling!r} is not supported")
    if rope_scaling == "linear" and rope_freqs:
        raise FormatError(f"{meta.path}: both linear RoPE scaling and a rope_freqs tensor")
    extra: dict = {}  # the LlamaConfig fields of one family
    # (phi3.attention.sliding_window is left out, as llama.cpp leaves it out for Phi-3 files)
    if arch == "smollm3":  # every fourth layer without RoPE, as llama.cpp runs the files (they do not say)
        extra = dict(nope_interval=4)
    if longrope:  # Phi-3 LongRoPE: short and long factors (rope_factors_short / _long), the first for
        # contexts up to the original one, as llama.cpp chooses, and an attention factor on cos and sin
        limit = meta.get(a + "rope.scaling.original_context_length", int)
        if not limit or limit < 1:
            raise FormatError(f"{meta.path}: LongRoPE factors without {a}rope.scaling.original_context_length")
        extra = dict(rope_attn_factor=_f32_decimal(meta.get(a + "rope.scaling.attn_factor", (float, int), 1.0)),
                     rope_long_context=limit)
    if arch == "gemma3":
        # As llama.cpp runs Gemma 3: every 6th layer global, the others local with RoPE base
        # 10000 (the 27B model's attention scale: below).
        extra = dict(sliding_window=meta.get(a + "attention.sliding_window", int, 0), sliding_window_pattern=6,
                     rope_theta_local=10000.0)
    if arch == "gemma2":
        # As llama.cpp runs Gemma 2: even layers local (pattern 2) with the one RoPE base, the
        # scores and logits soft-capped (50 and 30 where the file leaves them out).
        extra = dict(sliding_window=meta.get(a + "attention.sliding_window", int, 0), sliding_window_pattern=2,
                     attn_logit_softcapping=_f32_decimal(meta.get(a + "attn_logit_softcapping", (float, int), 50.0)),
                     final_logit_softcapping=_f32_decimal(meta.get(a + "final_logit_softcapping", (float, int), 30.0)))
    if meta.get(a + "expert_count", int, 0):
        raise FormatError(f"{meta.path}: mixture-of-experts models are not supported")
    hidden = meta.get(a + "embedding_length", int, required=True)
    n_head = meta.get(a + "attention.head_count", int, required=True)
    n_kv = meta.get(a + "attention.head_count_kv", int, n_head)
    head_dim = meta.get(a + "attention.key_length", int, 0)
    if meta.get(a + "attention.value_length", int, head_dim) != head_dim:
        raise FormatError(f"{meta.path}: different key and value head sizes are not supported")
    # The 27B models (Gemma 2: 46 layers, Gemma 3: 62) scale their scores by
    # 1/sqrt(hidden / heads), not 1/sqrt(head_dim), as llama.cpp knows them by their layer
    # count: the files do not store it.
    if (arch, meta.get(a + "block_count", int, 0)) in (("gemma2", 46), ("gemma3", 62)) and \
            hidden // max(n_head, 1) != (head_dim or hidden // max(n_head, 1)):
        extra["query_pre_attn_scalar"] = float(hidden // n_head)
    rot = meta.get(a + "rope.dimension_count", int, 0)
    if rot and rot != (head_dim or hidden // max(n_head, 1)):
        raise FormatError(f"{meta.path}: partial rotary embeddings ({a}rope.dimension_count = "
                          f"{rot}) are not supported")
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        t = meta.get(key, int)
        if t is not None and t not in eos:
            eos.append(t)
    if arch in ("gemma2", "gemma3") and end_of_turn is not None and end_of_turn not in eos:
        eos.append(end_of_turn)  # (a turn's end, which llama.cpp also stops at)
    try:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=meta.get(a + "feed_forward_length", int, required=True),
            num_layers=meta.get(a + "block_count", int, required=True),
            num_heads=n_head,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rope_theta=_f32_decimal(meta.get(a + "rope.freq_base", (float, int), 10000.0)),
            rms_norm_eps=_f32_decimal(meta.get(a + "attention.layer_norm_rms_epsilon", (float, int), 1e-5)),
            max_context=meta.get(a + "context_length", int, 2048),
            tie_word_embeddings=tied,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id", int),
            eos_token_ids=tuple(eos),
            architecture=arch,
            **ARCHITECTURES[arch],
            **extra,
            rope_freq_factors=rope_freqs or rope_scaling == "linear",
        )
    except ValueError as e:
        raise FormatError(f"{meta.path}: {e}") from e


def _unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row interleave: ``[n_head*Dh, X]`` rows -> rotate-half order.

    Within a head, GGUF row ``2i + j`` holds Hugging Face row ``i + j * Dh/2``. ``X`` may be
    columns or quantized row bytes: rows move whole.
    """
    rows = data.shape[0]
    return np.ascontiguousarray(
        data.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(data.shape))


def _to_f32(data: np.ndarray, qtype: Any) -> np.ndarray:
    """A small tensor (a norm or a bias) as float32, from any stored type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float32)
    return quants.dequantize(data, qtype).astype(np.float32)


def _linear_rope_factors(meta: _Metadata, cfg: LlamaConfig) -> dict[str, Weight]:
    """Linear RoPE scaling (positions divided by ``rope.scaling.factor``) as the divisors of
    every frequency: the ``rope_freqs`` weight the engine applies (on Gemma 3's global
    layers only, as its local ones rotate unscaled)."""
    a = cfg.architecture + "."
    if meta.get(a + "rope.scaling.type", str, "none") != "linear":
        return {}
    factor = meta.get(a + "rope.scaling.factor", (float, int), required=True)
    if not factor > 0:
        raise FormatError(f"{meta.path}: {a}rope.scaling.factor = {factor!r} must be positive")
    return {"rope_freqs": Weight("f32", (cfg.head_dim // 2,), np.full(cfg.head_dim // 2, factor, np.float32))}


def _weights(reader: _Reader, cfg: LlamaConfig, path: Path,
             weights: dict[str, Weight]) -> tuple[dict[str, Weight], dict[str, int]]:
    from .convert import convert_blocks, convertible_types
    types = _ggml_types()
    convertible = convertible_types()
    expected = stored_weight_shapes(cfg)
    converted: dict[str, int] = {}
    for t in reader.tensors:
        name = t.name[:-len(".weight")] if t.name.endswith(".weight") else t.name
        if cfg.architecture == "phi3" and name.endswith(".ffn_up"):
            name = name[:-len("ffn_up")] + "ffn_gate_up"  # (Phi-3's gate and up, one matrix)
        if cfg.architecture == "phi3" and name.startswith("rope_factors_"):  # LongRoPE's
            name = {"rope_factors_short": "rope_freqs", "rope_factors_long": "rope_freqs_long"}.get(name, name)
        if name not in expected:
            raise FormatError(f"{path}: unexpected tensor {t.name} (not part of a plain "
                              f"{cfg.architecture} model)")
        if t.tensor_type not in types and t.tensor_type.name not in convertible:
            raise FormatError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which is not "
                              f"supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, and "
                              f"{', '.join(sorted(convertible))} converted at load)")
        shape = tuple(int(d) for d in reversed(t.dims))
        if shape != expected[name]:
            raise FormatError(f"{path}: tensor {t.name} has shape {list(shape)}, expected "
                              f"{list(expected[name])}")
        # The reader's views are [rows, cols] for F32/F16, [rows, row bytes] uint8 otherwise.
        data = t.data
        if len(shape) == 1:
            data, dtype = _to_f32(data, t.tensor_type).reshape(shape), "f32"
        elif t.tensor_type in types:
            dtype = types[t.tensor_type]
            if dtype == "bf16":
                data = data.view(np.uint16)
        else:
            try:
                dtype, data = convert_blocks(data, t.tensor_type, shape[-1])
            except ValueError as e:
                raise FormatError(f"{path}: tensor {t.name}: {e}") from e
            key = f"{t.tensor_type.name.lower()}->{dtype}"
            converted[key] = converted.get(key, 0) + 1
        if cfg.architecture in ("llama", "smollm3") and name.endswith(".attn_q"):
            data = _unpermute_rows(data, cfg.num_heads)
        elif cfg.architecture in ("llama", "smollm3") and name.endswith(".attn_k"):
            data = _unpermute_rows(data, cfg.num_kv_heads)
        try:
            weights[name] = Weight(dtype, shape, data)
        except ValueError as e:
            raise FormatError(f"{path}: tensor {t.name}: {e}") from e
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FormatError(f"{path}: missing tensors "
                          f"{', '.join(n if n.endswith('.bias') else n + '.weight' for n in missing[:5])}{more}")
    unfuse(weights, cfg)
    return weights, converted


def load_gguf(path: str | Path) -> ModelSource:
    """Loads a LLaMA-, Qwen2-, Qwen3-, Gemma 2-, Gemma 3-, Phi-3- or SmolLM3-architecture GGUF file (Phi-3's
    fused matrices split into views of the file; LongRoPE files refused).

    Returns:
        ModelSource with ``weights`` under the canonical names of ``formats.base``:
        matrices as stored (``f32``/``f16``/``bf16``/``q8_0``/``q4_0``/``q4_1``, read-only
        views of the file except the re-ordered ``attn_q``/``attn_k`` of LLaMA files),
        other ggml types converted (``formats.convert``), norms and biases as ``f32``;
        ``config.tie_word_embeddings`` is True when the file has no ``output.weight``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FormatError: not GGUF, truncated or corrupt, another architecture, a tensor of an
            unsupported type, a missing tensor or one of the wrong shape.
    """
    path = Path(path)
    reader = _Reader(path)
    meta = _Metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise FormatError(f"{path}: missing tensor token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens", list, required=True)
    vocab_size = int(embd.dims[1]) if len(embd.dims) == 2 else len(tokens)
    if len(tokens) > vocab_size:
        raise FormatError(f"{path}: {len(tokens)} tokens but token_embd.weight has {vocab_size} rows")

    longrope = "rope_factors_short.weight" in tensors or "rope_factors_long.weight" in tensors
    cfg = _config(meta, vocab_size, tied="output.weight" not in tensors,
                  rope_freqs="rope_freqs.weight" in tensors or longrope,
                  end_of_turn=tokens.index("<end_of_turn>") if "<end_of_turn>" in tokens else None, longrope=longrope)
    per_layer = stored_tensors_per_layer(cfg)
    if cfg.num_layers * per_layer > len(tensors):  # before stored_weight_shapes() builds the names per layer
        raise FormatError(f"{path}: {cfg.architecture}.block_count = {cfg.num_layers} needs "
                          f"{cfg.num_layers * per_layer} layer tensors, the file has {len(tensors)} tensors")
    weights, converted = _weights(reader, cfg, path, _linear_rope_factors(meta, cfg))

    chat_template = meta.get("tokenizer.chat_template", str)
    if chat_template is None and cfg.architecture in ("gemma2", "gemma3"):
        chat_template = GEMMA_TEMPLATE  # (as llama.cpp, which recognizes Gemma files without one)
    tokenizer = tokenizer_from_gguf_vocab(
        model=meta.get("tokenizer.ggml.model", str, required=True),
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type", list),
        merges=meta.get("tokenizer.ggml.merges", list),
        scores=meta.get("tokenizer.ggml.scores", list),
        pre=meta.get("tokenizer.ggml.pre", str),
        bos_id=cfg.bos_token_id,
        eos_ids=cfg.eos_token_ids,
        add_bos=meta.get("tokenizer.ggml.add_bos_token", bool),
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", bool),
        chat_template=chat_template,
        source=str(path),
        unk_id=meta.get("tokenizer.ggml.unknown_token_id", int),
    )
    return ModelSource(config=cfg, weights=weights, tokenizer=tokenizer, chat_template=chat_template,
                       name=meta.get("general.name", str, path.stem), path=str(path),
                       metadata={"format": "gguf", **meta.scalars(),
                                 **({"converted": converted} if converted else {})})
