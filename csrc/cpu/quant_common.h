// Per-row helpers shared by the matmul kernels: read one stored row into unsigned codes
// plus per-block scales. Every quantized format becomes
//   W[n, 32b + i] = dw[b] * code[i] + cw[b]      (code unsigned: 0..15 or 0..255)
// so one integer dot product per block serves all formats:
//   sum_i W * x  ~=  da[b] * (dw[b] * sum_i code_i * q_i) + cw[b] * (da[b] * sum_i q_i).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "cpu/ops.h"

namespace dovetail {

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

// Panel layout of quantized weights. Panel p holds rows 16p .. 16p+15; for each block b of
// 32 columns it has one "block panel" of kPanel * gguf_unit_bytes bytes:
//   codes  q4_0 / q4_1: [4][16 rows][4 bytes]: byte k of dword j of a row holds column 4j+k
//                       in its low nibble and column 16+4j+k in its high nibble (GGUF's qs)
//          q8_0:        [8][16 rows][4 bytes]: columns 4s..4s+3 as unsigned int8 + 128
//   d      [16] f16;   then, for q4_1 only, m [16] f16
// so W[r, 32b + i] = dw * code_i + cw with dw = d and cw = m (q4_1), -8 d (q4_0), -128 d (q8_0).
constexpr int kPanel = 16;

inline int64_t panel_block_bytes(WType t) { return kPanel * gguf_unit_bytes(t); }

// The SIMD kernels read a matrix's block panels as one stream, and ask for the bytes
// kPrefetchAhead ahead of the block they start (prefetchnta: __builtin_prefetch with no
// temporal locality). Measured in bench/KERNELS.md: with 3 KB a whole target call took
// 0.95x the time at T = 1, 0.78x at T = 4 and 0.65x at T = 16. A prefetch never faults, so
// the addresses past a matrix's end are harmless.
constexpr int64_t kPrefetchAhead = 3072;
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + kPrefetchAhead + o, 0, 0);
}
inline int64_t panel_code_bytes(WType t) { return t == WType::Q8_0 ? 512 : 256; }
inline int64_t panel_count(int64_t rows) { return (rows + kPanel - 1) / kPanel; }

inline const uint8_t* block_panel(const PackedWeight& w, int64_t p, int64_t b) {
  return w.data.data() + (p * (w.cols / kQBlock) + b) * panel_block_bytes(w.type);
}
inline uint8_t* block_panel(PackedWeight& w, int64_t p, int64_t b) {
  return w.data.data() + (p * (w.cols / kQBlock) + b) * panel_block_bytes(w.type);
}

// One GGUF block (d [, m], qs) into lane `lane` of a block panel.
inline void put_block(WType t, const uint8_t* blk, uint8_t* bp, int lane) {
  const int64_t cb = panel_code_bytes(t);
  std::memcpy(bp + cb + 2 * lane, blk, 2);
  if (t == WType::Q8_0) {
    for (int s = 0; s < 8; ++s)
      for (int k = 0; k < 4; ++k) bp[s * 64 + lane * 4 + k] = (uint8_t)(blk[2 + 4 * s + k] ^ 0x80u);
    return;
  }
  if (t == WType::Q4_1) std::memcpy(bp + cb + 32 + 2 * lane, blk + 2, 2);
  const uint8_t* qs = blk + (t == WType::Q4_1 ? 4 : 2);
  for (int j = 0; j < 4; ++j) std::memcpy(bp + j * 64 + lane * 4, qs + 4 * j, 4);
}

// Lane `lane` of one block panel to another's (codes and scales).
inline void copy_block(WType t, const uint8_t* src, int src_lane, uint8_t* dst, int dst_lane) {
  const int64_t cb = panel_code_bytes(t);
  for (int64_t s = 0; s < cb / 64; ++s) std::memcpy(dst + s * 64 + dst_lane * 4, src + s * 64 + src_lane * 4, 4);
  std::memcpy(dst + cb + 2 * dst_lane, src + cb + 2 * src_lane, 2);
  if (t == WType::Q4_1) std::memcpy(dst + cb + 32 + 2 * dst_lane, src + cb + 32 + 2 * src_lane, 2);
}

// Lane `lane` of a block panel as 32 unsigned codes (column order) and its scales.
inline void get_block(WType t, const uint8_t* bp, int lane, uint8_t* codes, float* dw, float* cw) {
  const int64_t cb = panel_code_bytes(t);
  const float d = load_f16(bp + cb + 2 * lane);
  *dw = d;
  if (t == WType::Q8_0) {
    *cw = -128.0f * d;
    for (int s = 0; s < 8; ++s)
      for (int k = 0; k < 4; ++k) codes[4 * s + k] = bp[s * 64 + lane * 4 + k];
    return;
  }
  *cw = t == WType::Q4_1 ? load_f16(bp + cb + 32 + 2 * lane) : -8.0f * d;
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < 4; ++k) {
      const uint8_t c = bp[j * 64 + lane * 4 + k];
      codes[4 * j + k] = c & 0x0f;
      codes[16 + 4 * j + k] = c >> 4;
    }
}

// Scalar unpack of row r of a quantized weight: codes[K] (unsigned), dw[nb], cw[nb].
inline void unpack_row_scalar(const PackedWeight& w, int64_t r, uint8_t* codes, float* dw, float* cw) {
  const int64_t nb = w.cols / kQBlock;
  for (int64_t b = 0; b < nb; ++b)
    get_block(w.type, block_panel(w, r / kPanel, b), (int)(r % kPanel), codes + b * kQBlock, dw + b, cw + b);
}

// Panel layout of float weights: panels of kPanel rows, so one vector holds the same
// column(s) of 16 rows and a matmul reads each weight once for a tile of tokens.
//   f32 / f16: [panel][K][16 rows]; element (r, k) at ((r / 16) * K + k) * 16 + r % 16.
//   bf16:      [panel][K2][16 rows][2]: columns in pairs 2j, 2j+1 (the operand of one
//              vdpbf16ps), K2 = bf16_pairs(K) pairs, padded with zeros to an even count so
//              the kernels run whole pairs of pairs.
// Rows past N in the last panel are zero.
inline int64_t bf16_pairs(int64_t cols) { return (cols + 3) / 4 * 2; }
inline int64_t float_panel_elems(WType t, int64_t cols) {
  return (t == WType::BF16 ? 2 * bf16_pairs(cols) : cols) * kPanel;
}
inline int64_t float_index(WType t, int64_t r, int64_t k, int64_t cols) {
  if (t == WType::BF16) return (r / kPanel) * float_panel_elems(t, cols) + (k / 2) * (2 * kPanel) + (r % kPanel) * 2 + k % 2;
  return ((r / kPanel) * cols + k) * kPanel + r % kPanel;
}
// Panel p of a float weight, as its stored element type (float, or uint16_t for f16 / bf16).
template <typename E>
inline const E* float_panel(const PackedWeight& w, int64_t p) {
  return reinterpret_cast<const E*>(w.data.data()) + p * float_panel_elems(w.type, w.cols);
}

// Thread-local scratch, grown on first use by each thread and then reused.
template <typename T>
inline T* tls_scratch(Buffer<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace dovetail
