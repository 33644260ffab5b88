"""GGUF block types the engine does not execute, rewritten at load into ones it does.

Most GGUF files in use are llama.cpp's K-quant mixes (``Q4_K_M``, ``Q5_K_M``...): their
matrices are ``Q4_K``, ``Q5_K``, ``Q6_K``, ``Q5_0`` and others. The engine runs one kernel
family over blocks of 32 values (``q8_0``, ``q4_0``, ``q4_1``, see ``quant.py``); this
module maps every other type onto that family, row by row, in numpy:

==========  ========  ===============================================================
stored      becomes   how
==========  ========  ===============================================================
``Q5_0``    ``q8_0``  exact: the same ``d``, codes ``q - 16`` (5 bits fit in int8)
``Q4_K``    ``q4_1``  the same 4-bit codes; sub-block scales ``d * sc`` and offsets
                      ``-dmin * m`` rounded to float16 (relative error <= 2^-11 of a
                      scale, under 1% of a quantization step)
any other   ``q8_0``  dequantized by ``gguf.quants`` (exact), requantized by ggml's
                      reference ``Q8_0`` quantizer (within 0.57 of an 8-bit step:
                      half a step, plus the float16 rounding of the block's scale)
==========  ========  ===============================================================

Q5_0, Q4_K and Q6_K (the types of llama.cpp's K-quant mixes) convert natively
(``_core.convert_gguf_blocks``, on every core); the numpy functions here are their twins,
equal bit for bit (tested), and convert every other type.

The engine then runs the converted model, and everything it guarantees (greedy
speculation equal to plain greedy decoding, batch invariance) holds for that model; its
outputs differ from llama.cpp's on the same file only by the rounding above.

Layouts (llama.cpp ``ggml-common.h``), bytes per block of 256 values unless said:
``Q5_0`` (32 values, 22 bytes): f16 d, u32 qh (bit j = high bit of value j), 16 bytes of
nibbles (value j low, value j + 16 high); value = d * (q - 16).
``Q4_K`` (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales / mins for 8 sub-blocks
of 32, 128 bytes of nibbles: per chunk of 64 values, 32 bytes whose low nibbles are the
first sub-block and high nibbles the second; value = d * sc * q - dmin * m.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from .base import QUANT_BLOCK, row_nbytes

__all__ = ["convert_blocks", "convert_blocks_numpy", "convertible_types"]


def _q5_0_to_q8_0(data: np.ndarray) -> np.ndarray:
    """uint8 [R, nb * 22] Q5_0 -> uint8 [R, nb * 34] Q8_0 holding the same values."""
    blocks = data.reshape(-1, 22)
    high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # [n, 32]: bit j of qh
    qs = blocks[:, 6:22]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (high << 4)  # 0..31
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, :2] = blocks[:, :2]
    out[:, 2:] = codes + np.uint8(240)  # the int8 q - 16, as its byte (uint8 wraps mod 256)
    return out.reshape(data.shape[0], -1)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes per block -> (scales, mins) [n, 8] of 6 bits each (``get_scale_min_k4``)."""
    s = sc.astype(np.uint8)
    scales = np.empty((s.shape[0], 8), np.uint8)
    mins = np.empty((s.shape[0], 8), np.uint8)
    scales[:, :4] = s[:, 0:4] & 63
    mins[:, :4] = s[:, 4:8] & 63
    scales[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return scales, mins


def _q4_k_to_q4_1(data: np.ndarray) -> np.ndarray:
    """uint8 [R, nb * 144] Q4_K -> uint8 [R, nb * 8 * 20] Q4_1 (scales rounded to float16)."""
    blocks = data.reshape(-1, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    scales, mins = _k_scales(blocks[:, 4:16])
    sub_d = (d[:, None] * scales).astype(np.float16)        # [n, 8]
    sub_m = (-(dmin[:, None] * mins)).astype(np.float16)
    # Codes of sub-block 2c (low nibbles) and 2c + 1 (high) of chunk c, 32 values each.
    qs = blocks[:, 16:].reshape(n, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    out = np.empty((n, 8, 20), np.uint8)
    out[:, :, 0:2] = sub_d[..., None].view(np.uint8)
    out[:, :, 2:4] = sub_m[..., None].view(np.uint8)
    out[:, :, 4:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    return out.reshape(data.shape[0], -1)


def _requantize_q8_0(data: np.ndarray, qtype: Any, cols: int) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    values = quants.dequantize(data, qtype).reshape(data.shape[0], cols).astype(np.float32)
    return quants.quantize(values, Q.Q8_0)


@lru_cache(maxsize=None)
def _converters() -> dict[Any, tuple[str, Any]]:
    from gguf import GGMLQuantizationType as Q
    return {Q.Q5_0: ("q8_0", lambda data, cols: _q5_0_to_q8_0(data)),
            Q.Q4_K: ("q4_1", lambda data, cols: _q4_k_to_q4_1(data))}


_NATIVE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Converted by _core.convert_gguf_blocks (the numpy functions here are their twins).
_NATIVE_CONVERSIONS = ("Q5_0", "Q4_K", "Q6_K")


@lru_cache(maxsize=None)
def convertible_types() -> dict[str, str]:
    """ggml type name -> engine dtype, for every type :func:`convert_blocks` accepts."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    special = _converters()
    traits = getattr(quants, "_type_traits", {})
    return {t.name: special[t][0] if t in special else "q8_0" for t in Q
            if t.name not in _NATIVE and (t in special or t in traits)}


def convert_blocks(data: np.ndarray, qtype: Any, cols: int) -> tuple[str, np.ndarray]:
    """One matrix stored in ``qtype`` -> (engine dtype, uint8 [rows, row bytes]).

    Args:
        data: the stored blocks, uint8 [rows, row bytes] (a GGUF reader's view).
        qtype: its ``gguf.GGMLQuantizationType``.
        cols: values per row.

    Raises:
        ValueError: a type neither converted nor dequantizable by ``gguf.quants``, or
            ``cols`` not a multiple of 32.
    """
    if qtype.name in _NATIVE_CONVERSIONS:  # (each path checks that cols is whole blocks)
        from .. import _core
        dtype, out = _core.convert_gguf_blocks(qtype.name, np.ascontiguousarray(data), cols, os.cpu_count() or 1)
    else:
        with np.errstate(over="ignore"):  # an overflowing scale is reported below
            dtype, out = convert_blocks_numpy(data, qtype, cols)
    # The float16 scale (and offset) fields of the result: a value the stored block held in
    # float32 may not fit (|x| > 65504), which the engine would read as inf; a corrupt block
    # (NaN or inf) leaves a NaN or inf there too.
    n = 4 if dtype == "q4_1" else 2  # d (and m)
    fields = np.ascontiguousarray(out.reshape(-1, QUANT_BLOCK[dtype][1])[:, :n]).view(np.float16)
    if not np.isfinite(fields).all():
        raise ValueError(f"a block of this {qtype.name} matrix holds a value that is not finite, or a scale "
                         f"that overflows float16 once converted to {dtype}")
    return dtype, out


def convert_blocks_numpy(data: np.ndarray, qtype: Any, cols: int) -> tuple[str, np.ndarray]:
    """:func:`convert_blocks` in numpy for every type (the native conversions' twin)."""
    if cols % 32:
        raise ValueError(f"{qtype.name} rows of {cols} values cannot become blocks of 32")
    special = _converters()
    if qtype in special:
        dtype, fn = special[qtype]
    elif qtype.name in convertible_types():
        dtype, fn = "q8_0", lambda part, cols: _requantize_q8_0(part, qtype, cols)
    else:
        raise ValueError(f"type {qtype.name} cannot be converted (gguf.quants has no dequantizer for it)")
    # Rows convert independently: in chunks of about 4M values (bounding the float32
    # copies of a large matrix), on every core (numpy releases the GIL in its loops).
    rows, chunk = data.shape[0], max(1, (1 << 22) // cols)
    if rows <= chunk:
        return dtype, fn(np.ascontiguousarray(data), cols)
    out = np.empty((rows, row_nbytes(dtype, cols)), np.uint8)

    def work(r0: int) -> None:
        out[r0:r0 + chunk] = fn(np.ascontiguousarray(data[r0:r0 + chunk]), cols)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(work, range(0, rows, chunk)))
    return dtype, out
