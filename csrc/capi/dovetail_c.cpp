// The C API (include/dovetail/dovetail.h) over the C++ engines: argument checks, weight
// descriptors -> WeightMap, and the exception -> status translation. No math here.
//
// Every entry point is noexcept and runs its body through `guarded`, so no exception
// crosses the C boundary. The last-error message lives in a fixed thread-local buffer:
// recording an error never allocates (it must work after a std::bad_alloc too).
#include "dovetail/dovetail.h"

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"
#include "model/draft.h"
#include "model/llama.h"
#include "model/speculative.h"

// The C enum mirrors dovetail::WType code for code.
static_assert(DT_F32 == (int)dovetail::WType::F32 && DT_F16 == (int)dovetail::WType::F16 &&
                  DT_BF16 == (int)dovetail::WType::BF16 && DT_Q8_0 == (int)dovetail::WType::Q8_0 &&
                  DT_Q4_0 == (int)dovetail::WType::Q4_0 && DT_Q4_1 == (int)dovetail::WType::Q4_1,
              "dt_dtype must match dovetail::WType");

namespace {

constexpr bool same_text(const char* a, const char* b) {
  for (; *a && *a == *b; ++a, ++b) {}
  return *a == *b;
}
#if defined(DOVETAIL_VERSION)
static_assert(same_text(DOVETAIL_VERSION, "") || same_text(DOVETAIL_VERSION, DT_VERSION_STRING),
              "DT_VERSION_* in include/dovetail/dovetail.h must match the project version");
#endif

thread_local char g_last_error[1024] = "";

// A failure with its C status, thrown by the checks in this file.
struct CError : std::runtime_error {
  dt_status status;
  CError(dt_status s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

[[noreturn]] void fail(dt_status s, const std::string& msg) { throw CError(s, msg); }

dt_status record(dt_status s, const char* fn, const char* what) noexcept {
  std::snprintf(g_last_error, sizeof g_last_error, "%s: %s", fn, what);
  return s;
}

// Runs `body` (returning void) and maps whatever it throws to a status and a message.
template <class F>
dt_status guarded(const char* fn, F&& body) noexcept {
  try {
    body();
    return DT_OK;
  } catch (const CError& e) {
    return record(e.status, fn, e.what());
  } catch (const dovetail::IndexError& e) {
    return record(DT_ERR_RANGE, fn, e.what());
  } catch (const dovetail::ValueError& e) {
    return record(DT_ERR_INVALID, fn, e.what());
  } catch (const std::bad_alloc&) {
    return record(DT_ERR_NO_MEMORY, fn, "out of memory");
  } catch (const std::length_error& e) {
    return record(DT_ERR_NO_MEMORY, fn, e.what());
  } catch (const std::exception& e) {
    return record(DT_ERR_INTERNAL, fn, e.what());
  } catch (...) {
    return record(DT_ERR_INTERNAL, fn, "unknown C++ exception");
  }
}

void need(const void* p, const char* what) {
  if (!p) fail(DT_ERR_NULL, std::string(what) + " is NULL");
}

constexpr int64_t kMaxDim = int64_t(1) << 31;  // any model dimension; keeps products far from overflow

void check_dim(int64_t v, const char* name) {
  if (v < 1 || v >= kMaxDim)
    fail(DT_ERR_INVALID, std::string(name) + " must be in [1, 2^31), got " + std::to_string(v));
}

void check_norm_params(float theta, float eps) {
  if (!(std::isfinite(theta) && theta > 0)) fail(DT_ERR_INVALID, "rope_theta must be positive and finite");
  if (!(std::isfinite(eps) && eps > 0)) fail(DT_ERR_INVALID, "rms_norm_eps must be positive and finite");
}

// The layer shape of a target or draft config (the two share these fields), checked.
template <typename Config>
dovetail::LayerDims checked_layer_dims(const Config* cfg) {
  check_dim(cfg->hidden_size, "hidden_size");
  check_dim(cfg->intermediate_size, "intermediate_size");
  check_dim(cfg->num_layers, "num_layers");
  check_dim(cfg->num_heads, "num_heads");
  check_dim(cfg->num_kv_heads, "num_kv_heads");
  check_dim(cfg->head_dim, "head_dim");
  check_norm_params(cfg->rope_theta, cfg->rms_norm_eps);
  dovetail::LayerDims d;
  d.dim = cfg->hidden_size;
  d.ffn = cfg->intermediate_size;
  d.heads = cfg->num_heads;
  d.kv_heads = cfg->num_kv_heads;
  d.head_dim = cfg->head_dim;
  d.rope_theta = cfg->rope_theta;
  d.eps = cfg->rms_norm_eps;
  return d;
}

dovetail::EngineOptions engine_options(int64_t context, int64_t max_batch, int32_t threads, int32_t kv_dtype) {
  if (kv_dtype != DT_KV_F32 && kv_dtype != DT_KV_BF16)
    fail(DT_ERR_INVALID, "kv_dtype must be DT_KV_F32 or DT_KV_BF16, got " + std::to_string(kv_dtype));
  dovetail::EngineOptions o;
  o.context = context;      // ranges checked by the engine
  o.max_batch = max_batch;
  o.threads = threads;
  o.kv_type = kv_dtype == DT_KV_F32 ? dovetail::KvType::F32 : dovetail::KvType::BF16;
  return o;
}

// Bytes a tensor of this dtype and shape occupies; throws on a shape the dtype cannot hold.
uint64_t expected_bytes(dovetail::WType t, int64_t rows, int64_t cols, const std::string& name) {
  const int64_t unit = dovetail::gguf_unit_bytes(t);
  if (dovetail::is_quantized(t)) {
    if (cols % dovetail::kQBlock)
      fail(DT_ERR_INVALID, "weight '" + name + "': " + dovetail::wtype_name(t) +
                               " needs a multiple of 32 columns, got " + std::to_string(cols));
    return (uint64_t)rows * (uint64_t)(cols / dovetail::kQBlock * unit);
  }
  return (uint64_t)rows * (uint64_t)(cols * unit);
}

// Descriptors -> views for the engine. Buffers whose alignment is too small for direct
// float reads (the norm vectors are read as float*) are copied into `keep` first.
dovetail::WeightMap weight_map(const dt_weight* weights, size_t n, std::vector<std::vector<unsigned char>>& keep) {
  if (n > 0) need(weights, "weights");
  if (n > (size_t)1 << 20) fail(DT_ERR_INVALID, "n_weights " + std::to_string(n) + " is implausibly large");
  dovetail::WeightMap views;
  size_t n_copies = 0;
  for (size_t i = 0; i < n; ++i)
    if ((uintptr_t)weights[i].data % alignof(std::max_align_t)) ++n_copies;
  keep.reserve(n_copies);  // the views point into these vectors: they must not move
  for (size_t i = 0; i < n; ++i) {
    const dt_weight& w = weights[i];
    const std::string at = "weights[" + std::to_string(i) + "]";
    if (!w.name) fail(DT_ERR_NULL, at + ".name is NULL");
    const std::string name(w.name, strnlen(w.name, 4096));
    if (w.dtype < DT_F32 || w.dtype > DT_Q4_1)
      fail(DT_ERR_INVALID, "weight '" + name + "' has unknown dtype code " + std::to_string(w.dtype) +
                               " (expected DT_F32..DT_Q4_1, 0..5)");
    if (w.ndim != 1 && w.ndim != 2)
      fail(DT_ERR_INVALID, "weight '" + name + "' has ndim " + std::to_string(w.ndim) + ", expected 1 or 2");
    for (int d = 0; d < w.ndim; ++d)
      if (w.shape[d] < 1 || w.shape[d] >= kMaxDim)
        fail(DT_ERR_INVALID, "weight '" + name + "' has shape[" + std::to_string(d) + "] = " +
                                 std::to_string(w.shape[d]) + ", expected a value in [1, 2^31)");
    const auto type = static_cast<dovetail::WType>(w.dtype);
    dovetail::WeightView v;
    v.type = type;
    v.rows = w.ndim == 2 ? w.shape[0] : 1;
    v.ndim = w.ndim;
    v.cols = w.shape[w.ndim - 1];
    const uint64_t want = expected_bytes(type, v.rows, v.cols, name);
    if (w.nbytes != want)
      fail(DT_ERR_INVALID, "weight '" + name + "' of shape " +
                               (w.ndim == 2 ? "(" + std::to_string(v.rows) + ", " : std::string("(")) +
                               std::to_string(v.cols) + ") in " + dovetail::wtype_name(type) + " needs " +
                               std::to_string(want) + " bytes, nbytes is " + std::to_string(w.nbytes));
    need(w.data, ("weight '" + name + "' data").c_str());
    if (views.count(name)) fail(DT_ERR_INVALID, "weight '" + name + "' is given twice");
    v.data = w.data;
    v.nbytes = (size_t)w.nbytes;
    if ((uintptr_t)w.data % alignof(std::max_align_t)) {
      const auto* p = static_cast<const unsigned char*>(w.data);
      keep.emplace_back(p, p + w.nbytes);
      v.data = keep.back().data();
    }
    views[name] = v;
  }
  return views;
}

// Rows 0..n-1, for "commit everything" and default positions.
std::vector<int64_t> all_rows(int64_t n) {
  std::vector<int64_t> r((size_t)n);
  for (int64_t i = 0; i < n; ++i) r[(size_t)i] = i;
  return r;
}

// positions, or n_past + 0..T-1 when NULL (in `storage`).
const int32_t* positions_or_default(const int32_t* positions, int64_t T, int64_t n_past, int64_t context,
                                    std::vector<int32_t>& storage) {
  if (positions) return positions;
  if (n_past + T > context)
    fail(DT_ERR_INVALID, "context full: " + std::to_string(n_past) + " committed + " + std::to_string(T) +
                             " new tokens exceed the context of " + std::to_string(context));
  storage.resize((size_t)T);
  for (int64_t t = 0; t < T; ++t) storage[(size_t)t] = (int32_t)(n_past + t);
  return storage.data();
}

void check_batch(int64_t T, int64_t max_batch) {
  if (T < 1) fail(DT_ERR_INVALID, "n_tokens must be >= 1, got " + std::to_string(T));
  if (T > max_batch)
    fail(DT_ERR_INVALID, "batch of " + std::to_string(T) + " tokens exceeds the engine's max_batch " +
                             std::to_string(max_batch));
}

void check_rows(const int64_t* rows, int64_t n, const void* out, const char* rows_name, const char* out_name) {
  if (n < 0) fail(DT_ERR_INVALID, std::string("n_") + rows_name + " must be >= 0, got " + std::to_string(n));
  if (n > 0) {
    need(rows, rows_name);
    need(out, out_name);
  }
}

// kept rows, or every pending row when kept is NULL and n_kept 0.
std::vector<int64_t> kept_rows(const int64_t* kept, int64_t n_kept, int64_t pending) {
  if (n_kept < 0) fail(DT_ERR_INVALID, "n_kept must be >= 0, got " + std::to_string(n_kept));
  if (!kept) {
    if (n_kept != 0) fail(DT_ERR_NULL, "kept is NULL with n_kept = " + std::to_string(n_kept));
    return all_rows(pending);
  }
  return std::vector<int64_t>(kept, kept + n_kept);
}

}  // namespace

// The handles: an engine and the lock that serializes calls on it (the engines lock their
// forward/commit/truncate themselves; this lock also covers the state queries).
// Engines are shared: a speculator keeps the two it drives alive after their handles go.
struct dt_target {
  std::mutex mu;
  std::shared_ptr<dovetail::LlamaEngine> engine;
};

struct dt_draft {
  std::mutex mu;
  std::shared_ptr<dovetail::DraftEngine> engine;
};

struct dt_speculator {
  std::mutex mu;
  std::shared_ptr<dovetail::LlamaEngine> target;
  std::shared_ptr<dovetail::DraftEngine> draft;
  std::unique_ptr<dovetail::GreedySpeculator> spec;
};

namespace {

const char* handle_name(const dt_target*) { return "target handle"; }
const char* handle_name(const dt_draft*) { return "draft handle"; }

// A call on a target or draft handle: the handle checked, its lock held, body(engine).
template <class Handle, class F>
dt_status locked_call(const char* fn, Handle* h, F&& body) noexcept {
  return guarded(fn, [&] {
    need(h, handle_name(h));
    std::lock_guard<std::mutex> lock(h->mu);
    body(*h->engine);
  });
}

// What the two engines share: commit, truncate, the state queries, the thread count.
template <class Handle>
dt_status engine_commit(const char* fn, Handle* h, const int64_t* kept, int64_t n_kept) noexcept {
  return locked_call(fn, h, [&](auto& e) {
    const std::vector<int64_t> rows = kept_rows(kept, n_kept, e.pending());
    e.commit(rows.data(), (int64_t)rows.size());
  });
}

template <class Handle, class Get>
dt_status engine_query(const char* fn, Handle* h, int64_t* out, Get get) noexcept {
  return locked_call(fn, h, [&](auto& e) {
    need(out, "out");
    *out = get(e);
  });
}

}  // namespace

extern "C" {

const char* dt_last_error(void) noexcept { return g_last_error; }

const char* dt_status_name(dt_status status) noexcept {
  switch (status) {
    case DT_OK: return "DT_OK";
    case DT_ERR_NULL: return "DT_ERR_NULL";
    case DT_ERR_INVALID: return "DT_ERR_INVALID";
    case DT_ERR_RANGE: return "DT_ERR_RANGE";
    case DT_ERR_NO_MEMORY: return "DT_ERR_NO_MEMORY";
    case DT_ERR_INTERNAL: return "DT_ERR_INTERNAL";
  }
  return "DT_ERR_UNKNOWN";
}

const char* dt_version_string(int* major, int* minor, int* patch) noexcept {
  if (major) *major = DT_VERSION_MAJOR;
  if (minor) *minor = DT_VERSION_MINOR;
  if (patch) *patch = DT_VERSION_PATCH;
  return DT_VERSION_STRING;
}

// ---- target ----------------------------------------------------------------------------

void dt_target_config_init(dt_target_config* cfg) noexcept {
  if (!cfg) return;
  std::memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->rope_theta = 10000.0f;
  cfg->rms_norm_eps = 1e-5f;
  cfg->context = 2048;
  cfg->max_batch = 128;
  cfg->threads = 1;
  cfg->kv_dtype = DT_KV_F32;
}

dt_status dt_target_create(const dt_target_config* cfg, const dt_weight* weights, size_t n_weights,
                           dt_target** out) noexcept {
  if (out) *out = nullptr;
  return guarded(__func__, [&] {
    need(out, "out");
    need(cfg, "cfg");
    if (cfg->struct_size != sizeof(dt_target_config))
      fail(DT_ERR_INVALID, "cfg->struct_size is " + std::to_string(cfg->struct_size) + ", expected " +
                               std::to_string(sizeof(dt_target_config)) +
                               " (initialise the config with dt_target_config_init)");
    check_dim(cfg->vocab_size, "vocab_size");
    dovetail::LlamaParams p;
    p.vocab = cfg->vocab_size;
    p.layers = cfg->num_layers;
    p.layer = checked_layer_dims(cfg);
    dovetail::LayerDims& d = p.layer;
    const dovetail::EngineOptions o = engine_options(cfg->context, cfg->max_batch, cfg->threads, cfg->kv_dtype);
    std::vector<std::vector<unsigned char>> keep;
    const dovetail::WeightMap views = weight_map(weights, n_weights, keep);
    d.qkv_bias = views.count("blk.0.attn_q.bias") > 0;   // Qwen2: the biases are given as weights
    d.qk_norm = views.count("blk.0.attn_q_norm") > 0;    // Qwen3: the q/k norms too
    d.post_norms = views.count("blk.0.post_attention_norm") > 0;  // Gemma 3: its post norms too
    if (cfg->activation != DT_ACT_SILU && cfg->activation != DT_ACT_GELU_TANH)
      fail(DT_ERR_INVALID,
           "activation must be DT_ACT_SILU or DT_ACT_GELU_TANH, got " + std::to_string(cfg->activation));
    if (cfg->sliding_window < 0 || cfg->sliding_window_pattern < 0 || !(cfg->rope_theta_local >= 0))
      fail(DT_ERR_INVALID, "sliding_window, sliding_window_pattern and rope_theta_local must not be negative");
    if (!std::isfinite(cfg->rope_theta_local))
      fail(DT_ERR_INVALID, "rope_theta_local must be finite");
    if (!(cfg->rope_attn_factor >= 0) || !std::isfinite(cfg->rope_attn_factor))
      fail(DT_ERR_INVALID, "rope_attn_factor must be a finite number >= 0 (0: none)");
    d.rope_mscale = cfg->rope_attn_factor > 0 ? cfg->rope_attn_factor : 1.0f;
    for (const auto& [v, name] : {std::pair{cfg->query_pre_attn_scalar, "query_pre_attn_scalar"},
                                  std::pair{cfg->attn_logit_softcapping, "attn_logit_softcapping"},
                                  std::pair{cfg->final_logit_softcapping, "final_logit_softcapping"}})
      if (!(v >= 0) || !std::isfinite(v))
        fail(DT_ERR_INVALID, std::string(name) + " must be a finite number >= 0 (0: none)");
    d.query_pre_attn_scalar = cfg->query_pre_attn_scalar;
    if (cfg->nope_interval < 0)
      fail(DT_ERR_INVALID, "nope_interval must not be negative, got " + std::to_string(cfg->nope_interval));
    d.nope_interval = cfg->nope_interval;
    d.attn_softcap = cfg->attn_logit_softcapping;
    p.final_softcap = cfg->final_logit_softcapping;
    d.gelu = cfg->activation == DT_ACT_GELU_TANH;
    d.window = cfg->sliding_window;
    d.swa_pattern = cfg->sliding_window_pattern;
    d.rope_theta_local = cfg->rope_theta_local;
    p.scale_embeddings = cfg->scale_embeddings != 0;
    auto h = std::make_unique<dt_target>();
    h->engine = std::make_unique<dovetail::LlamaEngine>(p, o, views);
    *out = h.release();
  });
}

dt_status dt_target_forward(dt_target* target, const int32_t* tokens, const int32_t* positions, int64_t n_tokens,
                            const uint8_t* ancestors, const int64_t* logit_rows, int64_t n_logit_rows, float* logits,
                            const int64_t* feature_rows, int64_t n_feature_rows, float* features) noexcept {
  return locked_call(__func__, target, [&](dovetail::LlamaEngine& e) {
    check_batch(n_tokens, e.options().max_batch);
    need(tokens, "tokens");
    check_rows(logit_rows, n_logit_rows, logits, "logit_rows", "logits");
    check_rows(feature_rows, n_feature_rows, features, "feature_rows", "features");
    std::vector<int32_t> pos;
    const int32_t* pp = positions_or_default(positions, n_tokens, e.n_past(), e.options().context, pos);
    e.forward(tokens, pp, n_tokens, ancestors, logit_rows, n_logit_rows, logits, feature_rows, n_feature_rows,
              features);
  });
}

dt_status dt_target_commit(dt_target* target, const int64_t* kept, int64_t n_kept) noexcept {
  return engine_commit(__func__, target, kept, n_kept);
}

dt_status dt_target_truncate(dt_target* target, int64_t n) noexcept {
  return locked_call(__func__, target, [&](auto& e) { e.truncate(n); });
}

dt_status dt_target_n_past(dt_target* target, int64_t* out) noexcept {
  return engine_query(__func__, target, out, [](auto& e) { return e.n_past(); });
}

dt_status dt_target_pending(dt_target* target, int64_t* out) noexcept {
  return engine_query(__func__, target, out, [](auto& e) { return e.pending(); });
}

dt_status dt_target_set_threads(dt_target* target, int32_t threads) noexcept {
  return locked_call(__func__, target, [&](auto& e) { e.set_threads(threads); });
}

void dt_target_destroy(dt_target* target) noexcept { delete target; }

// ---- draft -----------------------------------------------------------------------------

void dt_draft_config_init(dt_draft_config* cfg) noexcept {
  if (!cfg) return;
  std::memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->rope_theta = 10000.0f;
  cfg->rms_norm_eps = 1e-5f;
  cfg->context = 2048;
  cfg->max_batch = 128;
  cfg->threads = 1;
  cfg->kv_dtype = DT_KV_F32;
}

dt_status dt_draft_create(const dt_target* target, const dt_draft_config* cfg, const dt_weight* weights,
                          size_t n_weights, const int32_t* vocab_map, int64_t n_vocab_map, dt_draft** out) noexcept {
  if (out) *out = nullptr;
  return guarded(__func__, [&] {
    need(out, "out");
    need(target, "target handle");
    need(cfg, "cfg");
    if (cfg->struct_size != sizeof(dt_draft_config))
      fail(DT_ERR_INVALID, "cfg->struct_size is " + std::to_string(cfg->struct_size) + ", expected " +
                               std::to_string(sizeof(dt_draft_config)) +
                               " (initialise the config with dt_draft_config_init)");
    const dovetail::LayerDims d = checked_layer_dims(cfg);
    if (n_vocab_map < 0 || (vocab_map == nullptr) != (n_vocab_map == 0))
      fail(vocab_map ? DT_ERR_INVALID : DT_ERR_NULL,
           "vocab_map must be NULL with n_vocab_map 0, or point to n_vocab_map > 0 ids (got n_vocab_map " +
               std::to_string(n_vocab_map) + ")");
    std::vector<int32_t> vmap;
    if (vocab_map) vmap.assign(vocab_map, vocab_map + n_vocab_map);  // entries checked by the engine
    const dovetail::EngineOptions o = engine_options(cfg->context, cfg->max_batch, cfg->threads, cfg->kv_dtype);
    std::vector<std::vector<unsigned char>> keep;
    const dovetail::WeightMap views = weight_map(weights, n_weights, keep);
    // The target's embedding and LM head never change after construction: reading the
    // shared pointers needs no lock on the target.
    const dovetail::LlamaEngine& t = *target->engine;
    auto h = std::make_unique<dt_draft>();
    h->engine = std::make_unique<dovetail::DraftEngine>(d, cfg->num_layers, o, views, t.token_embedding(),
                                                        t.lm_head(), std::move(vmap));
    *out = h.release();
  });
}

dt_status dt_draft_forward(dt_draft* draft, const float* features, const int32_t* tokens, const int32_t* positions,
                           int64_t n_tokens, const uint8_t* ancestors, int append, float* hidden,
                           const int64_t* topk_rows, int64_t n_topk_rows, int64_t k, int32_t* topk_ids,
                           float* topk_logprobs) noexcept {
  return locked_call(__func__, draft, [&](dovetail::DraftEngine& e) {
    if (append != 0 && append != 1) fail(DT_ERR_INVALID, "append must be 0 or 1, got " + std::to_string(append));
    check_batch(n_tokens, e.options().max_batch);
    need(features, "features");
    need(tokens, "tokens");
    need(hidden, "hidden");
    check_rows(topk_rows, n_topk_rows, topk_ids, "topk_rows", "topk_ids");
    if (n_topk_rows > 0) need(topk_logprobs, "topk_logprobs");
    std::vector<int32_t> pos;
    const int64_t P = append ? e.pending() : 0;
    const int32_t* pp = positions_or_default(positions, n_tokens, e.n_past() + P, e.options().context, pos);
    e.forward(features, tokens, pp, n_tokens, ancestors, append != 0, hidden, topk_rows, n_topk_rows, k, topk_ids,
              topk_logprobs);
  });
}

dt_status dt_draft_commit(dt_draft* draft, const int64_t* kept, int64_t n_kept) noexcept {
  return engine_commit(__func__, draft, kept, n_kept);
}

dt_status dt_draft_truncate(dt_draft* draft, int64_t n) noexcept {
  return locked_call(__func__, draft, [&](auto& e) { e.truncate(n); });
}

dt_status dt_draft_n_past(dt_draft* draft, int64_t* out) noexcept {
  return engine_query(__func__, draft, out, [](auto& e) { return e.n_past(); });
}

dt_status dt_draft_pending(dt_draft* draft, int64_t* out) noexcept {
  return engine_query(__func__, draft, out, [](auto& e) { return e.pending(); });
}

dt_status dt_draft_set_threads(dt_draft* draft, int32_t threads) noexcept {
  return locked_call(__func__, draft, [&](auto& e) { e.set_threads(threads); });
}

void dt_draft_destroy(dt_draft* draft) noexcept { delete draft; }

// ---- speculator ------------------------------------------------------------------------

void dt_tree_shape_init(dt_tree_shape* shape) noexcept {
  if (!shape) return;
  std::memset(shape, 0, sizeof *shape);
  shape->struct_size = sizeof(dt_tree_shape);
  shape->top_k = 2;  // the Python TreeParams() defaults
  shape->depth = 1;
  shape->total_tokens = 3;
  shape->min_prob = 0.1;
}

dt_status dt_speculator_create(dt_target* target, dt_draft* draft, dt_speculator** out) noexcept {
  if (out) *out = nullptr;
  return guarded(__func__, [&] {
    need(out, "out");
    need(target, "target handle");
    need(draft, "draft handle");
    auto h = std::make_unique<dt_speculator>();
    {
      std::lock_guard<std::mutex> lt(target->mu);
      h->target = target->engine;
    }
    {
      std::lock_guard<std::mutex> ld(draft->mu);
      h->draft = draft->engine;
    }
    h->spec = std::make_unique<dovetail::GreedySpeculator>(*h->target, *h->draft);
    *out = h.release();
  });
}

dt_status dt_speculator_step(dt_speculator* spec, const float* features, const int32_t* next_tokens, int64_t n,
                             const dt_tree_shape* shape, int32_t* emitted, float* emitted_features,
                             int64_t* n_emitted) noexcept {
  if (n_emitted) *n_emitted = 0;
  return guarded(__func__, [&] {
    need(spec, "speculator handle");
    need(features, "features");
    need(next_tokens, "next_tokens");
    need(shape, "shape");
    need(emitted, "emitted");
    need(n_emitted, "n_emitted");
    if (shape->struct_size != sizeof(dt_tree_shape))
      fail(DT_ERR_INVALID, "shape->struct_size is " + std::to_string(shape->struct_size) + ", expected " +
                               std::to_string(sizeof(dt_tree_shape)) + " (initialise it with dt_tree_shape_init)");
    if (!(shape->min_prob >= 0.0 && shape->min_prob < 1.0))
      fail(DT_ERR_INVALID, "shape->min_prob must be in [0, 1), got " + std::to_string(shape->min_prob));
    dovetail::TreeShape ts;
    ts.top_k = shape->top_k;
    ts.depth = shape->depth;
    ts.total_tokens = shape->total_tokens;
    if (shape->min_prob > 0.0) ts.min_score = std::log(shape->min_prob);
    std::lock_guard<std::mutex> lock(spec->mu);
    const dovetail::GreedyStep r = spec->spec->step(features, next_tokens, n, ts);
    const int64_t m = (int64_t)r.emitted.size();
    std::memcpy(emitted, r.emitted.data(), sizeof(int32_t) * m);
    if (emitted_features) std::memcpy(emitted_features, r.features.data(), sizeof(float) * r.features.size());
    *n_emitted = m;
  });
}

void dt_speculator_destroy(dt_speculator* spec) noexcept { delete spec; }

void dt_lookup_params_init(dt_lookup_params* params) noexcept {
  if (!params) return;
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof(dt_lookup_params);
  const dovetail::LookupParams d;
  params->min_n = d.min_n;
  params->max_n = d.max_n;
  params->max_tokens = d.max_tokens;
}

dt_status dt_speculator_set_lookup(dt_speculator* spec, const dt_lookup_params* params) noexcept {
  return guarded(__func__, [&] {
    need(spec, "speculator handle");
    std::lock_guard<std::mutex> lock(spec->mu);
    if (!params) return spec->spec->set_lookup(nullptr);
    if (params->struct_size != sizeof(dt_lookup_params))
      fail(DT_ERR_INVALID, "params->struct_size is " + std::to_string(params->struct_size) + ", expected " +
                               std::to_string(sizeof(dt_lookup_params)) +
                               " (initialise it with dt_lookup_params_init)");
    const dovetail::LookupParams p{params->min_n, params->max_n, params->max_tokens};
    spec->spec->set_lookup(&p);
  });
}

void dt_corpus_params_init(dt_corpus_params* params) noexcept {
  if (!params) return;
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof(dt_corpus_params);
  const dovetail::CorpusParams d;
  params->min_n = d.min_n;
  params->max_n = d.max_n;
  params->max_tokens = d.max_tokens;
  params->min_count = d.min_count;
  params->min_frac = d.min_frac;
}

dt_status dt_speculator_set_corpus(dt_speculator* spec, const int32_t* tokens, int64_t n,
                                   const dt_corpus_params* params) noexcept {
  return guarded(__func__, [&] {
    need(spec, "speculator handle");
    if (!tokens) {
      if (n != 0) fail(DT_ERR_NULL, "tokens is NULL with n " + std::to_string(n));
      std::lock_guard<std::mutex> lock(spec->mu);
      return spec->spec->set_corpus(nullptr);
    }
    need(params, "params");
    if (params->struct_size != sizeof(dt_corpus_params))
      fail(DT_ERR_INVALID, "params->struct_size is " + std::to_string(params->struct_size) + ", expected " +
                               std::to_string(sizeof(dt_corpus_params)) +
                               " (initialise it with dt_corpus_params_init)");
    if (n < 0) fail(DT_ERR_INVALID, "n must be >= 0, got " + std::to_string(n));
    const dovetail::CorpusParams p{params->min_n, params->max_n, params->max_tokens, params->min_count,
                                   params->min_frac};
    auto corpus = std::make_shared<const dovetail::TokenCorpus>(std::vector<int32_t>(tokens, tokens + n), p);
    std::lock_guard<std::mutex> lock(spec->mu);
    spec->spec->set_corpus(std::move(corpus));
  });
}

dt_status dt_speculator_reset(dt_speculator* spec) noexcept {
  return guarded(__func__, [&] {
    need(spec, "speculator handle");
    std::lock_guard<std::mutex> lock(spec->mu);
    spec->spec->reset();
  });
}

}  // extern "C"
