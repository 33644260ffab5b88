// CPU ops of the target engine. Each op has a scalar reference here (cpu/*.cpp) and
// SIMD versions under cpu/x86/{avx2,avx512}/; the dispatcher picks by active_isa().
//
// Legend: T rows (tokens), K input features, N output features, H query heads,
// KV key/value heads, Dh head dim, S KV slots.
//
// Batch invariance: every op computes each output row with the same sequence of
// floating-point operations whatever T is, so a token's result is bitwise identical
// alone, in a prefill chunk or inside a tree. Threads split rows, never reductions.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/buffer.h"
#include "common/cpu_features.h"
#include "common/dtype.h"

namespace dovetail {

// A weight matrix [N, K] (PyTorch Linear layout) in its stored format, copied once into
// engine-owned, 64-byte aligned memory.
//
// Float formats (f32, f16, bf16) are repacked into panels of 16 rows too: by column (f32,
// f16) or by column pair (bf16, the operand layout of vdpbf16ps); see quant_common.h.
// Quantized formats (GGUF blocks of 32 columns: q8_0, q4_0, q4_1) are repacked into panels
// of kPanel = 16 rows, so one SIMD register holds the same 4 columns of 16 rows and the
// matmul reads each block once for all rows of the panel and all tokens (quant_common.h).
// The values are exactly the stored ones; rows past N in the last panel are zero.
struct PackedWeight {
  WType type = WType::F32;
  int64_t rows = 0, cols = 0;
  int64_t row_bytes = 0;  // bytes of one row as stored in GGUF
  Buffer<uint8_t> data;
};

// `src` holds rows*row_bytes bytes laid out like GGUF (rows contiguous).
PackedWeight pack_weight(WType type, int64_t rows, int64_t cols, const void* src, size_t src_bytes);

// GGUF block types the kernels do not execute, rewritten row by row into ones they do
// (python/dovetail_ext/formats/convert.py holds the numpy twins, bit for bit):
//   Q5_0 -> q8_0 (exact), Q4_K -> q4_1 (float16 sub-block scale and offset), Q6_K -> q8_0
//   (decoded, then ggml's Q8_0 quantizer). `in` is [rows, row bytes] as stored, `out`
//   [rows, row bytes of the result]; cols must be a multiple of the block (32, 256, 256).
enum class GgufBlocks { Q5_0, Q4_K, Q6_K };
WType converted_type(GgufBlocks src);
int64_t gguf_row_bytes(GgufBlocks src, int64_t cols);
void convert_gguf_rows(GgufBlocks src, const uint8_t* in, int64_t rows, int64_t cols, uint8_t* out, int threads);

// A new PackedWeight holding rows[0..n) of w, in that order (same format).
PackedWeight select_rows(const PackedWeight& w, const int32_t* rows, int64_t n);

// Activations quantized to int8 per block of 32 (for integer dot products against
// quantized weights): q = rint(x * 127/amax), d = amax/127, ds = d * sum(q) per block,
// interleaved by tiles of kActTile tokens for the panel kernels: for tile g, block b, token
// i of the tile, 32 bytes of q at qi + ((g*nb + b)*kActTile + i)*32, d and ds at
// di / dsi[(g*nb + b)*kActTile + i] (act_slot; tokens past T are zero).
//
// For bf16 weights the activations are instead rounded to bf16 (nearest even, as
// fp32_to_bf16) and kept as column pairs: b[t * K2 + j] holds columns 2j (low half) and
// 2j + 1 of token t, K2 = bf16_pairs(K), zero padded.
constexpr int kActTile = 8;
struct QActs {
  int64_t T = 0, K = 0, K2 = 0;
  Buffer<uint32_t> b;  // [T, K2] bf16 pairs
  Buffer<int8_t> qi;   // [ceil(T/8), K/32, 8, 32] codes
  Buffer<float> di;    // [ceil(T/8), K/32, 8] scales d
  Buffer<float> dsi;   // [ceil(T/8), K/32, 8] d * sum(codes)
  void reserve(int64_t max_T, int64_t max_K);
};
inline int64_t act_slot(int64_t t, int64_t b, int64_t nb) {
  return ((t / kActTile) * nb + b) * kActTile + t % kActTile;
}
void quantize_acts(const float* x, int64_t T, int64_t K, QActs& out, int nthreads);
void bf16_acts(const float* x, int64_t T, int64_t K, QActs& out);
// k floats x[i * stride] -> k2 >= ceil(k / 2) bf16 pairs (fp32_to_bf16: nearest even, NaN
// kept quiet; column 2j in the low half), zero padded. The AVX-512 path converts contiguous
// rows 16 values at a time, with the same bits.
void bf16_pair_row(const float* x, int64_t stride, int64_t k, uint32_t* out, int64_t k2);
// What linear() needs of x for weight w: quantize_acts (quantized formats), bf16_acts
// (bf16) or nothing (f32, f16).
void prepare_acts(const PackedWeight& w, const float* x, int64_t T, QActs& out, int nthreads);

// y[t, n] = sum_k x[t, k] * W[n, k] for t < T. `qa` must hold x prepared for W
// (prepare_acts) when W is quantized or bf16 (it may be null otherwise). y has leading
// dimension ldy. Float weights: each output is two fp32 sums of fused multiply-adds, over
// the even and the odd columns (f32, f16) or column pairs (bf16) in order, added at the
// end; the same on every ISA path. bf16 weights multiply bf16-rounded activations: each
// product is exact in fp32 and added as vdpbf16ps does (the pair's odd column first).
void linear(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
            int64_t ldy, int nthreads);

// One row of W as fp32 (embedding lookup).
void dequantize_row(const PackedWeight& w, int64_t r, float* out);

// y = x * rsqrt(mean(x^2) + eps) * w, rows of length D.
void rmsnorm(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps);

// Rotate-half RoPE in place on x [T, H, Dh] (row stride ld floats) with tables
// cos/sin [S, Dh/2] indexed by positions[t].
void rope_inplace(float* x, int64_t T, int64_t H, int64_t Dh, int64_t ld, const int32_t* positions,
                  const float* cos_tab, const float* sin_tab);

// RoPE tables cos/sin [S, Dh/2] for positions 0..S-1: angle = pos * inv_freq[i],
// inv_freq[i] = theta^(-2i/Dh) / factors[i] (factors: Dh/2 divisors, LLaMA 3's "llama3"
// frequency scaling; null: none), computed in double precision and rounded once to fp32;
// both tables times mscale (LongRoPE's attention factor; 1: none).
void rope_tables(double theta, int64_t Dh, int64_t S, std::vector<float>& cos_tab, std::vector<float>& sin_tab,
                 const float* factors = nullptr, double mscale = 1.0);

// out = silu(g) * u, n values.
void swiglu(const float* g, const float* u, float* out, int64_t n);
// out = gelu_tanh(g) * u (GeGLU, Gemma), as g / (1 + exp(-a(g))) * u (common/gelu.h).
void geglu(const float* g, const float* u, float* out, int64_t n);
// Soft-capping (Gemma 2), in place: x = cap tanh(x / cap), as cap (2 / (1 + exp(-2 x / cap)) - 1).
void softcap(float* x, int64_t n, float cap);

// Dynamic Gating Fusion, row-wise over D channels (see common/dgf_math.h):
// h2 = SiLU(a); g = sigmoid(zpre) * h1 + (1 - sigmoid(zpre)) * h2.
void dgf_silu_rows(const float* a, float* h2, int64_t D);
void dgf_mix_rows(const float* h1, const float* h2, const float* zpre, float* g, int64_t D);

// For each of n rows of logits [n, V]: the k largest entries as log-probabilities
// (logit - logsumexp), best first, ties broken by the lower token id.
void topk_log_softmax(const float* logits, int64_t n, int64_t V, int64_t k, int32_t* ids, float* logp,
                      int nthreads);
// For each of n rows of x [n, V] (V >= 1): the index of its first maximum (numpy's argmax
// for finite values).
void argmax_rows(const float* x, int64_t n, int64_t V, int64_t* out);

// The shifted exponentials of one row: z = (x[i] - m) * s, e[i] = exp(z) by the polynomial
// of exp_poly.h for z >= exp_poly::kMin and exactly 0 below (-inf included); e may be null.
// Adds e[i] to lanes[i % 16] (double, in index order), so the sum's rounding is the same
// on every ISA path: lane_total() then adds the 16 lanes in order. Returns false if some z
// is NaN (a NaN in x, or m or s not finite).
bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes);
double lane_total(const double* lanes);

// The sampling distribution of one row of logits x [V]: e = exp((x - max) / temperature)
// as above (1 / temperature taken in float); top_k > 0 keeps the top_k largest e (ties at
// the k-th kept); top_p < 1 then keeps, in descending order, each token whose preceding
// mass (a running double sum of e / sum) is below top_p, and every token tied with the last
// one kept. Outputs the tokens of nonzero probability in increasing id order and their
// probabilities e / (sum of the kept e). Throws ValueError on NaN or +inf in x, on a row
// with no finite entry, and when 1 / temperature overflows.
void sampling_dist(const float* x, int64_t V, double temperature, int64_t top_k, double top_p,
                   std::vector<int32_t>& ids, std::vector<double>& probs);
// One token of (ids, probs) for a uniform u in [0, 1): the first whose running probability
// sum exceeds u times the whole sum (both sums sequential in double, numpy's cumsum).
int32_t draw_from(const std::vector<int32_t>& ids, const std::vector<double>& probs, double u);

enum class KvType : int { F32 = 0, BF16 = 1 };

// Grouped-query attention over one layer's cache for a batch of T new tokens.
// k: [KV, S / kKTile, Dh, kKTile] in kv_type: keys in tiles of kKTile slots, transposed, so
// one vector load gives one feature of kKTile keys (S a multiple of kKTile; see k_offset).
// v: [KV, S, Dh] in kv_type. Slots [0, n_past) are the committed prefix and slot n_past + j
// holds scratch row j: rows [0, n_prev) come from earlier calls, row n_prev + t is batch
// token t. Token t attends to the prefix and to the scratch rows j <= n_prev + t whose bit
// is set in its ancestor bitset (anc + t * anc_words). q: [T, H*Dh] (roped), out:
// [T, H*Dh]. scratch: nthreads * attention_stride(n_past + n_prev + T) floats.
//
// Every score is one sequential chain of fused multiply-adds over the features (the same
// on every path and for every tile position), and the softmax and the weighted sum run
// over the list of visible keys in slot order (on the SIMD paths in chunks of 128 keys of
// that list, merged in order), so a token's output does not depend on the batch it is in
// or on the thread split (batch invariance).
constexpr int64_t kKTile = 16;
inline int64_t k_offset(int64_t slot, int64_t d, int64_t Dh) {
  return (slot / kKTile) * Dh * kKTile + d * kKTile + slot % kKTile;
}
inline int64_t attention_stride(int64_t keys) { return (keys + kKTile - 1) / kKTile * kKTile; }
struct AttentionArgs {
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  KvType kv_type = KvType::F32;
  int64_t S = 0, n_past = 0, n_prev = 0, T = 0, H = 0, KV = 0, Dh = 0;
  const uint64_t* anc = nullptr;
  int64_t anc_words = 0;
  float* out = nullptr;
  float* scratch = nullptr;
  // Sliding window (Gemma 3's local layers): with window > 0, token t sees only the keys
  // whose position is above positions[t] - window: the committed slots from
  // positions[t] - window + 1 on (a committed slot's position is its index) and the
  // visible scratch rows j with scratch_positions[j] in the window.
  int64_t window = 0;
  const int32_t* positions = nullptr;          // [T]
  const int32_t* scratch_positions = nullptr;  // [n_prev + T]
  // The scores' scale (0: 1 / sqrt(Dh); Gemma's 27B models: query_pre_attn_scalar^-1/2), and
  // Gemma 2's soft-capping of every scaled score to softcap tanh(score / softcap) (0: none).
  float scale = 0.0f;
  float softcap = 0.0f;
};
inline float attention_scale(const AttentionArgs& a) { return a.scale > 0 ? a.scale : 1.0f / std::sqrt((float)a.Dh); }
// Whether scratch row j is outside token t's window.
inline bool outside_window(const AttentionArgs& a, int64_t t, int64_t j) {
  return a.window > 0 && (int64_t)a.scratch_positions[j] <= (int64_t)a.positions[t] - a.window;
}
// The first committed slot token t sees (0 without a window).
inline int64_t window_start(const AttentionArgs& a, int64_t t) {
  if (a.window <= 0) return 0;
  const int64_t lo = (int64_t)a.positions[t] - a.window + 1;
  return lo < 0 ? 0 : lo > a.n_past ? a.n_past : lo;
}
void attention(const AttentionArgs& a, int nthreads);

// --- ISA kernels (implemented in cpu/x86/*; declared here for the dispatchers) ----------
// quantize_block: one block of kQBlock floats -> int8 codes (round half to even, clamped
// to [-127, 127]) with scale amax / 127 (0 for an all-zero block); returns the codes' sum.
// The SIMD versions give the scalar one's results bit for bit (NaN inputs included).
namespace scalar {
int quantize_block(const float* x, int8_t* q, float* d);
void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1);
void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores);
}  // namespace scalar
// argmax: the first index of the row's maximum (n >= 1, values finite): the maximum in
// one vector pass, then the first block holding it.
namespace avx2 {
int quantize_block(const float* x, int8_t* q, float* d);
bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes);
void swiglu(const float* g, const float* u, float* out, int64_t n);
void geglu(const float* g, const float* u, float* out, int64_t n);
void softcap(float* x, int64_t n, float cap);
int64_t argmax(const float* x, int64_t n);
// Quantized weights: pmaddubsw block sums (Isa::Avx2), or vpdpbusd on 256-bit registers
// (Isa::AvxVnni): linear_rows_vnni in AVX-VNNI's VEX encoding, linear_rows_vnni_evex in
// AVX512_VNNI + VL's. The same sums, so the same bits; float weights the same in all three.
void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1);
void linear_rows_vnni(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                      int64_t ldy, int64_t r0, int64_t r1);
void linear_rows_vnni_evex(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                           int64_t ldy, int64_t r0, int64_t r1);
void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores);
// As avx512::attention_rows / attention_chunk / attention_merge; Dh a multiple of 8.
void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1);
void attention_chunk(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts);
void attention_merge(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts);
}  // namespace avx2
namespace avx512 {
// The nb blocks of one row, each as quantize_block: block b's codes to q + b * q_stride,
// its scale to d[b * stride] and scale * sum of codes to ds[b * stride].
void quantize_row(const float* x, int64_t nb, int8_t* q, int64_t q_stride, float* d, float* ds, int64_t stride);
// n floats -> n bf16 (fp32_to_bf16 bit for bit), stored as n / 2 column pairs (n even).
void round_bf16(const float* x, int64_t n, uint32_t* out);
bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes);
int64_t argmax(const float* x, int64_t n);
// out = silu(g) * u with a polynomial exp (within 2 ulp of expf); every element, the
// tail's included, goes through the same vector code, so a value's result does not depend
// on where it sits (batch invariance). geglu likewise.
void swiglu(const float* g, const float* u, float* out, int64_t n);
void geglu(const float* g, const float* u, float* out, int64_t n);
void softcap(float* x, int64_t n, float cap);
// bf16 weights: linear_rows runs vdpbf16ps's sums as two FMAs (Isa::Avx512), and
// linear_rows_dpbf16 runs vdpbf16ps (Isa::Avx512Bf16); the other types are the same in both.
void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1);
void linear_rows_dpbf16(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                        int64_t ldy, int64_t r0, int64_t r1);
// Query rows r0..r1 (at most 16) of KV head kvh, row r = (token r / G, head kvh * G + r % G),
// G = H / KV: every key chunk in order (attention_impl.h).
void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1);
// Every row of KV head kvh, one key chunk: c < n_past / 128 a whole chunk of the prefix,
// c = n_past / 128 the rest; its softmax records go to parts (nc per row), with each
// row's record count in counts. attention_merge then merges them into the outputs.
void attention_chunk(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts);
void attention_merge(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts);
}  // namespace avx512

}  // namespace dovetail
