// The attention body for one (token, head), shared by the scalar and AVX2 paths. `Kern`
// supplies
//   void  tile_scores(const float* q, const KvT* tiles, int64_t n, int64_t Dh, float scale,
//                     float* out)   scores of the n * kKTile keys of n key tiles, times scale
//   void  axpy(float* out, float p, const KvT* v, int64_t Dh)     out += p * v
//   float exp(float)
// Scores are computed for every slot up to the token's last visible one, then the visible
// ones are listed in slot order (prefix, then ancestors), so a token sees the same sequence
// of operations whether its ancestors are committed or in the batch.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/quant_common.h"

namespace dovetail {

template <typename KvT, typename Kern>
inline void attention_one_impl(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  const int64_t Dh = a.Dh, group = a.H / a.KV, kvh = h / group;
  const float* q = a.q + (t * a.H + h) * Dh;
  const KvT* kbase = static_cast<const KvT*>(a.k) + kvh * a.S * Dh;
  const KvT* vbase = static_cast<const KvT*>(a.v) + kvh * a.S * Dh;
  const uint64_t* bits = a.anc + t * a.anc_words;
  const float scale = attention_scale(a);
  const int64_t last = a.n_prev + t;

  const int64_t lo = window_start(a, t);  // committed slots before it are outside the window

  // Pass 1: scores of every slot up to the last visible one; keep the visible ones.
  Kern::tile_scores(q, kbase, attention_stride(a.n_past + last + 1) / kKTile, Dh, scale, scores);
  if (a.softcap > 0) dovetail::softcap(scores, attention_stride(a.n_past + last + 1), a.softcap);
  if (lo > 0) std::memmove(scores, scores + lo, sizeof(float) * (a.n_past - lo));
  int64_t n = a.n_past - lo;
  auto visible = [&](int64_t j) { return ((bits[j >> 6] >> (j & 63)) & 1u) && !outside_window(a, t, j); };
  for (int64_t j = 0; j <= last; ++j)
    if (visible(j)) scores[n++] = scores[a.n_past + j];
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = scores[i] > mx ? scores[i] : mx;
  // Pass 2: softmax weights (sequential sum keeps the order fixed).
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = Kern::exp(scores[i] - mx);
    sum += scores[i];
  }
  const float inv = 1.0f / sum;
  // Pass 3: weighted sum of values.
  float* out = a.out + (t * a.H + h) * Dh;
  std::memset(out, 0, sizeof(float) * Dh);
  n = 0;
  for (int64_t s = lo; s < a.n_past; ++s) Kern::axpy(out, scores[n++] * inv, vbase + s * Dh, Dh);
  for (int64_t j = 0; j <= last; ++j) {
    if (!visible(j)) continue;
    Kern::axpy(out, scores[n++] * inv, vbase + (a.n_past + j) * Dh, Dh);
  }
}

template <template <typename> class Kern>
inline void attention_one_dispatch(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  if (a.kv_type == KvType::F32)
    attention_one_impl<float, Kern<float>>(a, t, h, scores);
  else
    attention_one_impl<uint16_t, Kern<uint16_t>>(a, t, h, scores);
}

// The value rows a weighted sum visits, in order: slot(i) = base + (idx ? idx[i] : i).
struct ValueSlots {
  int64_t base, n;
  const int32_t* idx;
  int64_t operator()(int64_t i) const { return base + (idx ? idx[i] : i); }
};

// f(std::integral_constant<int, nv>{}) for 1 <= nv <= 8.
template <typename F>
inline void with_nv(int64_t nv, F&& f) {
  switch (nv) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Rows 0 .. nr - 1 of out (each offset by f0) and p in groups of RG sharing one pass over
// the values: f(std::integral_constant<int, RG>{}, o, pr) for each full group, then
// f(std::integral_constant<int, 1>{}, o, pr) for each row left over.
template <int RG, typename F>
inline void for_row_groups(float* const* out, const float* const* p, int64_t nr, int64_t f0, F&& f) {
  float* o[RG];
  int64_t r = 0;
  for (; r + RG <= nr; r += RG) {
    for (int j = 0; j < RG; ++j) o[j] = out[r + j] + f0;
    f(std::integral_constant<int, RG>{}, o, p + r);
  }
  if constexpr (RG > 1) {
    for (; r < nr; ++r) {
      o[0] = out[r] + f0;
      f(std::integral_constant<int, 1>{}, o, p + r);
    }
  }
}

// --- The SIMD paths' driver: attention in chunks of keys -----------------------------------
// A row is (token r / G, head kvh * G + r % G) of KV head kvh, G = H / KV. Its visible keys
// (the prefix, then its visible scratch rows, in slot order) form a list, cut in chunks of
// kKChunk keys by their place in that list. Per chunk, a record [m, l, acc[Dh]]:
//   s_i = (q . k_i) / sqrt(Dh),  m = max s_i,  e_i = exp(s_i - m),  l = sum e_i,  acc = sum e_i v_i
// (l in vector lanes from the chunk's start, acc sequential in list order); the records are
// merged in list order (Rows::merge) and out = acc / l. The chunk boundaries depend only on
// a key's place in the row's list, so a token gets the same operations whether its ancestors
// are committed or in the batch, and whatever the thread split (batch invariance): the
// prefix's chunks may run on different threads (attention_chunk, the records merged after)
// or one after another in one item (attention_rows).
//
// `Rows` supplies
//   kTiles, scores<KT>(q, nr, tiles, Dh, scale, out)   out[r][16 j + l] for the KT key tiles
//       at `tiles`, one FMA chain per (row, key) in feature order (each tile read once for
//       all nr rows); KT is kTiles or 1
//   exp_sum(s, n, &m)     m = max of s[0 .. n), s[i] = exp(s[i] - m) in place; returns the sum
//   merge(run, rec, Dh)   run <- the softmax state of run's keys followed by rec's:
//       m = max(m_run, m_rec), x = exp(m_run - m), y = exp(m_rec - m),
//       l = fma(l_rec, y, l_run x), acc = fma(acc_rec, y, acc_run x) per feature
//   kLanes, values<NV>(out, p, nr, vbase, slots, Dh, f0)   features [f0, f0 + NV kLanes)
//       (or to Dh) of out[r] += p[r][i] v[slots(i)] for i = 0 .. slots.n - 1 in order (each
//       value row read once for all nr rows); NV <= 8
constexpr int64_t kKChunk = 128;  // a multiple of kKTile
constexpr int64_t kMaxRows = 16;  // query rows per driver
inline int64_t record_size(int64_t Dh) { return Dh + 2; }
// Records per row for the chunks from the last whole prefix chunk on.
inline int64_t tail_chunks(const AttentionArgs& a) { return (kKChunk - 1 + a.n_prev + a.T) / kKChunk + 1; }

inline void finish_record(const float* run, float* out, int64_t Dh) {
  const float inv = 1.0f / run[1];
  for (int64_t d = 0; d < Dh; ++d) out[d] = run[2 + d] * inv;
}

// A chunk whose keys are all outside the row's sliding window has the empty record
// (m = -inf): folding skips it, so the row's result is that of its visible chunks alone.
inline void empty_record(float* rec) {
  rec[0] = -INFINITY;
  rec[1] = 0.0f;
}

// run <- rec folded after it (the first non-empty record is copied); `started`: run holds one.
template <typename Rows>
inline void fold_record(float* run, const float* rec, int64_t Dh, bool& started) {
  if (rec[0] == -INFINITY) return;
  if (started) {
    Rows::merge(run, rec, Dh);
  } else {
    std::memcpy(run, rec, sizeof(float) * record_size(Dh));
    started = true;
  }
}

template <typename KvT, typename Rows>
class ChunkedRows {
 public:
  ChunkedRows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1)
      : a_(a), R_(r1 - r0), Dh_(a.Dh), W_(a.n_prev + a.T), base_(a.n_past / kKChunk * kKChunk),
        kbase_(static_cast<const KvT*>(a.k) + kvh * a.S * a.Dh),
        vbase_(static_cast<const KvT*>(a.v) + kvh * a.S * a.Dh), scale_(attention_scale(a)) {
    const int64_t G = a.H / a.KV, st = std::max(attention_stride(a.n_past + W_) - base_, kKChunk);
    static thread_local Buffer<float> score_buf;
    static thread_local std::vector<int32_t> vis;  // visible scratch rows, per row
    float* scores = tls_scratch(score_buf, (size_t)(R_ * st));
    vis.resize((size_t)(R_ * W_));
    for (int64_t r = 0; r < R_; ++r) {
      const int64_t t = (r0 + r) / G, h = kvh * G + (r0 + r) % G;
      q_[r] = a.q + (t * a.H + h) * Dh_;
      out_[r] = a.out + (t * a.H + h) * Dh_;
      sc_[r] = scores + r * st;
      vr_[r] = vis.data() + r * W_;
      const uint64_t* bits = a.anc + t * a.anc_words;
      int64_t n = 0;
      for (int64_t j = 0; j <= a.n_prev + t; ++j)
        if ((bits[j >> 6] >> (j & 63)) & 1u) vis[r * W_ + n++] = (int32_t)j;
      nvis_[r] = n;
      t_[r] = t;
      lo_[r] = window_start(a, t);
      lo_min_ = r == 0 ? lo_[r] : std::min(lo_min_, lo_[r]);
    }
  }

  int64_t whole_chunks() const { return base_ / kKChunk; }
  // Whether prefix chunk c lies outside every row's window (its records would be empty).
  bool outside(int64_t c) const { return (c + 1) * kKChunk <= lo_min_; }

  // The prefix's chunk c (slots [c, c + 1) kKChunk), every row: its record at rec[r].
  void prefix_chunk(int64_t c, float* const* rec) {
    score_tiles(c * kKChunk, kKChunk / kKTile);
    float* acc[kMaxRows];
    for (int64_t r = 0; r < R_; ++r) {
      const uint8_t* out = nullptr;  // the slots before the row's window
      if (lo_[r] > c * kKChunk) out = outside_mask(kKChunk, std::min(lo_[r] - c * kKChunk, kKChunk));
      start(rec[r], sc_[r], kKChunk, out);
      acc[r] = rec[r] + 2;
    }
    values(acc, sc_, R_, ValueSlots{c * kKChunk, kKChunk, nullptr});
  }

  // The rest of every row's list (the prefix past its whole chunks, then the row's visible
  // scratch rows): nk[r] records at recs + (r ld + k) record_size, k < nk[r] <= tail_chunks.
  void tail(float* recs, int64_t ld, int64_t* nk) {
    const int64_t np = a_.n_past - base_, rs = record_size(Dh_);
    score_tiles(base_, (attention_stride(a_.n_past + W_) - base_) / kKTile);
    auto rec = [&](int64_t r, int64_t k) { return recs + (r * ld + k) * rs; };
    for (int64_t r = 0; r < R_; ++r) {
      for (int64_t j = 0; j < nvis_[r]; ++j) sc_[r][np + j] = sc_[r][np + vr_[r][j]];
      const int64_t n = np + nvis_[r];
      nk[r] = (n + kKChunk - 1) / kKChunk;
      uint8_t* out = nullptr;  // the keys outside the row's window (prefix slots, then scratch rows)
      if (a_.window > 0) {
        out = outside_mask(n, std::clamp<int64_t>(lo_[r] - base_, 0, np));
        for (int64_t j = 0; j < nvis_[r]; ++j) out[np + j] = outside_window(a_, t_[r], vr_[r][j]);
      }
      for (int64_t k = 0; k < nk[r]; ++k) {
        const int64_t k0 = k * kKChunk;
        start(rec(r, k), sc_[r] + k0, std::min(n, k0 + kKChunk) - k0, out ? out + k0 : nullptr);
      }
    }
    if (np > 0) {  // the prefix keys, first in every row's first chunk
      float* acc[kMaxRows];
      for (int64_t r = 0; r < R_; ++r) acc[r] = rec(r, 0) + 2;
      values(acc, sc_, R_, ValueSlots{base_, np, nullptr});
    }
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t k = 0; k < nk[r]; ++k) {
        const int64_t lo = std::max(k * kKChunk, np), hi = std::min(np + nvis_[r], (k + 1) * kKChunk);
        if (hi <= lo) continue;
        float* o = rec(r, k) + 2;
        const float* p = sc_[r] + lo;
        values(&o, &p, 1, ValueSlots{a_.n_past, hi - lo, vr_[r] + (lo - np)});
      }
  }

  // Every chunk in list order, merged: the rows' outputs.
  void run() {
    const int64_t rs = record_size(Dh_), ld = tail_chunks(a_);
    static thread_local Buffer<float> rec_buf;
    float* runs = tls_scratch(rec_buf, (size_t)(R_ * (ld + 2) * rs));
    float* tmp = runs + R_ * rs;
    float* tails = tmp + R_ * rs;
    float* rec[kMaxRows];
    for (int64_t r = 0; r < R_; ++r) rec[r] = tmp + r * rs;
    const int64_t nc = whole_chunks();
    bool started[kMaxRows] = {};
    for (int64_t c = 0; c < nc; ++c) {
      if (outside(c)) continue;
      prefix_chunk(c, rec);
      for (int64_t r = 0; r < R_; ++r) fold_record<Rows>(runs + r * rs, rec[r], Dh_, started[r]);
    }
    int64_t nk[kMaxRows];
    tail(tails, ld, nk);
    for (int64_t r = 0; r < R_; ++r) {
      for (int64_t k = 0; k < nk[r]; ++k) fold_record<Rows>(runs + r * rs, tails + (r * ld + k) * rs, Dh_, started[r]);
      finish_record(runs + r * rs, out_[r], Dh_);
    }
  }

 private:
  // Scores of slots [s0, s0 + kKTile ntiles) (s0 a multiple of kKTile) into sc_[r][0 ..).
  void score_tiles(int64_t s0, int64_t ntiles) {
    const int64_t tile = Dh_ * kKTile;
    const KvT* k = kbase_ + s0 * Dh_;
    float* o[kMaxRows];
    auto at = [&](int64_t i) {
      for (int64_t r = 0; r < R_; ++r) o[r] = sc_[r] + i * kKTile;
      return o;
    };
    int64_t i = 0;
    for (; i + Rows::kTiles <= ntiles; i += Rows::kTiles)
      Rows::template scores<Rows::kTiles>(q_, R_, k + i * tile, Dh_, scale_, at(i));
    for (; i < ntiles; ++i) Rows::template scores<1>(q_, R_, k + i * tile, Dh_, scale_, at(i));
    if (a_.softcap > 0)
      for (int64_t r = 0; r < R_; ++r) dovetail::softcap(sc_[r], ntiles * kKTile, a_.softcap);
  }
  // The record of the scores s[0 .. n), turned into softmax weights in place. The keys
  // with out[i] set (out may be null: none) are outside the sliding window: they keep their
  // places in the key list, so a token's chunks are the same whether those keys are
  // committed or in the batch, with weight zero; a chunk of such keys only has the empty record.
  void start(float* rec, float* s, int64_t n, const uint8_t* out = nullptr) {
    int64_t visible = n;
    for (int64_t i = 0; out && i < n; ++i) {
      if (!out[i]) continue;
      s[i] = -INFINITY;
      --visible;
    }
    if (visible == 0) {
      empty_record(rec);
    } else {
      float m;
      rec[1] = Rows::exp_sum(s, n, &m);
      rec[0] = m;
    }
    for (int64_t i = 0; out && i < n; ++i)
      if (out[i]) s[i] = 0.0f;  // (exp_ps's floor is ~1e-38, not 0)
    std::memset(rec + 2, 0, sizeof(float) * Dh_);
  }
  // A thread's mask of n keys, the first `before` of them set.
  static uint8_t* outside_mask(int64_t n, int64_t before) {
    static thread_local std::vector<uint8_t> mask;
    mask.assign((size_t)n, 0);
    std::fill(mask.begin(), mask.begin() + before, 1);
    return mask.data();
  }
  // The features in chunks of at most 8 registers per row.
  void values(float* const* o, const float* const* p, int64_t nr, const ValueSlots& slots) {
    for (int64_t f0 = 0; f0 < Dh_; f0 += 8 * Rows::kLanes) {
      const int64_t nv = std::min<int64_t>(8, (Dh_ - f0 + Rows::kLanes - 1) / Rows::kLanes);
      with_nv(nv, [&](auto NV) { Rows::template values<decltype(NV)::value>(o, p, nr, vbase_, slots, Dh_, f0); });
    }
  }

  const AttentionArgs& a_;
  const int64_t R_, Dh_, W_, base_;
  int64_t lo_[kMaxRows] = {}, lo_min_ = 0;  // each row's first committed slot in its window
  int64_t t_[kMaxRows] = {};                 // each row's token
  const KvT* kbase_;
  const KvT* vbase_;
  const float scale_;
  const float* q_[kMaxRows];
  float* out_[kMaxRows];
  float* sc_[kMaxRows];
  const int32_t* vr_[kMaxRows];
  int64_t nvis_[kMaxRows];
};

// The ISA files' entry points, for one KvT:
// rows r0 .. r1 (at most kMaxRows) of KV head kvh, every chunk (attention_rows);
template <typename KvT, typename Rows>
void attention_rows_run(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  ChunkedRows<KvT, Rows>(a, kvh, r0, r1).run();
}

// every row of KV head kvh, chunk c of the prefix or, for c = n_past / kKChunk, the tail, in
// blocks of kMaxRows rows (the chunk's keys stay in cache across them): records at parts +
// ((kvh T G + r) nc + chunk) record_size, each row's record count in counts[kvh T G + r]
// (attention_chunk);
template <typename KvT, typename Rows>
void attention_chunk_run(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts) {
  const int64_t R = a.T * (a.H / a.KV), rs = record_size(a.Dh);
  for (int64_t b = 0; b < R; b += kMaxRows) {
    const int64_t nb = std::min(kMaxRows, R - b);
    ChunkedRows<KvT, Rows> rows(a, kvh, b, b + nb);
    const int64_t c0 = rows.whole_chunks();
    float* first = parts + ((kvh * R + b) * nc) * rs;  // row b's first record
    if (c < c0) {
      float* rec[kMaxRows];
      for (int64_t r = 0; r < nb; ++r) rec[r] = first + (r * nc + c) * rs;
      if (rows.outside(c)) {
        for (int64_t r = 0; r < nb; ++r) empty_record(rec[r]);
      } else {
        rows.prefix_chunk(c, rec);
      }
      continue;
    }
    int64_t nk[kMaxRows];
    rows.tail(first + c0 * rs, nc, nk);
    for (int64_t r = 0; r < nb; ++r) counts[kvh * R + b + r] = c0 + nk[r];
  }
}

// the records of attention_chunk merged in order into the outputs (attention_merge).
template <typename Rows>
void attention_merge_run(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts) {
  const int64_t G = a.H / a.KV, R = a.T * G, rs = record_size(a.Dh);
  for (int64_t kvh = 0; kvh < a.KV; ++kvh)
    for (int64_t r = 0; r < R; ++r) {
      float* run = parts + (kvh * R + r) * nc * rs;
      bool started = run[0] != -INFINITY;
      for (int64_t c = 1; c < counts[kvh * R + r]; ++c) fold_record<Rows>(run, run + c * rs, a.Dh, started);
      const int64_t t = r / G, h = kvh * G + r % G;
      finish_record(run, a.out + (t * a.H + h) * a.Dh, a.Dh);
    }
}

// The ISA files' three entry points for their `Rows<KvT>`, dispatched on the cache's type.
template <template <typename> class Rows>
struct AttentionEntries {
  static void rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
    if (a.kv_type == KvType::F32)
      attention_rows_run<float, Rows<float>>(a, kvh, r0, r1);
    else
      attention_rows_run<uint16_t, Rows<uint16_t>>(a, kvh, r0, r1);
  }
  static void chunk(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts) {
    if (a.kv_type == KvType::F32)
      attention_chunk_run<float, Rows<float>>(a, kvh, c, parts, nc, counts);
    else
      attention_chunk_run<uint16_t, Rows<uint16_t>>(a, kvh, c, parts, nc, counts);
  }
  static void merge(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts) {
    if (a.kv_type == KvType::F32)
      attention_merge_run<Rows<float>>(a, parts, nc, counts);
    else
      attention_merge_run<Rows<uint16_t>>(a, parts, nc, counts);
  }
};

}  // namespace dovetail
