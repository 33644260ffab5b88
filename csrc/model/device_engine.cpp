#include "model/device_engine.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "model/draft.h"

namespace dovetail {

namespace {

constexpr size_t kAlign = 64;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Shape of one call as a record key: T, P, R < 2^13, k < 2^9, two flags, history row < 2^14.
uint64_t record_key(int64_t T, int64_t P, int64_t R, int64_t k, bool host_features, bool want_hidden,
                    int64_t hist_base) {
  return (uint64_t)T | (uint64_t)P << 13 | (uint64_t)R << 26 | (uint64_t)k << 39 | (uint64_t)host_features << 48 |
         (uint64_t)want_hidden << 49 | (uint64_t)hist_base << 50;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// -- DeviceStack ---------------------------------------------------------------------------

DeviceStack::Layout DeviceStack::layout(int64_t T, int64_t P, int64_t D, int64_t n_topk, int64_t k,
                                        bool host_features, bool want_hidden) {
  Layout L;
  size_t at = kAlign;  // [0, 64): the n_past scalar
  if (host_features) {
    L.feat = at;
    at = align_up(at + sizeof(float) * T * D);
  } else {
    L.src = at;
    at = align_up(at + sizeof(int32_t) * T);
  }
  L.tokens = at;
  at = align_up(at + sizeof(int32_t) * T);
  L.positions = at;
  at = align_up(at + sizeof(int32_t) * T);
  L.bits = at;
  at = align_up(at + sizeof(uint64_t) * T * ((P + T + 63) / 64));
  L.rows = at;
  at = align_up(at + sizeof(int32_t) * n_topk);
  L.in_bytes = at;
  size_t out = 0;
  L.ids = out;
  out = align_up(out + sizeof(int32_t) * n_topk * k);
  L.logp = out;
  out = align_up(out + sizeof(float) * n_topk * k);
  L.hidden = out;
  if (want_hidden) out = align_up(out + sizeof(float) * T * D);
  L.out_bytes = out;
  return L;
}

template <typename T>
T* DeviceStack::dev(size_t count) {
  const size_t bytes = align_up(sizeof(T) * std::max<size_t>(count, 1));
  void* p = ops_->alloc(bytes);
  allocs_.push_back(p);
  device_bytes_ += bytes;
  return static_cast<T*>(p);
}

bf16_t* DeviceStack::upload_bf16(const PackedWeight& w, const int32_t* rows, int64_t n) {
  if (!rows) n = w.rows;
  std::vector<float> row((size_t)w.cols);
  std::vector<bf16_t> host((size_t)(n * w.cols));
  for (int64_t r = 0; r < n; ++r) {
    dequantize_row(w, rows ? rows[r] : r, row.data());
    for (int64_t c = 0; c < w.cols; ++c) host[(size_t)(r * w.cols + c)] = fp32_to_bf16(row[(size_t)c]);
  }
  bf16_t* p = dev<bf16_t>(host.size());
  ops_->upload(p, host.data(), sizeof(bf16_t) * host.size());
  return p;
}

// The named weights [rows_i, cols] stacked by rows (one GEMM for q|k|v and gate|up);
// pack_named refuses a missing tensor or a shape that differs, naming it.
bf16_t* DeviceStack::upload_weights(const WeightMap& w, std::initializer_list<std::pair<std::string, int64_t>> parts,
                                    int64_t cols) {
  std::vector<bf16_t> host;
  std::vector<float> row((size_t)cols);
  for (const auto& [name, rows] : parts) {
    const PackedWeight p = pack_named(w, name, rows, cols);
    for (int64_t r = 0; r < p.rows; ++r) {
      dequantize_row(p, r, row.data());
      for (float v : row) host.push_back(fp32_to_bf16(v));
    }
  }
  bf16_t* p = dev<bf16_t>(host.size());
  ops_->upload(p, host.data(), sizeof(bf16_t) * host.size());
  return p;
}

float* DeviceStack::upload_f32(const std::vector<float>& v) {
  float* p = dev<float>(v.size());
  ops_->upload(p, v.data(), sizeof(float) * v.size());
  return p;
}

void DeviceStack::gemm(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy, bool accumulate) {
  if (invariant_gemm_)
    ops_->gemm_invariant(M, N, K, x, w, y, ldy, accumulate);
  else
    ops_->gemm(M, N, K, x, w, y, ldy, accumulate);
}

DeviceStack::DeviceStack(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers,
                         const EngineOptions& o, const WeightMap& weights, bool first_has_norm, bool record,
                         bool invariant_gemm)
    : ops_(std::move(ops)), d_(d), o_(o), L_(n_layers), record_(record), invariant_gemm_(invariant_gemm) {
  DT_CHECK(ops_, "no device backend");
  DeviceScope scope(*ops_);
  DT_CHECK(n_layers >= 1, "at least one layer is needed on the device");
  DT_CHECK(d.dim > 0 && d.ffn > 0 && d.heads > 0 && d.kv_heads > 0 && d.head_dim > 0,
           "model dimensions must be positive");
  DT_CHECK(d.head_dim % 2 == 0 && d.head_dim <= 256, "head_dim must be even and at most 256");
  DT_CHECK(d.heads % d.kv_heads == 0, "heads must be a multiple of kv_heads");
  DT_CHECK(o.context >= 1 && o.context <= (1 << 24), "context must be in [1, 16777216], got " + std::to_string(o.context));
  DT_CHECK(o.max_batch >= 1 && o.max_batch <= 4096, "max_batch must be in [1, 4096], got " + std::to_string(o.max_batch));
  const int64_t D = d.dim, F = d.ffn, QD = d.heads * d.head_dim, KD = d.kv_heads * d.head_dim, B = o.max_batch;
  QKV_ = QD + 2 * KD;
  // (allocations so far are released by the destructor if a later step throws)
  for (int64_t l = 0; l < L_; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    LayerBufs lb;
    if (l > 0 || first_has_norm) lb.attn_norm = upload_f32(norm_named(weights, b + "attn_norm", D));
    lb.ffn_norm = upload_f32(norm_named(weights, b + "ffn_norm", D));
    lb.wqkv = upload_weights(weights, {{b + "attn_q", QD}, {b + "attn_k", KD}, {b + "attn_v", KD}}, D);
    lb.wo = upload_weights(weights, {{b + "attn_output", D}}, QD);
    lb.wgu = upload_weights(weights, {{b + "ffn_gate", F}, {b + "ffn_up", F}}, D);
    lb.wdown = upload_weights(weights, {{b + "ffn_down", D}}, F);
    const LayerExtras x = layer_extras_named(weights, d, b);
    auto optional = [&](const std::vector<float>& v) { return v.empty() ? nullptr : upload_f32(v); };
    lb.bqkv = optional(x.bqkv);
    lb.q_norm = optional(x.q_norm);
    lb.k_norm = optional(x.k_norm);
    lb.post_attn_norm = optional(x.post_attn_norm);
    lb.post_ffn_norm = optional(x.post_ffn_norm);
    lb.local = d.local_layer(l);
    lb.nope = d.nope_layer(l);
    layers_.push_back(lb);
  }
  std::vector<float> c, s;
  rope_tables(d.rope_theta, d.head_dim, o.context, c, s, d.rope_factors.empty() ? nullptr : d.rope_factors.data(),
              d.rope_mscale);
  cos_ = upload_f32(c);
  sin_ = upload_f32(s);
  if (d.window > 0) {  // the local layers' tables: their own base, no factors (as the CPU layers)
    rope_tables(d.local_theta(), d.head_dim, o.context, c, s);
    cos_local_ = upload_f32(c);
    sin_local_ = upload_f32(s);
  }
  if (d.nope_interval > 0) {  // (rotating by cos 1, sin 0 leaves every value as it is)
    cos_none_ = upload_f32(std::vector<float>((size_t)(o.context * (d.head_dim / 2)), 1.0f));
    sin_none_ = upload_f32(std::vector<float>((size_t)(o.context * (d.head_dim / 2)), 0.0f));
  }
  const size_t cache = (size_t)(L_ * d.kv_heads * o.context * d.head_dim);
  k_cache_ = dev<bf16_t>(cache);
  v_cache_ = dev<bf16_t>(cache);
  x_ = dev<float>(B * D); qkv_ = dev<float>(B * QKV_); gu_ = dev<float>(B * 2 * F);
  xn_ = dev<bf16_t>(B * D); att_ = dev<bf16_t>(B * QD); act_ = dev<bf16_t>(B * F);
  if (d.post_norms) y_ = dev<float>(B * D);
}

DeviceStack::~DeviceStack() {
  DeviceScope scope(*ops_);
  try {
    ops_->finish();
  } catch (...) {
  }
  for (void* p : allocs_) ops_->release(p);
  if (in_host_) ops_->release_staging(in_host_);
  if (out_host_) ops_->release_staging(out_host_);
}

void DeviceStack::alloc_transfers(size_t in_cap, size_t out_cap) {
  // (a commit's kept rows, int32 at offset 0, fit in the in-region too)
  in_cap_ = std::max(in_cap, align_up(sizeof(int32_t) * o_.max_batch));
  out_cap_ = out_cap;
  in_dev_ = dev<uint8_t>(in_cap_);
  out_dev_ = dev<uint8_t>(out_cap_);
  in_host_ = static_cast<uint8_t*>(ops_->alloc_staging(in_cap_));
  out_host_ = static_cast<uint8_t*>(ops_->alloc_staging(out_cap_));
  staging_bytes_ = in_cap_ + out_cap_;
}

DeviceDraftStats DeviceStack::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void DeviceStack::stage_common(const Layout& Lo, const int32_t* tokens, const int32_t* positions, int64_t T,
                               int64_t P, const uint8_t* anc) {
  const int32_t np32 = (int32_t)n_past_;
  std::memcpy(in_host_, &np32, sizeof(np32));
  std::memcpy(in_host_ + Lo.tokens, tokens, sizeof(int32_t) * T);
  std::memcpy(in_host_ + Lo.positions, positions, sizeof(int32_t) * T);
  ancestor_bits(anc, T, P, (P + T + 63) / 64, reinterpret_cast<uint64_t*>(in_host_ + Lo.bits));
}

void DeviceStack::launch(const Layout& Lo, uint64_t key, int64_t T, const std::function<void()>& compute) {
  ops_->h2d(in_dev_, in_host_, Lo.in_bytes);
  bool replayed = false;
  if (record_ && ops_->can_record() && T <= 64 && !unrecordable_.count(key)) {
    replayed = ops_->replay(key);
    // A shape runs directly the first time (modules load, cuBLAS settles on its kernels),
    // is recorded the second time, and replayed from then on.
    if (!replayed && (seen_.insert(key).second || ops_->recorded() >= 512)) {
      compute();
    } else if (!replayed) {
      bool recorded = false;
      try {
        ops_->begin_record(key);
        compute();
        ops_->end_record(key);
        recorded = true;
      } catch (const std::exception&) {
        unrecordable_.insert(key);  // the backend ended the recording; nothing of it ran
      }
      if (!recorded) compute();  // directly (a real fault raises again here)
    }
  } else {
    compute();
  }
  if (Lo.out_bytes) ops_->d2h(out_host_, out_dev_, Lo.out_bytes);
  stats_.transfer_ms += ops_->finish();
  stats_.calls += 1;
  stats_.replays += replayed;
  stats_.last_h2d_bytes = (int64_t)Lo.in_bytes;
  stats_.last_d2h_bytes = (int64_t)Lo.out_bytes;
  stats_.h2d_bytes += (int64_t)Lo.in_bytes;
  stats_.d2h_bytes += (int64_t)Lo.out_bytes;
}

void DeviceStack::run_layers(const Layout& Lo, int64_t T, int64_t P) {
  const int D = (int)d_.dim, F = (int)d_.ffn, H = (int)d_.heads, KV = (int)d_.kv_heads, Dh = (int)d_.head_dim;
  const int QD = H * Dh, S = (int)o_.context, t = (int)T;
  const float eps = d_.eps;
  const int32_t* n_past = reinterpret_cast<const int32_t*>(in_dev_);
  const int32_t* positions = reinterpret_cast<const int32_t*>(in_dev_ + Lo.positions);
  const uint64_t* bits = reinterpret_cast<const uint64_t*>(in_dev_ + Lo.bits);
  const size_t layer_cache = (size_t)KV * S * Dh;
  DT_CHECK(d_.window == 0 || P == 0, "a sliding window needs a call without earlier scratch rows");
  // y = a block's output; x += y, or x += RMSNorm(y) * w with a post norm w (Gemma 3).
  auto block_out = [&](int N, int K, const bf16_t* in, const bf16_t* w, const float* post) {
    if (!post) return gemm(t, N, K, in, w, x_, N, true);
    gemm(t, N, K, in, w, y_, N, false);
    ops_->add_norm(x_, y_, post, t, N, eps);
  };
  for (int64_t l = 0; l < L_; ++l) {
    const LayerBufs& lb = layers_[(size_t)l];
    bf16_t* kc = k_cache_ + l * layer_cache;
    bf16_t* vc = v_cache_ + l * layer_cache;
    // x += Wo . attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = RMSNorm(x) (no norm: xn = x)
    ops_->norm(x_, lb.attn_norm, t, D, eps, xn_);
    gemm(t, (int)QKV_, D, xn_, lb.wqkv, qkv_, (int)QKV_, false);
    RopeStoreArgs rs;
    rs.qkv = qkv_; rs.ld = (int)QKV_; rs.T = t; rs.H = H; rs.KV = KV; rs.Dh = Dh; rs.S = S; rs.P = (int)P;
    rs.positions = positions; rs.n_past = n_past; rs.k_cache = kc; rs.v_cache = vc;
    rs.cos = lb.nope ? cos_none_ : lb.local ? cos_local_ : cos_;
    rs.sin = lb.nope ? sin_none_ : lb.local ? sin_local_ : sin_;
    rs.bias = lb.bqkv; rs.q_norm = lb.q_norm; rs.k_norm = lb.k_norm; rs.eps = eps;
    ops_->rope_store(rs);
    AttentionCall ac;
    ac.q = qkv_; ac.ld = (int)QKV_; ac.T = t; ac.H = H; ac.KV = KV; ac.Dh = Dh; ac.S = S; ac.P = (int)P;
    ac.words = (int)((P + T + 63) / 64); ac.k_cache = kc; ac.v_cache = vc; ac.n_past = n_past; ac.bits = bits;
    ac.scale = d_.score_scale(); ac.softcap = d_.attn_softcap; ac.out = att_;
    ac.window = lb.local ? (int)d_.window : 0;
    ac.positions = positions;
    ops_->attention(ac);
    block_out(D, QD, att_, lb.wo, lb.post_attn_norm);
    // x += W_down (act(W_gate xn) * W_up xn), xn = RMSNorm(x), act SiLU or GELU
    ops_->norm(x_, lb.ffn_norm, t, D, eps, xn_);
    gemm(t, 2 * F, D, xn_, lb.wgu, gu_, 2 * F, false);
    ops_->glu(gu_, t, F, d_.gelu, act_);
    block_out(D, F, act_, lb.wdown, lb.post_ffn_norm);
  }
}

void DeviceStack::commit(const int64_t* kept, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(*ops_);
  const auto t0 = std::chrono::steady_clock::now();
  check_commit(kept, n, pending_);
  if (n > 0) {
    int32_t* k32 = reinterpret_cast<int32_t*>(in_host_);
    bool identity = true;
    for (int64_t i = 0; i < n; ++i) {
      k32[i] = (int32_t)kept[i];
      identity = identity && kept[i] == i;
    }
    if (!identity) {  // rows already in place need no copy
      const size_t bytes = sizeof(int32_t) * n;
      ops_->h2d(in_dev_, in_host_, bytes);
      ops_->kv_compact(k_cache_, v_cache_, (int)L_, (int)d_.kv_heads, (int)o_.context, (int)d_.head_dim,
                       (int)n_past_, reinterpret_cast<const int32_t*>(in_dev_), (int)n);
      stats_.transfer_ms += ops_->finish();
      stats_.h2d_bytes += (int64_t)bytes;
    }
  }
  n_past_ += n;
  pending_ = 0;
  stats_.call_ms += ms_since(t0);
}

void DeviceStack::truncate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  DT_CHECK(n >= 0 && n <= n_past_, "truncate to " + std::to_string(n) + " outside [0, " + std::to_string(n_past_) + "]");
  n_past_ = n;
  pending_ = 0;
}

void DeviceStack::read_kv(int64_t layer, int64_t n, float* k_out, float* v_out) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(*ops_);
  DT_CHECK(layer >= 0 && layer < L_, "layer " + std::to_string(layer) + " outside [0, " + std::to_string(L_) + ")");
  DT_CHECK(n >= 0 && n <= o_.context, "slot count outside the context");
  const int64_t KV = d_.kv_heads, S = o_.context, Dh = d_.head_dim;
  const size_t layer_elems = (size_t)(KV * S * Dh);
  std::vector<bf16_t> host(layer_elems);
  void* staging = ops_->alloc_staging(sizeof(bf16_t) * layer_elems);
  try {
    for (int which = 0; which < 2; ++which) {
      const bf16_t* src = (which ? v_cache_ : k_cache_) + layer * layer_elems;
      ops_->d2h(staging, src, sizeof(bf16_t) * layer_elems);
      ops_->finish();
      std::memcpy(host.data(), staging, sizeof(bf16_t) * layer_elems);
      float* out = which ? v_out : k_out;
      for (int64_t h = 0; h < KV; ++h)
        for (int64_t s = 0; s < n; ++s)
          for (int64_t i = 0; i < Dh; ++i)
            out[(h * n + s) * Dh + i] = bf16_to_fp32(host[(size_t)((h * S + s) * Dh + i)]);
    }
  } catch (...) {
    ops_->release_staging(staging);
    throw;
  }
  ops_->release_staging(staging);
}

// -- DeviceDraftEngine ---------------------------------------------------------------------

DeviceDraftEngine::DeviceDraftEngine(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers,
                                     const EngineOptions& o, const WeightMap& weights,
                                     const PackedWeight& embedding, const PackedWeight& lm_head,
                                     std::vector<int32_t> vocab_map, bool record)
    : DeviceStack(std::move(ops), d, n_layers, o, weights, false, record, false) {
  DeviceScope scope(*ops_);
  const int64_t D = d.dim, B = o.max_batch;
  DT_CHECK(embedding.cols == D && lm_head.cols == D,
           "draft hidden size " + std::to_string(D) + " differs from the target's " + std::to_string(embedding.cols));
  V_ = embedding.rows;
  if (!vocab_map.empty()) check_vocab_map(vocab_map, lm_head.rows);
  Vd_ = vocab_map.empty() ? lm_head.rows : (int64_t)vocab_map.size();
  embed_ = upload_bf16(embedding, nullptr, 0);
  head_ = upload_bf16(lm_head, vocab_map.empty() ? nullptr : vocab_map.data(), Vd_);
  if (!vocab_map.empty()) {
    vocab_map_ = dev<int32_t>(vocab_map.size());
    ops_->upload(vocab_map_, vocab_map.data(), sizeof(int32_t) * vocab_map.size());
  }
  e_norm_ = upload_f32(norm_named(weights, "fuse.e_norm", D));
  w1_ = upload_weights(weights, {{"fuse.w1", D}}, D);
  w2_ = upload_weights(weights, {{"fuse.w2", D}}, D);
  wz_ = upload_weights(weights, {{"fuse.wz", D}}, 2 * D);
  hist_ = dev<float>(2 * B * D);
  feat_ = dev<float>(B * D); h1_ = dev<float>(B * D); a_ = dev<float>(B * D); zpre_ = dev<float>(B * D);
  logits_ = dev<float>(B * Vd_);
  fb_ = dev<bf16_t>(B * D); e_ = dev<bf16_t>(B * D); hz_ = dev<bf16_t>(B * 2 * D); hs_ = dev<bf16_t>(B * D);
  const Layout most = layout(B, 0, D, B, 256, true, true);
  alloc_transfers(most.in_bytes, most.out_bytes);
}

void DeviceDraftEngine::run_compute(const Layout& Lo, int64_t T, int64_t P, int64_t R, int64_t k,
                                    bool host_features, int64_t hist_base) {
  const int D = (int)d_.dim, t = (int)T;
  const float eps = d_.eps;
  const int32_t* tokens = reinterpret_cast<const int32_t*>(in_dev_ + Lo.tokens);
  // Dynamic Gating Fusion: e = RMSNorm(Emb(x)), h1 = f W1^T, a = e W2^T,
  // zpre = [h1; SiLU(a)] Wz^T, g = z h1 + (1 - z) SiLU(a).
  const float* feat = feat_;
  if (host_features)
    feat = reinterpret_cast<const float*>(in_dev_ + Lo.feat);
  else  // rows of the output history
    ops_->gather(hist_, reinterpret_cast<const int32_t*>(in_dev_ + Lo.src), t, D, feat_);
  ops_->norm(feat, nullptr, t, D, eps, fb_);
  ops_->embed_norm(embed_, tokens, t, D, e_norm_, eps, e_);
  gemm(t, D, D, fb_, w1_, h1_, D, false);
  gemm(t, D, D, e_, w2_, a_, D, false);
  ops_->dgf_pack(h1_, a_, t, D, hz_);
  gemm(t, D, 2 * D, hz_, wz_, zpre_, D, false);
  ops_->dgf_mix(h1_, a_, zpre_, t, D, x_);

  run_layers(Lo, T, P);

  ops_->copy(hist_ + hist_base * D, x_, sizeof(float) * T * D);
  if (Lo.out_bytes > Lo.hidden) ops_->copy(out_dev_ + Lo.hidden, x_, sizeof(float) * T * D);
  if (R > 0) {  // the head (the draft's rows of the target's LM head) on the rows asked for
    ops_->gather_bf16(x_, reinterpret_cast<const int32_t*>(in_dev_ + Lo.rows), (int)R, D, hs_);
    gemm((int)R, (int)Vd_, D, hs_, head_, logits_, (int)Vd_, false);
    ops_->topk(logits_, (int)R, (int)Vd_, (int)k, vocab_map_, reinterpret_cast<int32_t*>(out_dev_ + Lo.ids),
               reinterpret_cast<float*>(out_dev_ + Lo.logp));
  }
}

void DeviceDraftEngine::forward(const float* features, const int32_t* src_rows, const int32_t* tokens,
                                const int32_t* positions, int64_t T, const uint8_t* anc, bool append, float* hidden,
                                const int64_t* topk_rows, int64_t n_topk, int64_t k, int32_t* topk_ids,
                                float* topk_logp) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(*ops_);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t P = append ? pending_ : 0, D = d_.dim;
  check_batch(positions, T, anc, P, n_past_, o_.max_batch, o_.context);
  check_draft_inputs(features, tokens, T, D, V_, Vd_, topk_rows, n_topk, k);
  if (!features) {
    DT_CHECK(src_rows, "the draft needs features or source rows of its previous output");
    DT_CHECK(hist_valid_ > 0, "no previous draft output to take features from");
    for (int64_t t = 0; t < T; ++t)
      DT_CHECK(src_rows[t] >= 0 && src_rows[t] < hist_valid_, "source row " + std::to_string(src_rows[t]) +
                                                                  " at index " + std::to_string(t) +
                                                                  " is outside the output history [0, " +
                                                                  std::to_string(hist_valid_) + ")");
  }
  const int64_t hist_base = append ? hist_valid_ : 0;
  DT_CHECK(hist_base + T <= 2 * o_.max_batch,
           "the draft's output history is full (" + std::to_string(hist_base) + " rows since the last call with "
           "append=false, " + std::to_string(2 * o_.max_batch) + " at most)");
  DT_CHECK(n_topk == 0 || (topk_ids && topk_logp), "top-k outputs missing");
  if (n_topk == 0) k = 0;

  // Stage the inputs: one contiguous host -> device copy.
  const bool host_features = features != nullptr, want_hidden = hidden != nullptr;
  const Layout Lo = layout(T, P, D, n_topk, k, host_features, want_hidden);
  stage_common(Lo, tokens, positions, T, P, anc);
  if (host_features)
    std::memcpy(in_host_ + Lo.feat, features, sizeof(float) * T * D);
  else
    std::memcpy(in_host_ + Lo.src, src_rows, sizeof(int32_t) * T);
  int32_t* rows = reinterpret_cast<int32_t*>(in_host_ + Lo.rows);
  for (int64_t i = 0; i < n_topk; ++i) rows[i] = (int32_t)topk_rows[i];

  launch(Lo, record_key(T, P, n_topk, k, host_features, want_hidden, hist_base), T,
         [&] { run_compute(Lo, T, P, n_topk, k, host_features, hist_base); });

  if (n_topk) {
    std::memcpy(topk_ids, out_host_ + Lo.ids, sizeof(int32_t) * n_topk * k);
    std::memcpy(topk_logp, out_host_ + Lo.logp, sizeof(float) * n_topk * k);
  }
  if (want_hidden) std::memcpy(hidden, out_host_ + Lo.hidden, sizeof(float) * T * D);
  pending_ = P + T;
  hist_valid_ = hist_base + T;
  stats_.call_ms += ms_since(t0);
}

// -- DeviceTargetPrefix --------------------------------------------------------------------

DeviceTargetPrefix::DeviceTargetPrefix(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers,
                                       const EngineOptions& o, const WeightMap& weights,
                                       const PackedWeight& embedding, bool record, float embed_scale)
    : DeviceStack(std::move(ops), d, n_layers, o, weights, true, record, true), embed_scale_(embed_scale) {
  DeviceScope scope(*ops_);
  DT_CHECK(embedding.cols == d.dim, "embedding width " + std::to_string(embedding.cols) + " differs from the "
                                    "hidden size " + std::to_string(d.dim));
  V_ = embedding.rows;
  embed_ = upload_bf16(embedding, nullptr, 0);
  const Layout most = layout(o.max_batch, 0, d.dim, 0, 0, false, true);
  alloc_transfers(most.in_bytes, most.out_bytes);
}

void DeviceTargetPrefix::forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* anc,
                                 float* hidden) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(*ops_);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t D = d_.dim;
  check_batch(positions, T, anc, 0, n_past_, o_.max_batch, o_.context);
  for (int64_t t = 0; t < T; ++t)
    DT_CHECK(tokens[t] >= 0 && tokens[t] < V_, "token id " + std::to_string(tokens[t]) + " at index " +
                                                   std::to_string(t) + " is outside the vocabulary [0, " +
                                                   std::to_string(V_) + ")");
  const Layout Lo = layout(T, 0, D, 0, 0, false, true);
  stage_common(Lo, tokens, positions, T, 0, anc);
  launch(Lo, record_key(T, 0, 0, 0, false, true, 0), T, [&] {
    ops_->embed(embed_, reinterpret_cast<const int32_t*>(in_dev_ + Lo.tokens), (int)T, (int)D, embed_scale_, x_);
    run_layers(Lo, T, 0);
    ops_->copy(out_dev_ + Lo.hidden, x_, sizeof(float) * T * D);
  });
  std::memcpy(hidden, out_host_ + Lo.hidden, sizeof(float) * T * D);
  pending_ = T;
  stats_.call_ms += ms_since(t0);
}

}  // namespace dovetail
