// DaViT CPU kernels: scalar reference tile routines, the ISA dispatcher, and the fused
// drivers (window attention, channel attention, MLP) that schedule GEMM tiles and attention
// tasks over OpenMP threads. Layout and semantics: see davit.h.
#include "cpu/davit.h"
#include "cpu/davit_rows.h"
#include "cpu/davit_window.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>

// Threads: the project's contention-tolerant pool. The drivers below only use fork-join
// parallel_for over independent tasks, each task computing whole outputs, so results
// never depend on which thread ran what.
#include "common/thread_pool.h"

#include "common/cpu_features.h"
#include "common/error.h"

namespace dovetail::davit {

// ---- scalar reference ----------------------------------------------------------------------
namespace scalar {

void gemm_tile(const GemmTile& t) {
  // Loop order i, k, j: every c[i][j] still sums over k in order (as the SIMD tiles do),
  // and the inner loop runs over contiguous B so the reference path stays usable on models.
  thread_local std::vector<float> acc;
  if (acc.size() < (size_t)t.n) acc.resize(t.n);
  for (int i = 0; i < t.m; ++i) {
    const float* a = t.a[i];
    std::fill(acc.begin(), acc.begin() + t.n, 0.f);
    for (int k = 0; k < t.k; ++k) {
      const float aik = a[k * t.a_cs];
      for (int j0 = 0; j0 < t.n; j0 += kPanel) {
        const int nj = std::min(kPanel, t.n - j0);
        const float* b = t.b_panel ? t.b + (j0 / kPanel) * t.b_panel + (long)k * kPanel : t.b + (long)k * t.ldb + j0;
        float* c = acc.data() + j0;
        for (int j = 0; j < nj; ++j) c[j] += aik * b[j];
      }
    }
    float* c = t.c[i];
    const float* r = t.res ? t.res[i] : nullptr;
    for (int j = 0; j < t.n; ++j) {
      float v = acc[j];
      if (t.bias) v += t.bias[j];
      if (r) v += r[j];
      if (t.gelu) v = 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
      c[j] = v;
    }
  }
}

// bf16 products as the AVX-512 dot instruction forms them: both operands rounded to bf16,
// each pair of products added to the fp32 sum.
void gemm_tile_bf16(const GemmTile& t) {
  auto bf = [](float x) {
    const uint32_t u = (uint32_t)fp32_to_bf16(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  auto bw = [](uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  for (int i = 0; i < t.m; ++i) {
    const float* a = t.a[i];
    float* c = t.c[i];
    const float* r = t.res ? t.res[i] : nullptr;
    for (int j = 0; j < t.n; ++j) {
      const uint16_t* b = t.b16 + (j / kPanel) * t.b16_panel + (j % kPanel) * 2;
      // vdpbf16ps's arithmetic per pair: the odd element's product first, each one fused
      // (a product of two bf16 values is exact in fp32), as the vector tiles sum.
      float acc = 0.f;
      for (int k = 0; k < t.k; k += 2) {
        const float a1 = k + 1 < t.k ? bf(a[(k + 1) * t.a_cs]) : 0.f;
        acc = std::fma(a1, bw(b[(k / 2) * 2 * kPanel + 1]), acc);
        acc = std::fma(bf(a[k * t.a_cs]), bw(b[(k / 2) * 2 * kPanel]), acc);
      }
      if (t.bias) acc += t.bias[j];
      if (r) acc += r[j];
      if (t.gelu) acc = 0.5f * acc * (1.f + std::erf(acc * 0.70710678118654752f));
      c[j] = acc;
    }
  }
}

void softmax_rows(float* s, int rows, int n, long ld, float scale) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    float mx = row[0];
    for (int j = 1; j < n; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
    for (int j = 0; j < n; ++j) {
      row[j] = std::exp(scale * (row[j] - mx));
      sum += row[j];
    }
    const float inv = 1.f / sum;
    for (int j = 0; j < n; ++j) row[j] *= inv;
  }
}

void layer_norm_row(const float* x, int C, const float* g, const float* b, float eps, float* y) {
  ln_row(x, C, g, b, eps, y);
}

void cpe_row(const float* img, int H, int W, int C, int yy, const float* wt, const float* bias, float* out) {
  davit::cpe_row(img, H, W, C, yy, wt, bias, out);
}

void transpose(const float* src, long lds, int rows, int cols, float* dst, long ldd) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

}  // namespace scalar

namespace {
std::atomic<int>& thread_slot() {
  static std::atomic<int> n{[] {
    // OMP_NUM_THREADS is honoured, so one setting caps every backend in the process.
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    return (int)std::max(1u, std::thread::hardware_concurrency());
  }()};
  return n;
}
}  // namespace

int num_threads() { return thread_slot().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  DT_CHECK(n >= 1 && n <= 1024, "number of threads must be in [1, 1024], got " + std::to_string(n));
  thread_slot().store(n, std::memory_order_relaxed);
}

const Kernels& kernels() {
  static const Kernels tables[] = {
      {scalar::gemm_tile, scalar::gemm_tile_bf16, scalar::softmax_rows, scalar::layer_norm_row,
       scalar::cpe_row, scalar::transpose},
      // AVX2 has no bf16 dot product: the bf16 option runs the scalar tile there.
      {avx2::gemm_tile, scalar::gemm_tile_bf16, avx2::softmax_rows, avx2::layer_norm_row, avx2::cpe_row,
       avx2::transpose},
      // Without vdpbf16ps: its sums as two FMAs.
      {avx512::gemm_tile, avx512::gemm_tile_bf16, avx512::softmax_rows, avx512::layer_norm_row,
       avx512::cpe_row, avx512::transpose},
      {avx512::gemm_tile, avx512::gemm_tile_dpbf16, avx512::softmax_rows, avx512::layer_norm_row,
       avx512::cpe_row, avx512::transpose},
  };
  switch (active_isa()) {
    case Isa::Avx2:
    case Isa::AvxVnni: return tables[1];  // (AVX-VNNI changes only the quantized linear)
    case Isa::Avx512: return tables[2];
    case Isa::Avx512Bf16: return tables[3];
    case Isa::Scalar: break;
  }
  return tables[0];
}

namespace {

// GEMM tile extents for the work split; multiples of every ISA's micro-tile (6x64, 6x16)
// and of kPanel.
constexpr int kMC = 48;
constexpr int kNC = 64;

// Per-thread scratch that survives across calls (pool threads are persistent).
// Slots: 0, 1 attention core (k^T, logits); 2, 3, 4 a chunk's buffers when a task owns it.
float* thread_scratch(int slot, size_t n) {
  thread_local std::vector<float> bufs[5];
  auto& v = bufs[slot];
  if (v.size() < n) v.resize(n);
  return v.data();
}

// f(i) for i in [0, n) on the DaViT threads (the caller included); returns when all ran.
template <class F>
void parallel_for(long n, F&& f) {
  const int nth = num_threads();
  if (n <= 0) return;
  if (n == 1 || nth == 1) {
    for (long i = 0; i < n; ++i) f(i);
    return;
  }
  ThreadPool::instance().parallel_for(nth, n, [&](int64_t i) { f((long)i); });
}

// Work buffers of one op call, kept by the calling thread across calls: large per-call
// allocations go through mmap/munmap and page faults on every call (glibc), which cost
// more than the kernels at batch 1. Contents are not preserved; a slot only grows.
struct CallBuffers {
  std::vector<float> slot[5];
  float* get(int i, size_t n) {
    if (slot[i].size() < n) slot[i].resize(n);
    return slot[i].data();
  }
};
CallBuffers& call_buffers() {
  thread_local CallBuffers b;
  return b;
}

// A GEMM over m rows given by pointer tables; columns [0, n) of B / bias / C / res.
struct GemmSpec {
  int m, n, k;
  const float* const* a;
  long a_cs;
  const float* b;
  long ldb;       // row-major B, or
  long b_panel;   // panel-packed B (PackedLinear) when non-zero
  float* const* c;
  const float* const* res;
  const float* bias;
  bool gelu;
  const uint16_t* b16 = nullptr;  // bf16 B (see GemmTile), used instead of b when set
  long b16_panel = 0;
};

// B operand and bias from a packed layer from output column col0 (a multiple of kPanel),
// in bf16 when the layer was packed so.
GemmSpec with_weights(GemmSpec s, const PackedLinear& w, int col0) {
  s.b = w.wt.data() + (col0 / kPanel) * w.panel_stride();
  s.ldb = 0;
  s.b_panel = w.panel_stride();
  s.bias = w.bias.data() + col0;
  if (w.bf16) {
    s.b16 = w.wt16.data() + (col0 / kPanel) * w.panel_stride16();
    s.b16_panel = w.panel_stride16();
  }
  return s;
}

// f(0..n-1): spread over the threads (shared) or all on this thread (inside a task).
template <class F>
void for_tasks(long n, bool shared, F&& f) {
  if (shared) {
    parallel_for(n, f);
  } else {
    for (long i = 0; i < n; ++i) f(i);
  }
}

// Splits a GEMM into kMC x kNC tiles, run as for_tasks(shared).
void gemm_tiles(const GemmSpec& s, bool shared = true) {
  const int mt = (s.m + kMC - 1) / kMC, nt = (s.n + kNC - 1) / kNC;
  const auto gemm = s.b16 ? kernels().gemm_tile_bf16 : kernels().gemm_tile;
  for_tasks(mt * nt, shared, [&](long t) {
    const int i0 = (int)(t / nt) * kMC, j0 = (int)(t % nt) * kNC;
    const int m = std::min(kMC, s.m - i0);
    float* crow[kMC];
    const float* rrow[kMC];
    for (int i = 0; i < m; ++i) {
      crow[i] = s.c[i0 + i] + j0;
      if (s.res) rrow[i] = s.res[i0 + i] + j0;
    }
    GemmTile g;
    g.m = m;
    g.n = std::min(kNC, s.n - j0);
    g.k = s.k;
    g.a = s.a + i0;
    g.a_cs = s.a_cs;
    // kNC is a multiple of kPanel, so a tile starts on a panel boundary.
    g.b = s.b_panel ? s.b + (j0 / kPanel) * s.b_panel : s.b + j0;
    g.ldb = s.ldb;
    g.b_panel = s.b_panel;
    g.c = crow;
    g.res = s.res ? rrow : nullptr;
    g.bias = s.bias ? s.bias + j0 : nullptr;
    g.gelu = s.gelu;
    if (s.b16) {
      g.b16 = s.b16 + (j0 / kPanel) * s.b16_panel;
      g.b16_panel = s.b16_panel;
    }
    gemm(g);
  });
}

// Two ways to spread a fused op over threads. With many chunks each task owns a whole
// chunk and runs every phase alone (one join per op: joins dominate once a core is
// contended); with few chunks (late stages, batch 1) the threads share each phase.
bool own_chunks(long chunks) { return chunks >= 2L * num_threads(); }

// A serial GEMM on one thread (small attention products); rows are at most `kMaxRows`.
constexpr int kMaxRows = 256;
void small_gemm(int m, int n, int k, const float* a, long lda, long a_cs, const float* b, long ldb,
                float* c, long ldc, bool accumulate) {
  const float* arow[kMaxRows];
  float* crow[kMaxRows];
  for (int i = 0; i < m; ++i) {
    arow[i] = a + i * lda;
    crow[i] = c + i * ldc;
  }
  GemmTile g;
  g.m = m; g.n = n; g.k = k;
  g.a = arow; g.a_cs = a_cs;
  g.b = b; g.ldb = ldb;
  g.c = crow;
  g.res = accumulate ? crow : nullptr;
  kernels().gemm_tile(g);
}

// bf16 pair panels (PackedLinear::wt16) from the fp32 panels.
void add_bf16(PackedLinear& p) {
  const int panels = (p.out + kPanel - 1) / kPanel;
  p.wt16.assign((size_t)panels * p.panel_stride16(), 0);
  for (int pn = 0; pn < panels; ++pn)
    for (int k = 0; k < p.in; ++k)
      for (int j = 0; j < kPanel; ++j)
        p.wt16[(size_t)pn * p.panel_stride16() + (size_t)(k / 2) * 2 * kPanel + j * 2 + k % 2] =
            fp32_to_bf16(p.wt[((size_t)pn * p.in + k) * kPanel + j]);
  p.bf16 = true;
}

// Output columns [o0, o1) of a packed layer, repacked as a layer of their own.
PackedLinear sub_linear(const PackedLinear& l, int o0, int o1) {
  PackedLinear s;
  s.in = l.in;
  s.out = o1 - o0;
  const int panels = (s.out + kPanel - 1) / kPanel;
  s.wt.assign((size_t)panels * l.in * kPanel, 0.f);
  for (int o = 0; o < s.out; ++o) {
    const int src = o0 + o;
    const float* from = l.wt.data() + (size_t)(src / kPanel) * l.in * kPanel + src % kPanel;
    float* to = s.wt.data() + (size_t)(o / kPanel) * l.in * kPanel + o % kPanel;
    for (int i = 0; i < l.in; ++i) to[(size_t)i * kPanel] = from[(size_t)i * kPanel];
  }
  s.bias.assign(l.bias.begin() + o0, l.bias.begin() + o1);
  if (l.bf16) add_bf16(s);
  return s;
}

void check_linear(const PackedLinear* l, int in, int out, const char* name) {
  DT_CHECK(l != nullptr, std::string(name) + " weights are missing");
  DT_CHECK(l->in == in && l->out == out,
           std::string(name) + " maps " + std::to_string(l->in) + " -> " + std::to_string(l->out) +
               " features, expected " + std::to_string(in) + " -> " + std::to_string(out));
}

}  // namespace

PackedLinear pack_linear(const float* weight, const float* bias, int out, int in, bool bf16) {
  DT_CHECK(out > 0 && in > 0, "linear layer must have positive sizes");
  PackedLinear p;
  p.in = in;
  p.out = out;
  const int panels = (out + kPanel - 1) / kPanel;
  p.wt.assign(static_cast<size_t>(panels) * in * kPanel, 0.f);
  p.bias.assign(out, 0.f);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i)
      p.wt[(static_cast<size_t>(o / kPanel) * in + i) * kPanel + o % kPanel] = weight[static_cast<size_t>(o) * in + i];
  if (bias) std::copy(bias, bias + out, p.bias.begin());
  if (bf16) add_bf16(p);
  return p;
}

void linear(const float* x, long rows, const PackedLinear& w, float* y, const float* res, bool gelu) {
  if (rows <= 0) return;
  std::vector<const float*> a(rows), r(res ? rows : 0);
  std::vector<float*> c(rows);
  for (long i = 0; i < rows; ++i) {
    a[i] = x + i * w.in;
    c[i] = y + i * w.out;
    if (res) r[i] = res + i * w.out;
  }
  // Row blocks of at most INT_MAX rows are never needed at DaViT sizes; keep the check honest.
  DT_CHECK(rows < (1L << 30), "too many rows for one linear call");
  gemm_tiles(with_weights({(int)rows, w.out, w.in, a.data(), 1, nullptr, 0, 0, c.data(),
                           res ? r.data() : nullptr, nullptr, gelu}, w, 0));
}

// ---- window attention ------------------------------------------------------------------------
void window_attention(const WindowAttentionParams& p) {
  const int B = p.B, H = p.H, W = p.W, C = p.C, h = p.heads, ws = p.ws;
  DT_CHECK(B > 0 && H > 0 && W > 0 && C > 0, "window_attention: empty input");
  DT_CHECK(h > 0 && C % h == 0, "window_attention: C=" + std::to_string(C) +
                                    " is not divisible by num_heads=" + std::to_string(h));
  DT_CHECK(ws > 0 && (long)ws * ws <= kMaxRows, "window_attention: window_size must be in [1, 16]");
  check_linear(p.qkv, C, 3 * C, "qkv");
  check_linear(p.proj, C, C, "proj");
  const int d = C / h, L = ws * ws;
  const long windows = (long)B * make_window_grid(H, W, ws).nW;
  const float scale = 1.f / std::sqrt((float)d);

  // Windows per chunk: up to ~384 token rows (the chunk's qkv block stays cache-resident and
  // the GEMMs get enough rows to amortise reading the weights), fewer so that every thread
  // can own at least two chunks when the map is small.
  const int nth = num_threads();
  const int wpc = (int)std::clamp<long>(windows / (2L * nth), 1, std::max(1, 384 / L));
  const long nchunks = (windows + wpc - 1) / wpc;
  const bool own = own_chunks(nchunks);
  const size_t rows_pc = (size_t)wpc * L;
  const WindowGrid grid = make_window_grid(H, W, ws);
  // Padded tokens read a zero row: after LayerNorm the pad value is exactly 0.
  float* zero_row = call_buffers().get(0, C);
  std::fill(zero_row, zero_row + C, 0.f);

  // One chunk of windows: qkv GEMM, per-(window, head) attention, proj GEMM. `shared`: the
  // phases are spread over the threads (buffers of the calling thread); otherwise the
  // running thread does it all in its own buffers.
  auto chunk = [&](long ch, bool shared) {
    float* qkv = shared ? call_buffers().get(1, rows_pc * 3 * C) : thread_scratch(2, rows_pc * 3 * C);
    float* ob = shared ? call_buffers().get(2, rows_pc * C) : thread_scratch(3, rows_pc * C);
    const long w0 = ch * wpc;
    const int nw = (int)std::min<long>(wpc, windows - w0);
    std::vector<const float*> a_rows(nw * L), o_rows(nw * L), res_rows(p.res ? nw * L : 0);
    std::vector<float*> qkv_rows(nw * L), out_rows(nw * L);
    int real = 0;  // crop = padded tokens are never listed as proj rows
    for (int r = 0; r < nw * L; ++r) {
      qkv_rows[r] = qkv + (size_t)r * 3 * C;
      const long tok = window_token(grid, w0 * L + r);
      a_rows[r] = tok >= 0 ? p.x + tok * C : zero_row;
      if (tok < 0) continue;
      o_rows[real] = ob + (size_t)r * C;
      out_rows[real] = p.out + tok * C;
      if (p.res) res_rows[real] = p.res + tok * C;
      ++real;
    }
    // qkv = z W_qkv^T + b for every (padded) token of the chunk's windows.
    gemm_tiles(with_weights({nw * L, 3 * C, C, a_rows.data(), 1, nullptr, 0, 0, qkv_rows.data(), nullptr,
                             nullptr, false}, *p.qkv, 0), shared);
    // Per (window, head): S = q k^T, P = softmax(scale * S), o = P v.
    for_tasks(nw * h, shared, [&](long task) {
      const int wl = (int)(task / h), hd = (int)(task % h);
      float* kt = thread_scratch(0, (size_t)d * L);
      float* s = thread_scratch(1, (size_t)L * L);
      const float* base = qkv + (size_t)wl * L * 3 * C;
      const float* q = base + hd * d;
      const float* k = base + C + hd * d;
      const float* v = base + 2 * C + hd * d;
      kernels().transpose(k, 3 * C, L, d, kt, L);
      small_gemm(L, L, d, q, 3 * C, 1, kt, L, s, L, false);
      kernels().softmax_rows(s, L, L, L, scale);
      small_gemm(L, d, L, s, L, 1, v, 3 * C, ob + (size_t)wl * L * C + hd * d, C, false);
    });
    // out = res + o W_proj^T + b for the chunk's real tokens.
    gemm_tiles(with_weights({real, C, C, o_rows.data(), 1, nullptr, 0, 0, out_rows.data(),
                             p.res ? res_rows.data() : nullptr, nullptr, false}, *p.proj, 0), shared);
  };
  if (own) {
    parallel_for(nchunks, [&](long ch) { chunk(ch, false); });
  } else {
    for (long ch = 0; ch < nchunks; ++ch) chunk(ch, true);
  }
}

// ---- channel attention, Gram form -----------------------------------------------------------
// For many tokens per image (N >> C) the same result follows from X's Gram matrix, with X the
// image's N x C (normalised) tokens, Gamma = X^T X, sigma = X^T 1 (derivation: davit.md §6):
//   K_g^T V_g = Wk_g Gamma Wv_g^T + (Wk_g sigma) bv_g^T + bk_g (Wv_g sigma)^T + N bk_g bv_g^T
//   y = X M + c,  M = sum_g Wq_g^T A_g^T Wp_g^T,  c = sum_g bq_g^T A_g^T Wp_g^T + bp
// i.e. two N x C x C products (Gamma, then X M) instead of four plus the per-group maps,
// and O(C^3) work per image on the side. Rounding differs from the direct form (sums are
// grouped differently); both accumulate in fp32 with blocked partial sums.
namespace {

// softmax_rows of a channel map [d, d], where a row holding NaN or +inf (a token with NaN or
// inf reaches every entry of its image's maps) becomes NaN, as the exact softmax makes it
// (the vector exp clamps its input, which would turn NaN into a finite weight). The map
// multiplies q, not v, so a finite row would hide the bad token from every other output.
void softmax_map(float* s, int d, float scale) {
  std::vector<int> bad;
  for (int i = 0; i < d; ++i) {
    const float* row = s + (size_t)i * d;
    for (int j = 0; j < d; ++j)
      if (std::isnan(row[j]) || row[j] == std::numeric_limits<float>::infinity()) {
        bad.push_back(i);
        break;
      }
  }
  kernels().softmax_rows(s, d, d, d, scale);
  for (int i : bad) std::fill(s + (size_t)i * d, s + (size_t)(i + 1) * d, std::numeric_limits<float>::quiet_NaN());
}

// W^T of a packed layer as a plain row-major [in][out] matrix.
std::vector<float> unpack_wt(const PackedLinear& l) {
  std::vector<float> out((size_t)l.in * l.out);
  for (int i = 0; i < l.in; ++i)
    for (int o = 0; o < l.out; ++o)
      out[(size_t)i * l.out + o] = l.wt[((size_t)(o / kPanel) * l.in + i) * kPanel + o % kPanel];
  return out;
}

// Row-major [k][n] matrix packed into kPanel-column panels (zero-padded), as PackedLinear::wt.
void pack_panels(const float* src, int k, int n, float* dst) {
  const int panels = (n + kPanel - 1) / kPanel;
  for (int pnl = 0; pnl < panels; ++pnl)
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < kPanel; ++j) {
        const int col = pnl * kPanel + j;
        dst[((size_t)pnl * k + i) * kPanel + j] = col < n ? src[(size_t)i * n + col] : 0.f;
      }
}

std::vector<const float*> row_ptrs(const float* base, long rows, long ld) {
  std::vector<const float*> r(rows);
  for (long i = 0; i < rows; ++i) r[i] = base + i * ld;
  return r;
}
std::vector<float*> row_ptrs(float* base, long rows, long ld) {
  std::vector<float*> r(rows);
  for (long i = 0; i < rows; ++i) r[i] = base + i * ld;
  return r;
}

// Tokens per channel from which the Gram form is used (its O(C^3) side work is then small).
constexpr long kGramTokensPerChannel = 4;

void channel_attention_gram(const ChannelAttentionParams& p) {
  const int N = p.N, C = p.C, G = p.groups, d = C / G;
  const float scale = 1.f / std::sqrt((float)d);
  const std::vector<float> wt = unpack_wt(*p.qkv);   // [C][3C]: columns q | k | v
  const std::vector<float> pt = unpack_wt(*p.proj);  // [C][C]
  const float* bq = p.qkv->bias.data();
  const float* bk = bq + C;
  const float* bv = bq + 2 * C;
  const int panels = (C + kPanel - 1) / kPanel;
  const auto wt_a = row_ptrs(wt.data(), C, 3 * C);
  constexpr long kSub = 256;  // tokens per fp32 partial sum of Gamma
  // Images are independent: with enough of them each task owns a whole image, otherwise
  // the threads share every phase of each image.
  const bool own = p.B >= 2 * num_threads();

  // Work buffers for one image.
  struct Work {
    std::vector<float> gram, sigma, z, maps, ku, vu, t, m, mp, cvec;
    std::vector<const float*> x_rows, res_rows, gram_a;
    std::vector<float*> out_rows, z_c, m_c;
  };
  auto init = [&](Work& w) {
    w.gram.resize((size_t)C * C); w.sigma.resize(C); w.z.resize((size_t)C * C); w.maps.resize((size_t)G * d * d);
    w.ku.resize(C); w.vu.resize(C); w.t.resize((size_t)C * C); w.m.resize((size_t)C * C);
    w.mp.resize((size_t)panels * C * kPanel); w.cvec.resize(C);
    w.x_rows.resize(N); w.res_rows.resize(p.res ? N : 0); w.out_rows.resize(N);
    w.gram_a = row_ptrs(static_cast<const float*>(w.gram.data()), C, C);
    w.z_c = row_ptrs(w.z.data(), C, C);
    w.m_c = row_ptrs(w.m.data(), C, C);
  };

  auto image = [&](int b, bool sh) {
    Work wk;
    init(wk);
    auto& gram = wk.gram; auto& sigma = wk.sigma; auto& z = wk.z; auto& maps = wk.maps;
    auto& ku = wk.ku; auto& vu = wk.vu; auto& t = wk.t; auto& m = wk.m; auto& mp = wk.mp; auto& cvec = wk.cvec;
    const float* x = p.x + (size_t)b * N * C;
    for (int n = 0; n < N; ++n) {
      wk.x_rows[n] = x + (size_t)n * C;
      wk.out_rows[n] = p.out + ((size_t)b * N + n) * C;
      if (p.res) wk.res_rows[n] = p.res + ((size_t)b * N + n) * C;
    }
    // Gamma = X^T X: per output tile, fp32 products over blocks of kSub tokens summed in
    // double (Gamma's entries are sums over every token and feed an exponential).
    const int mt = (C + kMC - 1) / kMC, nt = (C + kNC - 1) / kNC;
    for_tasks(mt * nt, sh, [&](int tile) {
      const int i0 = (tile / nt) * kMC, j0 = (tile % nt) * kNC;
      const int mi = std::min(kMC, C - i0), nj = std::min(kNC, C - j0);
      float part[kMC * kNC];
      double acc[kMC * kNC] = {};
      const float* arow[kMC];
      float* crow[kMC];
      for (int i = 0; i < mi; ++i) crow[i] = part + i * kNC;
      for (long n0 = 0; n0 < N; n0 += kSub) {
        for (int i = 0; i < mi; ++i) arow[i] = x + n0 * C + i0 + i;
        GemmTile g;
        g.m = mi; g.n = nj; g.k = (int)std::min(kSub, N - n0);
        g.a = arow; g.a_cs = C;
        g.b = x + n0 * C + j0; g.ldb = C;
        g.c = crow;
        kernels().gemm_tile(g);
        for (int i = 0; i < mi; ++i)
          for (int j = 0; j < nj; ++j) acc[i * kNC + j] += part[i * kNC + j];
      }
      for (int i = 0; i < mi; ++i)
        for (int j = 0; j < nj; ++j) gram[(size_t)(i0 + i) * C + j0 + j] = (float)acc[i * kNC + j];
    });
    for_tasks(C, sh, [&](int i) {
      double s = 0.0;
      for (int n = 0; n < N; ++n) s += x[(size_t)n * C + i];
      sigma[i] = (float)s;
    });
    // Z = Gamma Wv^T (C x C); ku = Wk sigma, vu = Wv sigma.
    gemm_tiles({C, C, C, wk.gram_a.data(), 1, wt.data() + 2 * C, 3 * C, 0, wk.z_c.data(), nullptr, nullptr, false}, sh);
    for_tasks(C, sh, [&](int o) {
      float sk = 0.f, sv = 0.f;
      for (int i = 0; i < C; ++i) {
        sk += wt[(size_t)i * 3 * C + C + o] * sigma[i];
        sv += wt[(size_t)i * 3 * C + 2 * C + o] * sigma[i];
      }
      ku[o] = sk;
      vu[o] = sv;
    });
    // S_g = Wk_g Z_g + rank-one bias terms; A_g = softmax_rows(scale S_g); then
    // T_g = A_g^T Wp_g^T (rows g d .. g d + d of T).
    for_tasks(G, sh, [&](int g) {
      float* sg = maps.data() + (size_t)g * d * d;
      small_gemm(d, d, C, wt.data() + C + g * d, 1, 3 * C, z.data() + g * d, C, sg, d, false);
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j)
          sg[i * d + j] += ku[g * d + i] * bv[g * d + j] + bk[g * d + i] * vu[g * d + j] +
                           (float)N * bk[g * d + i] * bv[g * d + j];
      softmax_map(sg, d, scale);
      std::vector<float> at((size_t)d * d);
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j) at[j * d + i] = sg[i * d + j];
      small_gemm(d, C, d, at.data(), d, 1, pt.data() + (size_t)g * d * C, C, t.data() + (size_t)g * d * C, C,
                 false);
    });
    // M = Wq^T T (C x C), packed into panels for the token GEMM; c = bq^T T + bp.
    gemm_tiles({C, C, C, wt_a.data(), 1, t.data(), C, 0, wk.m_c.data(), nullptr, nullptr, false}, sh);
    for_tasks(C, sh, [&](int j) {
      float s = p.proj->bias[j];
      for (int k = 0; k < C; ++k) s += bq[k] * t[(size_t)k * C + j];
      cvec[j] = s;
    });
    pack_panels(m.data(), C, C, mp.data());
    // y = res + X M + c over the image's tokens.
    gemm_tiles({N, C, C, wk.x_rows.data(), 1, mp.data(), 0, (long)C * kPanel, wk.out_rows.data(),
                p.res ? wk.res_rows.data() : nullptr, cvec.data(), false}, sh);
  };
  if (own) {
    parallel_for(p.B, [&](long b) { image((int)b, false); });
  } else {
    for (int b = 0; b < p.B; ++b) image(b, true);
  }
}

}  // namespace

// ---- channel attention ----------------------------------------------------------------------
void channel_attention(const ChannelAttentionParams& p) {
  const int B = p.B, N = p.N, C = p.C, G = p.groups;
  DT_CHECK(B > 0 && N > 0 && C > 0, "channel_attention: empty input");
  DT_CHECK(G > 0 && C % G == 0, "channel_attention: C=" + std::to_string(C) +
                                    " is not divisible by num_groups=" + std::to_string(G));
  check_linear(p.qkv, C, 3 * C, "qkv");
  check_linear(p.proj, C, C, "proj");
  const int d = C / G;
  DT_CHECK(d <= kMaxRows, "channel_attention: group size above 256 channels is not supported");
  // Many tokens per image: the Gram form does about half the work (see above). It runs in
  // fp32, so next to bf16 projections (about 1.6x faster) it pays only from twice as many.
  if ((long)N >= (p.qkv->bf16 ? 2 : 1) * kGramTokensPerChannel * C) return channel_attention_gram(p);
  const float scale = 1.f / std::sqrt((float)d);
  const long rows = (long)B * N;
  // Token rows per chunk: the k|v block (rows x 2C) stays within ~1.5 MB, and small inputs
  // are cut finer so that every thread can own chunks (see own_chunks).
  const int nth = num_threads();
  const long ch_max = std::clamp<long>((3L << 17) / (2L * C) / 16 * 16, 64, 1024);
  const int CH = (int)std::clamp<long>((rows + 2L * nth - 1) / (2L * nth), 16, ch_max);
  const long nchunks = (rows + CH - 1) / CH;
  const bool own = own_chunks(nchunks);
  // Sub-tasks split each group's d x d map (pass 1) into row blocks.
  constexpr int kIB = 8;
  const int ib = (d + kIB - 1) / kIB;

  // The k|v columns [C, 3C) of the qkv layer as a layer of their own: they start on a panel
  // boundary when C is a multiple of kPanel (every DaViT size); other C get a repacked copy.
  PackedLinear kv_copy;
  const bool aligned = C % kPanel == 0;
  if (!aligned) kv_copy = sub_linear(*p.qkv, C, 3 * C);
  const PackedLinear& kv_layer = aligned ? *p.qkv : kv_copy;
  const int kv_col0 = aligned ? C : 0;
  // S per (b, g): one partial set per chunk when tasks own chunks (summed in chunk order
  // afterwards), else one set accumulated chunk after chunk.
  const size_t map_size = (size_t)B * G * d * d;
  const long nmaps = own ? nchunks : 1;
  CallBuffers& cb = call_buffers();
  float* maps = cb.get(0, nmaps * map_size);
  float* amap = cb.get(1, map_size);  // A^T per (b, g)
  if (!own) std::fill(maps, maps + map_size, 0.f);
  std::vector<const float*> x_rows(rows);
  std::vector<float*> out_rows(rows);
  std::vector<const float*> res_rows(p.res ? rows : 0);
  for (long r = 0; r < rows; ++r) {
    x_rows[r] = p.x + r * C;
    out_rows[r] = p.out + r * C;
    if (p.res) res_rows[r] = p.res + r * C;
  }
  auto first_image = [&](long ch) { return (int)(ch * CH / N); };
  auto last_image = [&](long ch) { return (int)((std::min<long>(rows, (ch + 1) * CH) - 1) / N); };
  // Row pointers into a chunk buffer of `ld` floats per row.
  auto rows_of = [&](float* buf, int m, long ld) {
    std::vector<float*> r(m);
    for (int i = 0; i < m; ++i) r[i] = buf + (size_t)i * ld;
    return r;
  };

  // Pass 1 for one chunk: k|v for its tokens (never stored for all N), then
  // S_g += K_g^T V_g for the images it covers, into `sm`.
  auto pass1 = [&](long ch, bool shared, float* sm) {
    float* kv = shared ? cb.get(2, (size_t)CH * 2 * C) : thread_scratch(2, (size_t)CH * 2 * C);
    const long r0 = ch * CH;
    const int m = (int)std::min<long>(CH, rows - r0);
    const auto kv_c = rows_of(kv, m, 2 * C);
    gemm_tiles(with_weights({m, 2 * C, C, x_rows.data() + r0, 1, nullptr, 0, 0, kv_c.data(), nullptr, nullptr,
                             false}, kv_layer, kv_col0), shared);
    // Tasks = (image segment of the chunk, group, row block of the map).
    const int b_first = first_image(ch), nseg = last_image(ch) - b_first + 1;
    for_tasks(nseg * G * ib, shared, [&](long task) {
      const int b = b_first + (int)(task / (G * ib)), g = (int)(task / ib) % G, i0 = (int)(task % ib) * kIB;
      const long s0 = std::max<long>(r0, (long)b * N) - r0, s1 = std::min<long>(r0 + m, (long)(b + 1) * N) - r0;
      const int mi = std::min(kIB, d - i0);
      // A(i, n) = k[n][g d + i0 + i]: strided along tokens; B(n, j) = v[n][g d + j].
      // Partial sums over kSub tokens are added to S, so fp32 rounding grows with
      // N / kSub + kSub rather than with N (logits are sums over every token).
      constexpr long kSub = 128;
      for (long n0 = s0; n0 < s1; n0 += kSub)
        small_gemm(mi, d, (int)std::min(kSub, s1 - n0), kv + n0 * 2 * C + g * d + i0, 1, 2 * C,
                   kv + n0 * 2 * C + C + g * d, 2 * C, sm + (((size_t)b * G + g) * d + i0) * d, d, true);
    });
  };
  if (own) {
    parallel_for(nchunks, [&](long ch) {
      float* sm = maps + ch * map_size;
      const int b0 = first_image(ch), b1 = last_image(ch);
      std::fill(sm + (size_t)b0 * G * d * d, sm + (size_t)(b1 + 1) * G * d * d, 0.f);
      pass1(ch, false, sm);
    });
  } else {
    for (long ch = 0; ch < nchunks; ++ch) pass1(ch, true, maps);
  }
  // Sum the chunks' partial maps in chunk order, then A = softmax_rows(scale * S) in fp32;
  // store A^T so that o = q A^T reads B row-major.
  parallel_for(B * G, [&](long bg) {
    const int b = (int)(bg / G);
    float* s0 = maps + (size_t)bg * d * d;
    if (own) {
      bool first = true;
      for (long ch = 0; ch < nchunks; ++ch) {
        if (b < first_image(ch) || b > last_image(ch)) continue;
        const float* st = maps + ch * map_size + (size_t)bg * d * d;
        if (first) {
          if (ch) std::copy(st, st + d * d, s0);
          first = false;
        } else {
          for (int e = 0; e < d * d; ++e) s0[e] += st[e];
        }
      }
    }
    softmax_map(s0, d, scale);
    float* at = amap + (size_t)bg * d * d;
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) at[j * d + i] = s0[i * d + j];
  });
  // Pass 2 for one chunk: q, o_g = q_g A_g^T, out = res + o W_proj^T + b.
  auto pass2 = [&](long ch, bool shared) {
    float* qb = shared ? cb.get(2, (size_t)CH * C) : thread_scratch(2, (size_t)CH * C);
    float* ob = shared ? cb.get(3, (size_t)CH * C) : thread_scratch(3, (size_t)CH * C);
    const long r0 = ch * CH;
    const int m = (int)std::min<long>(CH, rows - r0);
    const auto q_c = rows_of(qb, m, C);
    const auto o_c = rows_of(ob, m, C);
    const std::vector<const float*> o_src(o_c.begin(), o_c.end());
    gemm_tiles(with_weights({m, C, C, x_rows.data() + r0, 1, nullptr, 0, 0, q_c.data(), nullptr, nullptr, false},
                            *p.qkv, 0), shared);
    const int nrb = (m + kMC - 1) / kMC;
    for_tasks(nrb * G, shared, [&](long task) {
      const int i0 = (int)(task / G) * kMC, g = (int)(task % G), mi = std::min(kMC, m - i0);
      // Row blocks are split at image boundaries (each image has its own maps).
      int done = 0;
      while (done < mi) {
        const long r = r0 + i0 + done;
        const int b = (int)(r / N);
        const int seg = (int)std::min<long>(mi - done, (long)(b + 1) * N - r);
        small_gemm(seg, d, d, qb + (size_t)(i0 + done) * C + g * d, C, 1, amap + ((size_t)b * G + g) * d * d, d,
                   ob + (size_t)(i0 + done) * C + g * d, C, false);
        done += seg;
      }
    });
    gemm_tiles(with_weights({m, C, C, o_src.data(), 1, nullptr, 0, 0, out_rows.data() + r0,
                             p.res ? res_rows.data() + r0 : nullptr, nullptr, false}, *p.proj, 0), shared);
  };
  if (own) {
    parallel_for(nchunks, [&](long ch) { pass2(ch, false); });
  } else {
    for (long ch = 0; ch < nchunks; ++ch) pass2(ch, true);
  }
}

// ---- model helpers ----------------------------------------------------------------------------

void layer_norm(const float* x, long rows, int C, const float* gamma, const float* beta, float eps,
                float* y) {
  const auto ln = kernels().layer_norm_row;
  constexpr long kRows = 64;  // rows per task
  parallel_for((rows + kRows - 1) / kRows, [&](long t) {
    for (long r = t * kRows; r < std::min(rows, (t + 1) * kRows); ++r) ln(x + r * C, C, gamma, beta, eps, y + r * C);
  });
}

void conv_pos_enc(const float* x, int B, int H, int W, int C, const float* weight, const float* bias,
                  float* y) {
  DT_CHECK(x != y, "conv_pos_enc: output must not alias the input");
  // Weights as [tap][C] so the inner loop runs over contiguous channels.
  std::vector<float> wt((size_t)9 * C);
  for (int c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) wt[(size_t)t * C + c] = weight[(size_t)c * 9 + t];
  const auto row = kernels().cpe_row;
  parallel_for((long)B * H, [&](long by) {
    const int b = (int)(by / H), yy = (int)(by % H);
    const long img = (long)b * H * W * C;
    row(x + img, H, W, C, yy, wt.data(), bias, y + img + (long)yy * W * C);
  });
}

void mlp_block(const float* x, long rows, int C, const float* gamma, const float* beta, float eps,
               const PackedLinear& fc1, const PackedLinear& fc2, float* y) {
  DT_CHECK(fc1.in == C && fc2.out == C && fc2.in == fc1.out,
           "mlp_block: fc1 must map C -> hidden and fc2 hidden -> C");
  if (rows <= 0) return;
  const int hid = fc1.out;
  // Token rows per chunk: the hidden block (CH x 4C) stays in L2/L3; small inputs are cut
  // finer so that every thread can own chunks (see own_chunks).
  const int nth = num_threads();
  const int CH = (int)std::clamp<long>((rows + 2L * nth - 1) / (2L * nth), 16, 256);
  const long nchunks = (rows + CH - 1) / CH;
  const bool own = own_chunks(nchunks);
  std::vector<const float*> x_rows(rows);
  std::vector<float*> y_rows(rows);
  for (long r = 0; r < rows; ++r) {
    x_rows[r] = x + r * C;
    y_rows[r] = y + r * C;
  }
  // One chunk: z = LN(x), h = GELU(z W1^T + b1), y = x + h W2^T + b2 (y may alias x: a
  // chunk reads its rows of x before writing the same rows of y).
  auto chunk = [&](long ch, bool shared) {
    float* zbuf = shared ? call_buffers().get(0, (size_t)CH * C) : thread_scratch(2, (size_t)CH * C);
    float* hbuf = shared ? call_buffers().get(1, (size_t)CH * hid) : thread_scratch(3, (size_t)CH * hid);
    const long r0 = ch * CH;
    const int m = (int)std::min<long>(CH, rows - r0);
    std::vector<const float*> z_a(m), h_a(m);
    std::vector<float*> z_c(m), h_c(m);
    for (int i = 0; i < m; ++i) {
      z_c[i] = zbuf + (size_t)i * C;
      z_a[i] = z_c[i];
      h_c[i] = hbuf + (size_t)i * hid;
      h_a[i] = h_c[i];
    }
    for_tasks(m, shared, [&](long i) { kernels().layer_norm_row(x + (r0 + i) * C, C, gamma, beta, eps, z_c[i]); });
    gemm_tiles(with_weights({m, hid, C, z_a.data(), 1, nullptr, 0, 0, h_c.data(), nullptr, nullptr, true}, fc1, 0),
               shared);
    gemm_tiles(with_weights({m, C, hid, h_a.data(), 1, nullptr, 0, 0, y_rows.data() + r0, x_rows.data() + r0,
                             nullptr, false}, fc2, 0), shared);
  };
  if (own) {
    parallel_for(nchunks, [&](long ch) { chunk(ch, false); });
  } else {
    for (long ch = 0; ch < nchunks; ++ch) chunk(ch, true);
  }
}

}  // namespace dovetail::davit
