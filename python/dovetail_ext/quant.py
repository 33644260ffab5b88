"""Weight storage formats in numpy: decode, encode, and the engine's activation quantizer.

What it is: the numeric definition of every weight dtype the native engine executes
(``WEIGHT_DTYPES`` in ``formats/base.py``) and of the int8 quantization the engine applies
to activations before an integer dot product. What it is not: fast, or a file reader.
No torch here, so loaders can use it without torch installed.

Block layouts (GGUF, 32 values per block; ``d`` and ``m`` are float16)::

    q8_0  | d | 32 x int8 q          |  value = q * d
    q4_0  | d | 16 bytes of nibbles  |  value = (q - 8) * d
    q4_1  | d | m | 16 bytes nibbles |  value = q * d + m

Byte ``i`` of the nibbles holds element ``i`` in its low 4 bits and element ``16 + i`` in
its high 4 bits.

Legend: R rows, C columns, B = C / 32 blocks per row, T activation rows, K reduction size.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .formats.base import QUANT_BLOCK, WEIGHT_DTYPES, Weight

__all__ = ["dequantize", "quantize", "unpack_blocks", "quantize_activations_q8", "round_bf16", "QK"]

#: Values per quantization block (weights and activations alike).
QK = 32

_GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_1": GGMLQuantizationType.Q4_1}


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 stored at byte ``offset`` of each block, as float32. blocks: uint8 [..., nbytes]."""
    raw = np.ascontiguousarray(blocks[..., offset:offset + 2])
    return raw.view(np.float16)[..., 0].astype(np.float32)


def unpack_blocks(w: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a quantized weight into the terms the integer dot-product kernels use.

    Every element is ``value = d * code + c`` (exact in real arithmetic), with an
    *unsigned* code so that it can feed an unsigned-by-signed int8 dot product:

    ============  ===================  ===============
    dtype         code                 c
    ============  ===================  ===============
    ``q8_0``      stored int8 + 128    ``-128 * d``
    ``q4_0``      nibble 0..15         ``-8 * d``
    ``q4_1``      nibble 0..15         ``m``
    ============  ===================  ===============

    Args:
        w: a weight of dtype q8_0, q4_0 or q4_1 with shape [..., C]; R = prod(shape[:-1]).
    Returns:
        codes uint8 [R, B, 32], d float32 [R, B], c float32 [R, B].
    """
    if w.dtype not in QUANT_BLOCK:
        raise ValueError(f"unpack_blocks needs a quantized weight ({', '.join(QUANT_BLOCK)}), "
                         f"got {w.dtype!r}")
    per_block, nbytes = QUANT_BLOCK[w.dtype]
    rows, nb = _rows(w.shape), w.shape[-1] // per_block
    blocks = np.asarray(w.data).reshape(rows, nb, nbytes)
    d = _f16_field(blocks, 0)
    if w.dtype == "q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        c = np.float32(-128) * d  # a power of two times d: exact
    else:
        nibbles = blocks[..., 4:] if w.dtype == "q4_1" else blocks[..., 2:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # elements 0..15, 16..31
        c = _f16_field(blocks, 2) if w.dtype == "q4_1" else np.float32(-8) * d
    return codes, d, c


def dequantize(w: Weight) -> np.ndarray:
    """Decode a weight to float32.

    Quantized values are the exact ``d * code + c`` rounded once to float32 (so they equal
    ``gguf.quants.dequantize`` bit for bit). bf16 is stored as uint16 bit patterns: the
    float32 with those 16 high bits.

    Args:
        w: a weight of any dtype in ``WEIGHT_DTYPES``.
    Returns:
        float32 array of shape ``w.shape``, freshly allocated (never a view of ``w.data``).
    """
    if w.dtype == "f32":
        out = np.array(w.data, dtype=np.float32, copy=True)
    elif w.dtype == "f16":
        out = np.asarray(w.data, dtype=np.float16).astype(np.float32)
    elif w.dtype == "bf16":
        bits = np.asarray(w.data).view(np.uint16).astype(np.uint32) << 16
        out = bits.view(np.float32)
    else:
        codes, d, c = unpack_blocks(w)
        # float64 holds d * code + c exactly (11-bit d times an 8-bit code), so the one
        # rounding is the cast to float32.
        exact = d.astype(np.float64)[..., None] * codes + c.astype(np.float64)[..., None]
        out = exact.astype(np.float32)
    return out.reshape(w.shape)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even; NaN stays NaN."""
    bits = x.view(np.uint32).astype(np.uint64)
    # Adding 0x7fff plus the lowest kept bit rounds the 16 dropped bits to nearest-even
    # (overflow past the largest finite value correctly gives infinity).
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    is_nan = np.isnan(x)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)  # keep sign and payload, set quiet bit
    return np.where(is_nan, quiet_nan, rounded)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as float32: what the native
    kernels do to the activations that multiply bf16 weights."""
    bits = _to_bf16_bits(np.ascontiguousarray(x, dtype=np.float32)).astype(np.uint32) << 16
    return bits.view(np.float32)


def quantize(x: np.ndarray, dtype: str) -> Weight:
    """Encode float32 values in a storage format.

    q8_0 / q4_0 / q4_1 use the ggml reference quantizers (through ``gguf.quants``), so the
    blocks are what llama.cpp would write. f16 and bf16 round to nearest, ties to even.

    Args:
        x: float32 [..., C] (typically [rows, cols]); C a multiple of 32 for quantized dtypes.
        dtype: one of ``WEIGHT_DTYPES``.
    Returns:
        A :class:`Weight` of shape ``x.shape``; quantized data is uint8 [rows, row_nbytes].
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unsupported weight dtype {dtype!r}; expected one of {WEIGHT_DTYPES}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs at least one dimension")
    if dtype == "f32":
        data = x.copy()
    elif dtype == "f16":
        with np.errstate(over="ignore"):  # beyond the f16 range is +-inf, as IEEE rounds it
            data = x.astype(np.float16)
    elif dtype == "bf16":
        data = _to_bf16_bits(x)
    else:
        if x.shape[-1] % QK:
            raise ValueError(f"{dtype} needs a multiple of {QK} columns, got {x.shape[-1]}")
        data = gguf_quants.quantize(x.reshape(_rows(x.shape), x.shape[-1]), _GGML_TYPE[dtype])
    return Weight(dtype, x.shape, data)


def quantize_activations_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The native engine's int8 activation quantization, bit for bit.

    Per row and per block of 32, all in float32 arithmetic::

        amax = max |x|
        d    = amax / 127
        id   = 127 / amax   (0 when amax == 0)
        q    = clip(round_half_even(x * id), -127, 127)
        s    = sum(q)        (lets a kernel fold a weight offset into one multiply per block)

    Args:
        x: float32 [T, K], K a multiple of 32.
    Returns:
        q int8 [T, K], d float32 [T, K/32], s int32 [T, K/32].
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"quantize_activations_q8 needs [T, K] with K a multiple of {QK}, "
                         f"got shape {x.shape}")
    T, K = x.shape
    xb = x.reshape(T, K // QK, QK)
    amax = np.abs(xb).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    s = q.astype(np.int32).sum(axis=-1, dtype=np.int32)
    return q.reshape(T, K), d.astype(np.float32), s
