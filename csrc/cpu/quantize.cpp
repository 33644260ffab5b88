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
  // A caller's shape is not trusted: rows * row_stride must not wrap around (a wrapped
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
  w.row_stride = (w.row_bytes + 63) / 64 * 64;
  w.data.resize((size_t)(rows * w.row_stride));
  const auto* s = static_cast<const uint8_t*>(src);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(w.data.data() + r * w.row_stride, s + r * w.row_bytes, w.row_bytes);
  return w;
}

PackedWeight select_rows(const PackedWeight& w, const int32_t* rows, int64_t n) {
  DT_CHECK(n > 0, "select_rows: no rows");
  PackedWeight out;
  out.type = w.type;
  out.rows = n;
  out.cols = w.cols;
  out.row_bytes = w.row_bytes;
  out.row_stride = w.row_stride;
  out.data.resize((size_t)(n * w.row_stride));
  for (int64_t i = 0; i < n; ++i) {
    DT_CHECK(rows[i] >= 0 && rows[i] < w.rows, "select_rows: row " + std::to_string(rows[i]) + " out of range");
    std::memcpy(out.data.data() + i * w.row_stride, w.row(rows[i]), (size_t)w.row_bytes);
  }
  return out;
}

void QActs::reserve(int64_t max_T, int64_t max_K) {
  const size_t n = (size_t)(max_T * max_K), nb = (size_t)(max_T * ((max_K + kQBlock - 1) / kQBlock));
  if (q.size() < n) q.resize(n);
  if (d.size() < nb) d.resize(nb);
  if (ds.size() < nb) ds.resize(nb);
  if (dx.size() < 8 * nb) dx.resize(8 * nb);
}

void quantize_acts(const float* x, int64_t T, int64_t K, QActs& out, int nthreads) {
  DT_CHECK(K % kQBlock == 0, "activation length must be a multiple of 32, got " + std::to_string(K));
  out.reserve(T, K);
  out.T = T;
  out.K = K;
  const int64_t nb = K / kQBlock;
  parallel_range(T * K > 16384 ? nthreads : 1, T, 1, [&](int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * K + b * kQBlock;
      float amax = 0.0f;
      for (int i = 0; i < kQBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f;
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* q = out.q.data() + t * K + b * kQBlock;
      int sum = 0;
      for (int i = 0; i < kQBlock; ++i) {
        float v = std::nearbyint(xb[i] * id);
        v = std::fmin(127.0f, std::fmax(-127.0f, v));
        q[i] = (int8_t)v;
        sum += q[i];
      }
      out.d[t * nb + b] = d;
      out.ds[t * nb + b] = d * (float)sum;
      for (int i = 0; i < 8; ++i) out.dx[(t * nb + b) * 8 + i] = d;
    }
  }
  });
}

void dequantize_row(const PackedWeight& w, int64_t r, float* out) {
  DT_CHECK_INDEX(r >= 0 && r < w.rows, "row " + std::to_string(r) + " out of range [0, " +
                                           std::to_string(w.rows) + ")");
  const uint8_t* row = w.row(r);
  switch (w.type) {
    case WType::F32: std::memcpy(out, row, w.cols * 4); return;
    case WType::F16:
      for (int64_t i = 0; i < w.cols; ++i) out[i] = load_f16(row + 2 * i);
      return;
    case WType::BF16:
      for (int64_t i = 0; i < w.cols; ++i) {
        uint16_t b;
        std::memcpy(&b, row + 2 * i, 2);
        out[i] = bf16_to_fp32(b);
      }
      return;
    default: break;
  }
  const int64_t nb = w.cols / kQBlock;
  for (int64_t b = 0; b < nb; ++b) {
    float dw, cw;
    block_scales(w.type, row, b, &dw, &cw);
    const uint8_t* c = block_codes(w.type, row, b);
    float* o = out + b * kQBlock;
    if (w.type == WType::Q8_0) {
      for (int i = 0; i < 32; ++i) o[i] = (float)(int8_t)c[i] * dw;
    } else if (w.type == WType::Q4_0) {
      for (int i = 0; i < 16; ++i) {
        o[i] = (float)((int)(c[i] & 0x0f) - 8) * dw;
        o[i + 16] = (float)((int)(c[i] >> 4) - 8) * dw;
      }
    } else {
      for (int i = 0; i < 16; ++i) {
        o[i] = (float)(c[i] & 0x0f) * dw + cw;
        o[i + 16] = (float)(c[i] >> 4) * dw + cw;
      }
    }
  }
}

}  // namespace dovetail
