// AVX-512 tree attention. One work item is a run of query rows (token t, head h) that share
// a KV head; each block of 16 keys is read once for all of them. Per row:
//   s_i = (q . k_i) / sqrt(Dh)      over the visible keys i (prefix, then ancestors, in slot order)
//   p_i = exp(s_i - max) / sum      out = sum_i p_i v_i
// Every row is computed by the same instruction sequence whatever its neighbours, the batch
// size or the thread split (batch invariance): a score is 4-lane-group FMAs and a fixed
// lane-sum tree; the sums run over the compacted list of visible keys in 16-wide chunks
// from its start; the weighted sum of values is sequential in that list's order.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_impl.h"
#include "cpu/quant_common.h"
#include "cpu/x86/avx512_common.h"

namespace dovetail::avx512 {

namespace {

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <typename KvT>
struct Kern {
  static float dot(const float* q, const KvT* k, int64_t Dh) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < Dh; i += 16) {
      const __mmask16 m = Dh - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - i)) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(k + i, m), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t i = 0; i < Dh; i += 16) {
      const __mmask16 m = Dh - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - i)) - 1);
      _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(pv, load16(v + i, m), _mm512_maskz_loadu_ps(m, out + i)));
    }
  }
  static float exp(float x) { return std::exp(x); }
};

using x86::exp_ps;

inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xEE)));
}
inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Scores of up to 16 keys (rows keys[0..n) of Dh values) against q (Dh <= 128), times scale.
template <typename KvT>
inline void scores16(const float* q, const KvT* const* keys, int n, int64_t Dh, float scale, float* out) {
  __m512 qv[8];
  const int nv = (int)((Dh + 15) / 16);
  for (int i = 0; i < nv; ++i) {
    const __mmask16 m = Dh - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - 16 * i)) - 1);
    qv[i] = _mm512_maskz_loadu_ps(m, q + 16 * i);
  }
  __m256 f[16];
  for (int j = 0; j < 16; ++j) {
    if (j >= n) {
      f[j] = _mm256_setzero_ps();
      continue;
    }
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < nv; ++i) {
      const __mmask16 m = Dh - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - 16 * i)) - 1);
      acc = _mm512_fmadd_ps(qv[i], load16(keys[j] + 16 * i, m), acc);
    }
    f[j] = fold(acc);
  }
  const __m512 s = _mm512_insertf32x8(_mm512_castps256_ps512(hsum8(f)), hsum8(f + 8), 1);
  _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_mul_ps(s, _mm512_set1_ps(scale)));
}

template <typename KvT>
void attention_rows_impl(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  const int64_t Dh = a.Dh, G = a.H / a.KV, stride = a.n_past + a.n_prev + a.T, R = r1 - r0;
  const KvT* kbase = static_cast<const KvT*>(a.k) + kvh * a.S * Dh;
  const KvT* vbase = static_cast<const KvT*>(a.v) + kvh * a.S * Dh;
  const float scale = 1.0f / std::sqrt((float)Dh);
  static thread_local Buffer<float> score_buf;
  static thread_local std::vector<int32_t> vis;  // visible scratch rows, per row
  static thread_local std::vector<int64_t> nvis;
  float* scores = tls_scratch(score_buf, (size_t)(R * (stride + 16)));
  vis.resize((size_t)(R * (a.n_prev + a.T)));
  nvis.resize((size_t)R);
  auto row_t = [&](int64_t r) { return (r0 + r) / G; };
  auto row_h = [&](int64_t r) { return kvh * G + (r0 + r) % G; };
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = row_t(r);
    const uint64_t* bits = a.anc + t * a.anc_words;
    int64_t n = 0;
    for (int64_t j = 0; j <= a.n_prev + t; ++j)
      if ((bits[j >> 6] >> (j & 63)) & 1u) vis[r * (a.n_prev + a.T) + n++] = (int32_t)j;
    nvis[r] = n;
  }
  // Scores: prefix blocks of 16 keys outermost, so each block is read once for all rows.
  const KvT* kp[16];
  for (int64_t s0 = 0; s0 < a.n_past; s0 += 16) {
    const int n = (int)std::min<int64_t>(16, a.n_past - s0);
    for (int j = 0; j < n; ++j) kp[j] = kbase + (s0 + j) * Dh;
    for (int64_t r = 0; r < R; ++r)
      scores16(a.q + (row_t(r) * a.H + row_h(r)) * Dh, kp, n, Dh, scale, scores + r * (stride + 16) + s0);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int32_t* vr = vis.data() + r * (a.n_prev + a.T);
    for (int64_t i0 = 0; i0 < nvis[r]; i0 += 16) {
      const int n = (int)std::min<int64_t>(16, nvis[r] - i0);
      for (int j = 0; j < n; ++j) kp[j] = kbase + (a.n_past + vr[i0 + j]) * Dh;
      scores16(a.q + (row_t(r) * a.H + row_h(r)) * Dh, kp, n, Dh, scale, scores + r * (stride + 16) + a.n_past + i0);
    }
  }
  // Softmax over each row's compacted list of n = n_past + nvis scores.
  for (int64_t r = 0; r < R; ++r) {
    float* sc = scores + r * (stride + 16);
    const int64_t n = a.n_past + nvis[r];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, sc + i));
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + i), mv)));
      _mm512_mask_storeu_ps(sc + i, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    __m256 f[8] = {fold(sum), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const float inv = 1.0f / _mm256_cvtss_f32(hsum8(f));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(sc + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sc + i), _mm512_set1_ps(inv)));
    }
  }
  // Weighted values: sequential over each row's list; rows accumulate in their output.
  const int nv = (int)((Dh + 15) / 16);
  for (int64_t r = 0; r < R; ++r) std::memset(a.out + (row_t(r) * a.H + row_h(r)) * Dh, 0, sizeof(float) * Dh);
  auto accumulate = [&](int64_t r, const float* p, const KvT* const* vals, int n) {
    float* out = a.out + (row_t(r) * a.H + row_h(r)) * Dh;
    __m512 acc[8];
    for (int i = 0; i < nv; ++i) {
      const __mmask16 m = Dh - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - 16 * i)) - 1);
      acc[i] = _mm512_maskz_loadu_ps(m, out + 16 * i);
    }
    for (int j = 0; j < n; ++j) {
      const __m512 pv = _mm512_set1_ps(p[j]);
      for (int i = 0; i < nv; ++i) {
        const __mmask16 m = Dh - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - 16 * i)) - 1);
        acc[i] = _mm512_fmadd_ps(pv, load16(vals[j] + 16 * i, m), acc[i]);
      }
    }
    for (int i = 0; i < nv; ++i) {
      const __mmask16 m = Dh - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - 16 * i)) - 1);
      _mm512_mask_storeu_ps(out + 16 * i, m, acc[i]);
    }
  };
  for (int64_t s0 = 0; s0 < a.n_past; s0 += 16) {
    const int n = (int)std::min<int64_t>(16, a.n_past - s0);
    for (int j = 0; j < n; ++j) kp[j] = vbase + (s0 + j) * Dh;
    for (int64_t r = 0; r < R; ++r) accumulate(r, scores + r * (stride + 16) + s0, kp, n);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int32_t* vr = vis.data() + r * (a.n_prev + a.T);
    for (int64_t i0 = 0; i0 < nvis[r]; i0 += 16) {
      const int n = (int)std::min<int64_t>(16, nvis[r] - i0);
      for (int j = 0; j < n; ++j) kp[j] = vbase + (a.n_past + vr[i0 + j]) * Dh;
      accumulate(r, scores + r * (stride + 16) + a.n_past + i0, kp, n);
    }
  }
}

}  // namespace

void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<Kern>(a, t, h, scores);
}

void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  if (a.kv_type == KvType::F32)
    attention_rows_impl<float>(a, kvh, r0, r1);
  else
    attention_rows_impl<uint16_t>(a, kvh, r0, r1);
}

}  // namespace dovetail::avx512
