// Weight storage types, quantized block layouts and scalar conversions.
//
// Quantized layouts follow GGUF (32 values per block):
//   Q8_0: f16 d, int8 q[32]              value = q * d
//   Q4_0: f16 d, u8 nib[16]              value = (nib - 8) * d
//   Q4_1: f16 d, f16 m, u8 nib[16]       value = nib * d + m
// Low nibbles hold elements 0..15 of a block, high nibbles elements 16..31.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "common/hd.h"

namespace dovetail {

enum class WType : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5 };

constexpr int kQBlock = 32;  // values per quantized block

inline bool is_quantized(WType t) { return t == WType::Q8_0 || t == WType::Q4_0 || t == WType::Q4_1; }

// Bytes of one GGUF block (quantized) or one value (float types).
inline int gguf_unit_bytes(WType t) {
  switch (t) {
    case WType::F32: return 4;
    case WType::F16: case WType::BF16: return 2;
    case WType::Q8_0: return 34;
    case WType::Q4_0: return 18;
    case WType::Q4_1: return 20;
  }
  return 0;
}

const char* wtype_name(WType t);
WType wtype_from_name(const std::string& name);  // throws ValueError

inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even (numpy's float32 -> float16): overflow to inf, subnormals rounded
// at 2^-24, NaN stays NaN.
inline uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: inf (and inf itself)
  if (ax >= 0x38800000u) {                       // normal in f16 (>= 2^-14)
    const uint32_t r = ax + 0x0fffu + ((ax >> 13) & 1u);
    return sign | (uint16_t)((r - (112u << 23)) >> 13);
  }
  if (ax < 0x33000000u) return sign;  // <= 2^-25: rounds to zero
  // Subnormal: the value in units of 2^-24, rounded half to even.
  const int shift = 126 - (int)(ax >> 23);  // 14..24
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return sign | (uint16_t)q;
}

// (DT_HD: the CUDA draft engine converts with these same functions.)
DT_HD float bf16_to_fp32(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Round to nearest even; NaN stays NaN.
DT_HD uint16_t fp32_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  uint32_t bits = __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
#endif
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

}  // namespace dovetail
