// Weight packing, activation quantization and row dequantization (scalar; these run
// once per weight or once per matmul input and are not on the inner loop).
#include <algorithm>
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

namespace {

// avx512::quantize_row's contract over a block kernel, one block after another.
template <int (*Block)(const float*, int8_t*, float*)>
void row_by_blocks(const float* x, int64_t nb, int8_t* q, int64_t q_stride, float* d, float* ds, int64_t stride) {
  for (int64_t b = 0; b < nb; ++b) {
    const int sum = Block(x + b * kQBlock, q + b * q_stride, &d[b * stride]);
    ds[b * stride] = d[b * stride] * (float)sum;
  }
}

}  // namespace

void quantize_acts(const float* x, int64_t T, int64_t K, QActs& out, int nthreads) {
  DT_CHECK(K % kQBlock == 0, "activation length must be a multiple of 32, got " + std::to_string(K));
  out.reserve(T, K);
  out.T = T;
  out.K = K;
  const int64_t nb = K / kQBlock;
  // One row at a time: AVX-512 takes a row's blocks together (the same bits as block by block).
  void (*row)(const float*, int64_t, int8_t*, int64_t, float*, float*, int64_t) = row_by_blocks<scalar::quantize_block>;
  switch (active_isa()) {
    case Isa::Avx512:
    case Isa::Avx512Bf16: row = avx512::quantize_row; break;
    case Isa::Avx2:
    case Isa::AvxVnni: row = row_by_blocks<avx2::quantize_block>; break;
    case Isa::Scalar: break;
  }
  parallel_range(T * K > 16384 ? nthreads : 1, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // block b of row t sits kActTile slots after block b - 1
      const int64_t s0 = act_slot(t, 0, nb);
      row(x + t * K, nb, out.qi.data() + s0 * kQBlock, kActTile * kQBlock, out.di.data() + s0, out.dsi.data() + s0,
          kActTile);
    }
  });
  // Zero the tail of the last tile: its unused token slots are computed and discarded.
  for (int64_t t = T; t % kActTile != 0; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t slot = act_slot(t, b, nb);
      std::memset(out.qi.data() + slot * kQBlock, 0, kQBlock);
      out.di[slot] = out.dsi[slot] = 0.0f;
    }
}

void bf16_pair_row(const float* x, int64_t stride, int64_t k, uint32_t* out, int64_t k2) {
  int64_t j = 0;
  if (stride == 1 && is_avx512(active_isa())) {
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

// ---- GGUF blocks the kernels do not execute (formats/convert.py is the twin) -------------

namespace dovetail {
namespace {

// ggml's reference Q8_0 quantizer of 32 values: d = amax / 127, q = roundf(x / d) through
// the float32 reciprocal, d stored as float16. A block with a value that is not finite (a
// corrupt file) gets a NaN scale and zero codes, which the loader refuses.
void quantize_q8_0_block(const float* x, uint8_t* blk) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < 32; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  const float d = finite ? amax / 127.0f : std::nanf(""), id = finite && d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t h = fp32_to_fp16(d);
  std::memcpy(blk, &h, 2);
  for (int i = 0; i < 32; ++i) blk[2 + i] = finite ? (uint8_t)(int8_t)std::roundf(x[i] * id) : 0;
}

// One Q5_0 block (22 bytes) -> one Q8_0 block (34 bytes): the same d, codes q - 16.
void q5_0_to_q8_0(const uint8_t* in, uint8_t* out) {
  std::memcpy(out, in, 2);
  uint32_t qh;
  std::memcpy(&qh, in + 2, 4);
  const uint8_t* qs = in + 6;
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4), hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    out[2 + j] = (uint8_t)(int8_t)(lo - 16);
    out[2 + 16 + j] = (uint8_t)(int8_t)(hi - 16);
  }
}

// One Q4_K super-block (144 bytes, 256 values) -> 8 Q4_1 blocks (8 x 20 bytes).
void q4_k_to_q4_1(const uint8_t* in, uint8_t* out) {
  const float d = load_f16(in), dmin = load_f16(in + 2);
  const uint8_t* s = in + 4;
  const uint8_t* qs = in + 16;
  for (int j = 0; j < 8; ++j) {
    const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    uint8_t* blk = out + 20 * j;
    const uint16_t dh = fp32_to_fp16(d * (float)sc), mh = fp32_to_fp16(-(dmin * (float)m));
    std::memcpy(blk, &dh, 2);
    std::memcpy(blk + 2, &mh, 2);
    // Sub-block j: nibbles (low for even j, high for odd) of the 32 bytes of chunk j / 2.
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    for (int i = 0; i < 16; ++i)
      blk[4 + i] = (uint8_t)(((q[i] >> shift) & 0x0f) | (((q[i + 16] >> shift) & 0x0f) << 4));
  }
}

// One Q6_K super-block (210 bytes, 256 values) -> 8 Q8_0 blocks: decoded as
// (d * scale) * q in float32, then quantize_q8_0_block.
void q6_k_to_q8_0(const uint8_t* in, uint8_t* out) {
  const uint8_t* ql = in;
  const uint8_t* qh = in + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(in + 192);
  const float d = load_f16(in + 208);
  float y[256];
  for (int n = 0; n < 2; ++n) {
    const uint8_t* l8 = ql + 64 * n;
    const uint8_t* h8 = qh + 32 * n;
    const int8_t* s8 = sc + 8 * n;
    float* yy = y + 128 * n;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((l8[l] & 0x0f) | (((h8[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((l8[l + 32] & 0x0f) | (((h8[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4)) - 32;
      yy[l] = (d * (float)s8[is]) * (float)q1;
      yy[l + 32] = (d * (float)s8[is + 2]) * (float)q2;
      yy[l + 64] = (d * (float)s8[is + 4]) * (float)q3;
      yy[l + 96] = (d * (float)s8[is + 6]) * (float)q4;
    }
  }
  for (int b = 0; b < 8; ++b) quantize_q8_0_block(y + 32 * b, out + 34 * b);
}

struct BlockKind {
  int64_t values, in_bytes, out_bytes;  // per input block
  void (*fn)(const uint8_t*, uint8_t*);
};

BlockKind block_kind(GgufBlocks src) {
  switch (src) {
    case GgufBlocks::Q5_0: return {32, 22, 34, q5_0_to_q8_0};
    case GgufBlocks::Q4_K: return {256, 144, 160, q4_k_to_q4_1};
    case GgufBlocks::Q6_K: return {256, 210, 272, q6_k_to_q8_0};
  }
  return {1, 0, 0, nullptr};
}

}  // namespace

WType converted_type(GgufBlocks src) { return src == GgufBlocks::Q4_K ? WType::Q4_1 : WType::Q8_0; }

int64_t gguf_row_bytes(GgufBlocks src, int64_t cols) {
  const BlockKind k = block_kind(src);
  DT_CHECK(cols > 0 && cols % k.values == 0,
           "rows of " + std::to_string(cols) + " values are not whole blocks of " + std::to_string(k.values));
  return cols / k.values * k.in_bytes;
}

void convert_gguf_rows(GgufBlocks src, const uint8_t* in, int64_t rows, int64_t cols, uint8_t* out, int threads) {
  const BlockKind k = block_kind(src);
  const int64_t nb = cols / k.values, in_row = gguf_row_bytes(src, cols), out_row = nb * k.out_bytes;
  const int64_t per_chunk = std::max<int64_t>(1, 4096 / nb);  // about a million values a chunk
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  ThreadPool::instance().parallel_for(threads, chunks, [&](int64_t c) {
    for (int64_t r = c * per_chunk; r < std::min(rows, (c + 1) * per_chunk); ++r)
      for (int64_t b = 0; b < nb; ++b) k.fn(in + r * in_row + b * k.in_bytes, out + r * out_row + b * k.out_bytes);
  });
}

}  // namespace dovetail
