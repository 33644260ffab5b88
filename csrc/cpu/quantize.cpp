// Weight packing, activation quantization and row dequantization (scalar; these run
// once per weight or once per matmul input and are not on the inner loop).
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "common/thread_pool.h"
#include "cpu/ops.h"
#include "cpu/quant_common.h"

namespace dovetail {

const char* wtype_name(WType t) {
  switch (t) {
    case WType::F32: return "f32";
    case WType::F16: return "f16";
    case WType::BF16: return "bf16";
    case WType::Q8_0: return "q8_0";
    case WType::Q4_0: return "q4_0";
    case WType::Q4_1: return "q4_1";
  }
  return "?";
}

WType wtype_from_name(const std::string& n) {
  for (WType t : {WType::F32, WType::F16, WType::BF16, WType::Q8_0, WType::Q4_0, WType::Q4_1})
    if (n == wtype_name(t)) return t;
  throw_value_error("unknown weight dtype '" + n + "': expected f32, f16, bf16, q8_0, q4_0 or q4_1");
}

PackedWeight pack_weight(WType type, int64_t rows, int64_t cols, const void* src, size_t src_bytes) {
  DT_CHECK(rows > 0 && cols > 0, "weight shape must be positive, got (" + std::to_string(rows) +
                                     ", " + std::to_string(cols) + ")");
  if (is_quantized(type))
    DT_CHECK(cols % kQBlock == 0, std::string(wtype_name(type)) + " weight needs a multiple of 32 "
                                  "columns, got " + std::to_string(cols));
  // A caller's shape is not trusted: the packed size must not wrap around (a wrapped
  // size would pass the byte-count check below and the copy would read past the source).
  constexpr int64_t kMaxBytes = int64_t(1) << 56;
  DT_CHECK(cols <= kMaxBytes / 8 && rows <= kMaxBytes / ((cols * 4 + 63) / 64 * 64),
           "weight shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ") is too large");
  PackedWeight w;
  w.type = type;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = is_quantized(type) ? cols / kQBlock * gguf_unit_bytes(type) : cols * gguf_unit_bytes(type);
  DT_CHECK(src_bytes == (size_t)(rows * w.row_bytes),
           std::string(wtype_name(type)) + " weight of shape (" + std::to_string(rows) + ", " +
               std::to_string(cols) + ") needs " + std::to_string(rows * w.row_bytes) +
               " bytes, got " + std::to_string(src_bytes));
  const auto* s = static_cast<const uint8_t*>(src);
  if (is_quantized(type)) {
    const int64_t nb = cols / kQBlock, ub = gguf_unit_bytes(type);
    w.data.resize((size_t)(panel_count(rows) * nb * panel_block_bytes(type)));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b)
        put_block(type, s + r * w.row_bytes + b * ub, block_panel(w, r / kPanel, b), (int)(r % kPanel));
    return w;
  }
  const int64_t es = gguf_unit_bytes(type);
  w.data.resize((size_t)(panel_count(rows) * float_panel_elems(type, cols) * es));  // zeros: the padding
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      std::memcpy(w.data.data() + float_index(type, r, k, cols) * es, s + r * w.row_bytes + k * es, (size_t)es);
  return w;
}

PackedWeight select_rows(const PackedWeight& w, const int32_t* rows, int64_t n) {
  DT_CHECK(n > 0, "select_rows: no rows");
  PackedWeight out;
  out.type = w.type;
  out.rows = n;
  out.cols = w.cols;
  out.row_bytes = w.row_bytes;
  for (int64_t i = 0; i < n; ++i)
    DT_CHECK(rows[i] >= 0 && rows[i] < w.rows, "select_rows: row " + std::to_string(rows[i]) + " out of range");
  if (is_quantized(w.type)) {
    const int64_t nb = w.cols / kQBlock;
    out.data.resize((size_t)(panel_count(n) * nb * panel_block_bytes(w.type)));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t b = 0; b < nb; ++b)
        copy_block(w.type, block_panel(w, rows[i] / kPanel, b), (int)(rows[i] % kPanel), block_panel(out, i / kPanel, b),
                   (int)(i % kPanel));
    return out;
  }
  const int64_t es = gguf_unit_bytes(w.type);
  out.data.resize((size_t)(panel_count(n) * float_panel_elems(w.type, w.cols) * es));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < w.cols; ++k)
      std::memcpy(out.data.data() + float_index(w.type, i, k, w.cols) * es,
                  w.data.data() + float_index(w.type, rows[i], k, w.cols) * es, (size_t)es);
  return out;
}

void QActs::reserve(int64_t max_T, int64_t max_K) {
  const size_t n = (size_t)(max_T * max_K), nb = (size_t)(max_T * ((max_K + kQBlock - 1) / kQBlock));
  if (q.size() < n) q.resize(n);
  if (d.size() < nb) d.resize(nb);
  if (ds.size() < nb) ds.resize(nb);
  const int64_t tiles = (max_T + kActTile - 1) / kActTile, nbk = (max_K + kQBlock - 1) / kQBlock;
  const size_t ni = (size_t)(tiles * nbk * kActTile);
  if (qi.size() < ni * kQBlock) qi.resize(ni * kQBlock);
  if (di.size() < ni) di.resize(ni);
  if (dsi.size() < ni) dsi.resize(ni);
}

namespace scalar {

int quantize_block(const float* xb, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int i = 0; i < kQBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
  *d = amax / 127.0f;
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  int sum = 0;
  for (int i = 0; i < kQBlock; ++i) {
    float v = std::nearbyint(xb[i] * id);
    v = std::fmin(127.0f, std::fmax(-127.0f, v));
    q[i] = (int8_t)v;
    sum += q[i];
  }
  return sum;
}

}  // namespace scalar

void quantize_acts(const float* x, int64_t T, int64_t K, QActs& out, int nthreads) {
  DT_CHECK(K % kQBlock == 0, "activation length must be a multiple of 32, got " + std::to_string(K));
  out.reserve(T, K);
  out.T = T;
  out.K = K;
  const int64_t nb = K / kQBlock;
  int (*block)(const float*, int8_t*, float*) = scalar::quantize_block;
  switch (active_isa()) {
    case Isa::Avx512: block = avx512::quantize_block; break;
    case Isa::Avx2: block = avx2::quantize_block; break;
    case Isa::Scalar: break;
  }
  parallel_range(T * K > 16384 ? nthreads : 1, T, 1, [&](int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* q = out.q.data() + t * K + b * kQBlock;
      float& d = out.d[t * nb + b];
      const int sum = block(x + t * K + b * kQBlock, q, &d);
      out.ds[t * nb + b] = d * (float)sum;
      const int64_t slot = ((t / kActTile) * nb + b) * kActTile + t % kActTile;
      std::memcpy(out.qi.data() + slot * kQBlock, q, kQBlock);
      out.di[slot] = d;
      out.dsi[slot] = out.ds[t * nb + b];
    }
  }
  });
  // Zero the tail of the last tile: its unused token slots are computed and discarded.
  for (int64_t t = T; t % kActTile != 0; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t slot = ((t / kActTile) * nb + b) * kActTile + t % kActTile;
      std::memset(out.qi.data() + slot * kQBlock, 0, kQBlock);
      out.di[slot] = out.dsi[slot] = 0.0f;
    }
}

void bf16_pair_row(const float* x, int64_t stride, int64_t k, uint32_t* out, int64_t k2) {
  int64_t j = 0;
  if (stride == 1 && active_isa() == Isa::Avx512) {
    avx512::round_bf16(x, k / 2 * 2, out);
    j = k / 2;
  }
  for (; j < k2; ++j) {
    const uint32_t lo = 2 * j < k ? fp32_to_bf16(x[2 * j * stride]) : 0,
                   hi = 2 * j + 1 < k ? fp32_to_bf16(x[(2 * j + 1) * stride]) : 0;
    out[j] = lo | (hi << 16);
  }
}

void bf16_acts(const float* x, int64_t T, int64_t K, QActs& out) {
  const int64_t K2 = bf16_pairs(K);
  if (out.b.size() < (size_t)(T * K2)) out.b.resize((size_t)(T * K2));
  out.T = T;
  out.K = K;
  out.K2 = K2;
  for (int64_t t = 0; t < T; ++t) bf16_pair_row(x + t * K, 1, K, out.b.data() + t * K2, K2);
}

void prepare_acts(const PackedWeight& w, const float* x, int64_t T, QActs& out, int nthreads) {
  if (is_quantized(w.type))
    quantize_acts(x, T, w.cols, out, nthreads);
  else if (w.type == WType::BF16)
    bf16_acts(x, T, w.cols, out);
}

void dequantize_row(const PackedWeight& w, int64_t r, float* out) {
  DT_CHECK_INDEX(r >= 0 && r < w.rows, "row " + std::to_string(r) + " out of range [0, " +
                                           std::to_string(w.rows) + ")");
  switch (w.type) {
    case WType::F32:
      for (int64_t i = 0; i < w.cols; ++i) out[i] = float_panel<float>(w, 0)[float_index(w.type, r, i, w.cols)];
      return;
    case WType::F16: case WType::BF16: {
      const uint16_t* d = float_panel<uint16_t>(w, 0);
      for (int64_t i = 0; i < w.cols; ++i) {
        const uint16_t h = d[float_index(w.type, r, i, w.cols)];
        out[i] = w.type == WType::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
      }
      return;
    }
    default: break;
  }
  const int64_t nb = w.cols / kQBlock;
  uint8_t c[kQBlock];
  for (int64_t b = 0; b < nb; ++b) {
    float dw, cw;
    get_block(w.type, block_panel(w, r / kPanel, b), (int)(r % kPanel), c, &dw, &cw);
    float* o = out + b * kQBlock;
    if (w.type == WType::Q4_1) {
      for (int i = 0; i < kQBlock; ++i) o[i] = (float)c[i] * dw + cw;
    } else {  // q8_0: (code - 128) * d; q4_0: (code - 8) * d, as GGUF defines them
      const int off = w.type == WType::Q8_0 ? 128 : 8;
      for (int i = 0; i < kQBlock; ++i) o[i] = (float)((int)c[i] - off) * dw;
    }
  }
}

}  // namespace dovetail
