// Per-row helpers shared by the matmul kernels: read one stored row into unsigned codes
// plus per-block scales. Every quantized format becomes
//   W[n, 32b + i] = dw[b] * code[i] + cw[b]      (code unsigned: 0..15 or 0..255)
// so one integer dot product per block serves all formats:
//   sum_i W * x  ~=  da[b] * (dw[b] * sum_i code_i * q_i) + cw[b] * (da[b] * sum_i q_i).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "cpu/ops.h"

namespace dovetail {

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

// Scales of block b of a stored quantized row.
inline void block_scales(WType t, const uint8_t* row, int64_t b, float* dw, float* cw) {
  const uint8_t* blk = row + b * gguf_unit_bytes(t);
  const float d = load_f16(blk);
  *dw = d;
  switch (t) {
    case WType::Q8_0: *cw = -128.0f * d; break;
    case WType::Q4_0: *cw = -8.0f * d; break;
    case WType::Q4_1: *cw = load_f16(blk + 2); break;
    default: *cw = 0.0f;
  }
}

// Pointer to the 32 (q8_0) or 16 (q4) code bytes of block b.
inline const uint8_t* block_codes(WType t, const uint8_t* row, int64_t b) {
  const uint8_t* blk = row + b * gguf_unit_bytes(t);
  return blk + (t == WType::Q4_1 ? 4 : 2);
}

// Scalar unpack of a whole row: codes[K] (unsigned), dw[nb], cw[nb].
inline void unpack_row_scalar(WType t, const uint8_t* row, int64_t K, uint8_t* codes, float* dw,
                              float* cw) {
  const int64_t nb = K / kQBlock;
  for (int64_t b = 0; b < nb; ++b) {
    block_scales(t, row, b, dw + b, cw + b);
    const uint8_t* c = block_codes(t, row, b);
    uint8_t* o = codes + b * kQBlock;
    if (t == WType::Q8_0) {
      for (int i = 0; i < 32; ++i) o[i] = (uint8_t)(c[i] ^ 0x80u);  // int8 + 128
    } else {
      for (int i = 0; i < 16; ++i) {
        o[i] = c[i] & 0x0f;
        o[i + 16] = c[i] >> 4;
      }
    }
  }
}

// Thread-local scratch, grown on first use by each thread and then reused.
template <typename T>
inline T* tls_scratch(Buffer<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace dovetail
