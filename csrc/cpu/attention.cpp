// Tree / causal attention over the KV cache: scalar kernels and the dispatcher.
#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/thread_pool.h"
#include "cpu/attention_impl.h"
#include "cpu/ops.h"

namespace dovetail {

namespace {

inline float kv_load(float x) { return x; }
inline float kv_load(uint16_t x) { return bf16_to_fp32(x); }

template <typename KvT>
struct ScalarKern {
  static void tile_scores(const float* q, const KvT* tiles, int64_t n, int64_t Dh, float scale, float* out) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t l = 0; l < kKTile; ++l) {
        const KvT* k = tiles + i * Dh * kKTile + l;
        float acc = 0.0f;
        for (int64_t d = 0; d < Dh; ++d) acc = std::fma(q[d], kv_load(k[d * kKTile]), acc);
        out[i * kKTile + l] = acc * scale;
      }
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    for (int64_t i = 0; i < Dh; ++i) out[i] += p * kv_load(v[i]);
  }
  static float exp(float x) { return std::exp(x); }
};

}  // namespace

namespace scalar {
void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<ScalarKern>(a, t, h, scores);
}
}  // namespace scalar

void attention(const AttentionArgs& a, int nthreads) {
  const bool rows512 = is_avx512(active_isa());
  const bool rows256 = is_avx2(active_isa()) && a.Dh % 8 == 0;
  if (rows512 || rows256) {
    const int64_t G = a.H / a.KV, rows = a.T * G, nt = std::max(nthreads, 1), c0 = a.n_past / kKChunk;
    const bool tiny = a.T * a.H * (a.n_past + a.n_prev + a.T) * a.Dh < (1 << 15);
    const int64_t nc = c0 + tail_chunks(a), part_floats = a.KV * rows * nc * record_size(a.Dh);
    if (!tiny && nt > 1 && rows <= 4 * kMaxRows && c0 * a.KV >= 2 * nt && part_floats <= (1 << 22)) {
      // A decode step or a tree (up to 64 rows per KV head) after at least two whole key
      // chunks per thread: one item per (KV head, key chunk), so the threads share the keys
      // (each read once) instead of each reading all of them for its own rows. The chunks'
      // records are merged after, in the order the row items below merge them (the same
      // results). At 2 threads this made a whole target call 7-8% faster after 256 tokens
      // and about 20% faster after 512-1024 (bench/KERNELS.md).
      const int64_t items = a.KV * (c0 + 1);
      static thread_local Buffer<float> part_buf;
      static thread_local std::vector<int64_t> count_buf;
      // (Plain pointers for the lambda: in a worker, a thread_local name is the worker's own.)
      float* parts = tls_scratch(part_buf, (size_t)part_floats);
      count_buf.assign((size_t)(a.KV * rows), 0);
      int64_t* counts = count_buf.data();
      const auto chunk = rows512 ? avx512::attention_chunk : avx2::attention_chunk;
      ThreadPool::instance().parallel_for((int)std::min<int64_t>(nt, items), items, [&](int64_t i) {
        chunk(a, i / (c0 + 1), i % (c0 + 1), parts, nc, counts);
      });
      (rows512 ? avx512::attention_merge : avx2::attention_merge)(a, parts, nc, counts);
      return;
    }
    // Items: runs of up to 16 query rows sharing a KV head; as few as give every thread the
    // same number of items (at least two each), so the threads finish together.
    int64_t per_kv = (rows + 15) / 16;
    for (int64_t pk = per_kv; pk <= std::min<int64_t>(rows, 4 * per_kv + nt); ++pk)
      if (pk * a.KV >= 2 * nt && pk * a.KV % nt == 0) {
        per_kv = pk;
        break;
      }
    const int64_t per = (rows + per_kv - 1) / per_kv, items = ((rows + per - 1) / per) * a.KV;
    per_kv = items / a.KV;
    const auto fn = rows512 ? avx512::attention_rows : avx2::attention_rows;
    ThreadPool::instance().parallel_for(tiny ? 1 : (int)std::min<int64_t>(nthreads, items), items, [&](int64_t i) {
      const int64_t kvh = i / per_kv, r0 = (i % per_kv) * per;
      fn(a, kvh, r0, std::min(rows, r0 + per));
    });
    return;
  }
  using Fn = void (*)(const AttentionArgs&, int64_t, int64_t, float*);
  const Fn fn = is_avx2(active_isa()) ? avx2::attention_one : scalar::attention_one;  // (AVX2: Dh % 8 != 0)
  // One (token, head) per item; each chunk uses its own slice of the score scratch.
  const int64_t work = a.T * a.H, stride = attention_stride(a.n_past + a.n_prev + a.T);
  const bool tiny = work * stride * a.Dh < (1 << 15);  // not worth another thread
  const int nt = tiny ? 1 : (int)std::min<int64_t>(nthreads, work);
  const int64_t chunks = std::min<int64_t>(work, nt);
  const int64_t step = (work + chunks - 1) / chunks;
  ThreadPool::instance().parallel_for(nt, chunks, [&](int64_t c) {
    float* scores = a.scratch + c * stride;
    for (int64_t i = c * step; i < std::min(work, (c + 1) * step); ++i) fn(a, i / a.H, i % a.H, scores);
  });
}

}  // namespace dovetail
