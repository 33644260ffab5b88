// Engine bindings: the target (LlamaEngine), the CPU draft (DraftEngine) and the device
// draft (DeviceDraftEngine: CUDA, or its host test backend), built from loader output, with
// the GIL released around native compute.
#include <pybind11/stl.h>

#include <cmath>

#include "bindings/common.h"
#include "model/device_engine.h"
#include "model/draft.h"
#include "model/llama.h"
#include "model/speculative.h"

namespace dovetail::bind {

namespace {

int64_t get_int(const py::dict& d, const char* key) {
  DT_CHECK(d.contains(key), std::string("model config is missing '") + key + "'");
  return d[key].cast<int64_t>();
}

// An optional boolean of the model config (absent: false).
bool get_flag(const py::dict& d, const char* key) { return d.contains(key) && d[key].cast<bool>(); }

float get_float(const py::dict& d, const char* key) {
  DT_CHECK(d.contains(key), std::string("model config is missing '") + key + "'");
  return d[key].cast<float>();
}

LayerDims layer_dims(const py::dict& cfg) {
  LayerDims d;
  d.dim = get_int(cfg, "hidden_size");
  d.ffn = get_int(cfg, "intermediate_size");
  d.heads = get_int(cfg, "num_heads");
  d.kv_heads = get_int(cfg, "num_kv_heads");
  d.head_dim = get_int(cfg, "head_dim");
  d.rope_theta = get_float(cfg, "rope_theta");
  d.eps = get_float(cfg, "rms_norm_eps");
  d.qkv_bias = get_flag(cfg, "attention_bias");  // Qwen2
  d.qk_norm = get_flag(cfg, "qk_norm");          // Qwen3
  d.post_norms = get_flag(cfg, "post_norms");    // Gemma 3
  d.gelu = cfg.contains("activation") && cfg["activation"].cast<std::string>() == "gelu_tanh";
  if (cfg.contains("sliding_window")) d.window = get_int(cfg, "sliding_window");
  if (cfg.contains("sliding_window_pattern")) d.swa_pattern = get_int(cfg, "sliding_window_pattern");
  if (cfg.contains("rope_theta_local")) d.rope_theta_local = get_float(cfg, "rope_theta_local");
  if (cfg.contains("rope_attn_factor")) d.rope_mscale = get_float(cfg, "rope_attn_factor");  // LongRoPE
  if (cfg.contains("attn_logit_softcapping")) d.attn_softcap = get_float(cfg, "attn_logit_softcapping");  // Gemma 2
  if (cfg.contains("query_pre_attn_scalar")) d.query_pre_attn_scalar = get_float(cfg, "query_pre_attn_scalar");
  if (cfg.contains("nope_interval")) d.nope_interval = get_int(cfg, "nope_interval");  // SmolLM3
  return d;
}

EngineOptions engine_options(int64_t context, int64_t max_batch, int threads, const std::string& kv_dtype) {
  DT_CHECK(kv_dtype == "f32" || kv_dtype == "bf16", "kv_dtype must be 'f32' or 'bf16', got '" + kv_dtype + "'");
  EngineOptions o;
  o.context = context;
  o.max_batch = max_batch;
  o.threads = threads;
  o.kv_type = kv_dtype == "f32" ? KvType::F32 : KvType::BF16;
  return o;
}

// weights: name -> (dtype, shape, buffer). The arrays in `keep` must outlive the map.
WeightMap weight_map(const py::dict& weights, std::vector<py::array>& keep) {
  WeightMap views;
  for (auto item : weights) {
    const std::string name = item.first.cast<std::string>();
    auto tup = item.second.cast<py::tuple>();
    DT_CHECK(tup.size() == 3, "weight '" + name + "' must be (dtype, shape, data)");
    WeightView v;
    v.type = wtype_from_name(tup[0].cast<std::string>());
    auto shape = tup[1].cast<std::vector<int64_t>>();
    DT_CHECK(shape.size() == 1 || shape.size() == 2, "weight '" + name + "' must be 1-D or 2-D");
    v.rows = shape.size() == 2 ? shape[0] : 1;
    v.cols = shape.back();
    v.ndim = (int)shape.size();
    py::array arr = py::array::ensure(tup[2]);
    DT_CHECK(arr && (arr.flags() & py::array::c_style), "weight '" + name + "' data must be a C-contiguous array");
    v.data = arr.data();
    v.nbytes = (size_t)arr.nbytes();
    keep.push_back(arr);
    views[name] = v;
  }
  return views;
}

std::vector<int64_t> row_list(const py::handle& obj, const char* name) {
  if (obj.is_none()) return {};
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  DT_CHECK(a && a.ndim() == 1, std::string(name) + " must be a 1-D integer array");
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

py::array_t<int32_t, py::array::c_style> int32_vector(const py::handle& obj, const char* name) {
  auto a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  DT_CHECK(a && a.ndim() == 1, std::string(name) + " must be a 1-D integer array");
  return a;
}

// The argument handling of LlamaEngine.forward / forward_hidden around `run`, which gets
// (positions, T, ancestors or null, logit rows, logits out, feature rows, features out) and
// runs without the GIL. Returns (logits [n_logits, V], features [n_features, D]).
template <typename Run>
py::tuple target_call(const LlamaEngine& e, const py::handle& pos_obj, int64_t T, const py::handle& anc_obj,
                      const py::handle& logit_obj, const py::handle& feat_obj, Run&& run) {
  auto positions = int32_vector(pos_obj, "positions");
  DT_CHECK(positions.size() == T, "positions has " + std::to_string(positions.size()) + " entries for " +
                                      std::to_string(T) + " tokens");
  py::array_t<uint8_t, py::array::c_style> anc;
  if (!anc_obj.is_none()) anc = ancestor_matrix(anc_obj, T, T);
  auto lrows = row_list(logit_obj, "logit_rows");
  auto frows = row_list(feat_obj, "feature_rows");
  DT_CHECK((int64_t)lrows.size() <= e.options().max_batch, "too many logit rows");
  DT_CHECK((int64_t)frows.size() <= e.options().max_batch, "too many feature rows");
  py::array_t<float> logits({(int64_t)lrows.size(), e.params().vocab});
  py::array_t<float> feats({(int64_t)frows.size(), e.params().layer.dim});
  const uint8_t* ap = anc_obj.is_none() ? nullptr : anc.data();
  {
    py::gil_scoped_release nogil;
    run(positions.data(), T, ap, lrows, logits.mutable_data(), frows, feats.mutable_data());
  }
  return py::make_tuple(logits, feats);
}

py::dict stats_dict(const DeviceDraftStats& s) {
  py::dict d;
  d["calls"] = s.calls; d["replays"] = s.replays;
  d["h2d_bytes"] = s.h2d_bytes; d["d2h_bytes"] = s.d2h_bytes;
  d["last_h2d_bytes"] = s.last_h2d_bytes; d["last_d2h_bytes"] = s.last_d2h_bytes;
  d["transfer_ms"] = s.transfer_ms; d["call_ms"] = s.call_ms;
  return d;
}

// The backend of a device engine: "host" (the CPU test double) or "cuda".
std::unique_ptr<DeviceOps> device_ops(const std::string& backend, int device) {
  DT_CHECK(backend == "host" || backend == "cuda", "backend must be 'host' or 'cuda', got '" + backend + "'");
  if (backend == "host") return make_host_ops();
#ifdef DOVETAIL_WITH_CUDA
  return make_cuda_ops(device);
#else
  (void)device;
  throw_value_error("the CUDA engines need a build with CUDA (DOVETAIL_CUDA=ON); this build has none");
#endif
}

// A speculator call's pairs: features [n, D] (float32) and next_tokens [n], checked.
struct StepInputs {
  py::array_t<float, py::array::c_style> feats;
  py::array_t<int32_t, py::array::c_style> tokens;
  int64_t n = 0;
  StepInputs(const GreedySpeculator& g, const py::handle& feat_obj, const py::handle& tok_obj)
      : feats(as_array<float>(feat_obj, "features")), tokens(int32_vector(tok_obj, "next_tokens")),
        n((int64_t)tokens.size()) {
    check_shape(feats, {n, g.dim()}, "features");
  }
};

// A greedy step's outputs as arrays: emitted [m] (int64), features [m, D] and rows [m, V]
// (empty when not asked for).
struct StepArrays {
  py::array_t<int64_t> emitted;
  py::array_t<float> features, rows;
  explicit StepArrays(const GreedyStep& r) {
    const int64_t m = (int64_t)r.emitted.size();
    const int64_t D = m ? (int64_t)r.features.size() / m : 0, V = m ? (int64_t)r.rows.size() / m : 0;
    emitted = py::array_t<int64_t>(m);
    std::copy(r.emitted.begin(), r.emitted.end(), emitted.mutable_data());
    features = py::array_t<float>({m, D});
    std::copy(r.features.begin(), r.features.end(), features.mutable_data());
    rows = py::array_t<float>({m, V});
    std::copy(r.rows.begin(), r.rows.end(), rows.mutable_data());
  }
};

}  // namespace


void bind_engine(py::module_& m) {
  py::class_<LlamaEngine>(m, "LlamaEngine",
      "Native LLaMA target engine (use dovetail_ext.target.TargetEngine, which builds it from a ModelSource).")
      .def(py::init([](const py::dict& cfg, const py::dict& weights, int64_t context, int64_t max_batch,
                       int threads, const std::string& kv_dtype, int64_t first_layer, int64_t sequences) {
             LlamaParams p{get_int(cfg, "vocab_size"), get_int(cfg, "num_layers"), layer_dims(cfg), first_layer,
                           get_flag(cfg, "scale_embeddings")};
             if (cfg.contains("final_logit_softcapping")) p.final_softcap = get_float(cfg, "final_logit_softcapping");
             EngineOptions o = engine_options(context, max_batch, threads, kv_dtype);
             o.sequences = sequences;
             std::vector<py::array> keep;
             WeightMap views = weight_map(weights, keep);
             py::gil_scoped_release nogil;
             return std::make_unique<LlamaEngine>(p, o, views);
           }),
           py::arg("config"), py::arg("weights"), py::arg("context"), py::arg("max_batch") = 128,
           py::arg("threads") = 1, py::arg("kv_dtype") = "f32", py::arg("first_layer") = 0,
           py::arg("sequences") = 1)
      .def("forward_sequences", [](LlamaEngine& e, const py::handle& tok_obj, const py::handle& pos_obj,
                                   const py::handle& seq_obj) {
             auto tokens = int32_vector(tok_obj, "tokens");
             auto positions = int32_vector(pos_obj, "positions");
             auto seqs = row_list(seq_obj, "sequences");
             const int64_t S = (int64_t)tokens.size();
             DT_CHECK(positions.size() == S && (int64_t)seqs.size() == S,
                      "tokens, positions and sequences must have one entry per row (got " + std::to_string(S) +
                          ", " + std::to_string(positions.size()) + ", " + std::to_string(seqs.size()) + ")");
             DT_CHECK(S <= e.options().max_batch, std::to_string(S) + " sequences exceed the engine's max_batch");
             py::array_t<float> logits({S, e.params().vocab});
             {
               py::gil_scoped_release nogil;
               e.forward_seqs(tokens.data(), positions.data(), seqs.data(), S, logits.mutable_data());
             }
             return logits;
           },
           py::arg("tokens"), py::arg("positions"), py::arg("sequences"),
           "One token for each of S distinct sequences in one pass; returns logits [S, V]. Each row is "
           "committed to its sequence at once.")
      .def("select_sequence", [](LlamaEngine& e, int64_t s) { e.select(s); }, py::arg("sequence"),
           "The sequence forward / commit / truncate / n_past act on (the selected one's rows committed).")
      .def("n_past_of", &LlamaEngine::n_past_of, py::arg("sequence"))
      .def_property_readonly("sequence", &LlamaEngine::sequence)
      .def_property_readonly("sequences", &LlamaEngine::sequences)
      .def("forward", [](LlamaEngine& e, const py::handle& tok_obj, const py::handle& pos_obj,
                         const py::handle& anc_obj, const py::handle& logit_obj, const py::handle& feat_obj) {
             auto tokens = int32_vector(tok_obj, "tokens");
             return target_call(e, pos_obj, (int64_t)tokens.size(), anc_obj, logit_obj, feat_obj,
                                [&](const int32_t* pos, int64_t T, const uint8_t* ap, const std::vector<int64_t>& lr,
                                    float* logits, const std::vector<int64_t>& fr, float* feats) {
                                  e.forward(tokens.data(), pos, T, ap, lr.data(), (int64_t)lr.size(), logits,
                                            fr.data(), (int64_t)fr.size(), feats);
                                });
           },
           py::arg("tokens"), py::arg("positions"), py::arg("ancestors") = py::none(),
           py::arg("logit_rows") = py::none(), py::arg("feature_rows") = py::none(),
           "Run T tokens; returns (logits [len(logit_rows), V], features [len(feature_rows), D]).")
      .def("forward_hidden", [](LlamaEngine& e, const py::handle& h_obj, const py::handle& pos_obj,
                                const py::handle& anc_obj, const py::handle& logit_obj, const py::handle& feat_obj) {
             auto hidden = as_array<float>(h_obj, "hidden");
             const int64_t T = hidden.ndim() == 2 ? hidden.shape(0) : -1;
             check_shape(hidden, {T, e.params().layer.dim}, "hidden");
             return target_call(e, pos_obj, T, anc_obj, logit_obj, feat_obj,
                                [&](const int32_t* pos, int64_t n, const uint8_t* ap, const std::vector<int64_t>& lr,
                                    float* logits, const std::vector<int64_t>& fr, float* feats) {
                                  e.forward_hidden(hidden.data(), pos, n, ap, lr.data(), (int64_t)lr.size(), logits,
                                                   fr.data(), (int64_t)fr.size(), feats);
                                });
           },
           py::arg("hidden"), py::arg("positions"), py::arg("ancestors") = py::none(),
           py::arg("logit_rows") = py::none(), py::arg("feature_rows") = py::none(),
           "As forward, from the hidden states [T, D] entering layer first_layer (after a device prefix).")
      .def("commit", [](LlamaEngine& e, const py::handle& kept_obj) {
             auto kept = row_list(kept_obj, "kept");
             py::gil_scoped_release nogil;
             e.commit(kept.data(), (int64_t)kept.size());
           }, py::arg("kept"), "Keep these rows of the last forward (strictly increasing) in the KV cache.")
      .def("truncate", [](LlamaEngine& e, int64_t n) { e.truncate(n); }, py::arg("n"),
           "Forget committed tokens past n.")
      .def("read_kv", [](const LlamaEngine& e, int64_t layer) {
             const int64_t n = e.n_past(), KV = e.params().layer.kv_heads, Dh = e.params().layer.head_dim;
             py::array_t<float> k({KV, n, Dh}), v({KV, n, Dh});
             e.kv().read(layer, n, k.mutable_data(), v.mutable_data());
             return py::make_tuple(k, v);
           }, py::arg("layer"), "Committed K and V of one layer as fp32 [KV, n_past, Dh].")
      .def("set_threads", &LlamaEngine::set_threads, py::arg("threads"))
      .def_property_readonly("n_past", &LlamaEngine::n_past)
      .def_property_readonly("pending", &LlamaEngine::pending)
      .def_property_readonly("context", [](const LlamaEngine& e) { return e.options().context; })
      .def_property_readonly("max_batch", [](const LlamaEngine& e) { return e.options().max_batch; })
      .def_property_readonly("threads", [](const LlamaEngine& e) { return e.options().threads; })
      .def_property_readonly("first_layer", [](const LlamaEngine& e) { return e.params().first_layer; })
      .def_property_readonly("weight_bytes", &LlamaEngine::weight_bytes)
      .def_property_readonly("kv_bytes", &LlamaEngine::kv_bytes);

  py::class_<DraftEngine>(m, "DraftEngine",
      "Native CPU Dovetail draft (use dovetail_ext.draft.Draft). Shares the target engine's embedding and LM head.")
      .def(py::init([](const py::dict& cfg, const py::dict& weights, const LlamaEngine& target, int64_t context,
                       int64_t max_batch, int threads, const std::string& kv_dtype, const py::handle& vmap_obj) {
             LayerDims d = layer_dims(cfg);
             std::vector<int32_t> vmap;
             if (!vmap_obj.is_none()) {
               auto a = int32_vector(vmap_obj, "vocab_map");
               vmap.assign(a.data(), a.data() + a.size());
             }
             EngineOptions o = engine_options(context, max_batch, threads, kv_dtype);
             std::vector<py::array> keep;
             WeightMap views = weight_map(weights, keep);
             const int64_t layers = get_int(cfg, "num_layers");
             py::gil_scoped_release nogil;
             return std::make_unique<DraftEngine>(d, layers, o, views, target.token_embedding(), target.lm_head(),
                                                  std::move(vmap));
           }),
           py::arg("config"), py::arg("weights"), py::arg("target"), py::arg("context"), py::arg("max_batch") = 128,
           py::arg("threads") = 1, py::arg("kv_dtype") = "f32", py::arg("vocab_map") = py::none(),
           py::keep_alive<1, 4>())
      .def("forward", [](DraftEngine& e, const py::handle& feat_obj, const py::handle& tok_obj,
                         const py::handle& pos_obj, const py::handle& anc_obj, bool append,
                         const py::handle& topk_obj, int64_t k) {
             auto feats = as_array<float>(feat_obj, "features");
             auto tokens = int32_vector(tok_obj, "tokens");
             auto positions = int32_vector(pos_obj, "positions");
             const int64_t T = tokens.size(), D = e.dims().dim;
             check_shape(feats, {T, D}, "features");
             DT_CHECK(positions.size() == T, "positions has " + std::to_string(positions.size()) +
                                                 " entries for " + std::to_string(T) + " tokens");
             const int64_t P = append ? e.pending() : 0;
             py::array_t<uint8_t, py::array::c_style> anc;
             if (!anc_obj.is_none()) anc = ancestor_matrix(anc_obj, T, P + T);
             auto rows = row_list(topk_obj, "topk_rows");
             py::array_t<float> hidden({T, D});
             py::array_t<int32_t> ids({(int64_t)rows.size(), k});
             py::array_t<float> logp({(int64_t)rows.size(), k});
             const uint8_t* ap = anc_obj.is_none() ? nullptr : anc.data();
             {
               py::gil_scoped_release nogil;
               e.forward(feats.data(), tokens.data(), positions.data(), T, ap, append, hidden.mutable_data(),
                         rows.data(), (int64_t)rows.size(), k, ids.mutable_data(), logp.mutable_data());
             }
             return py::make_tuple(hidden, ids, logp);
           },
           py::arg("features"), py::arg("tokens"), py::arg("positions"), py::arg("ancestors") = py::none(),
           py::arg("append") = false, py::arg("topk_rows") = py::none(), py::arg("k") = 1,
           "Draft forward; returns (hidden [T, D], topk ids [len(topk_rows), k], topk logp [len(topk_rows), k]).")
      .def("commit", [](DraftEngine& e, const py::handle& kept_obj) {
             auto kept = row_list(kept_obj, "kept");
             py::gil_scoped_release nogil;
             e.commit(kept.data(), (int64_t)kept.size());
           }, py::arg("kept"))
      .def("truncate", [](DraftEngine& e, int64_t n) { e.truncate(n); }, py::arg("n"))
      .def("set_threads", &DraftEngine::set_threads, py::arg("threads"))
      .def_property_readonly("n_past", &DraftEngine::n_past)
      .def_property_readonly("pending", &DraftEngine::pending)
      .def_property_readonly("context", [](const DraftEngine& e) { return e.options().context; })
      .def_property_readonly("max_batch", [](const DraftEngine& e) { return e.options().max_batch; })
      .def_property_readonly("weight_bytes", &DraftEngine::weight_bytes)
      .def_property_readonly("draft_vocab", &DraftEngine::draft_vocab);

  py::class_<GreedyVerifier>(m, "GreedyVerifier",
      "Greedy verification of a tree on the target: one call, the acceptance and the commit (see "
      "dovetail_ext.target.TargetEngine.verify_greedy). Holds a reference to the engine.")
      .def(py::init([](LlamaEngine& target) { return std::make_unique<GreedyVerifier>(target); }),
           py::arg("target"), py::keep_alive<1, 2>())
      .def("verify", [](GreedyVerifier& v, const py::handle& tok_obj, const py::handle& par_obj, bool features,
                        bool rows) -> py::tuple {
             DraftTree tree;
             const auto toks = int32_vector(tok_obj, "tokens");
             tree.tokens.assign(toks.data(), toks.data() + toks.size());
             tree.parents = row_list(par_obj, "parents");
             GreedyStep r;
             {
               py::gil_scoped_release nogil;
               v.run(tree, r, rows, features);
             }
             const StepArrays a(r);
             return py::make_tuple(a.emitted, features ? py::object(a.features) : py::none(), r.verify_s, r.accept_s,
                                   rows ? py::object(a.rows) : py::none());
           },
           py::arg("tokens"), py::arg("parents"), py::arg("features") = true, py::arg("rows") = false,
           "Verify a tree (tokens [K], parents [K]: -1 for the root, which comes first, then each parent before "
           "its children) after the committed prefix in one target call, accept greedily and commit the "
           "accepted path. Returns (emitted tokens: the accepted ones and the bonus, target features of the "
           "committed rows [len(emitted), D] or None, verify / accept seconds, the logits row each emitted "
           "token was chosen from [len(emitted), V] or None).");

  py::class_<GreedySpeculator>(m, "GreedySpeculator",
      "Greedy speculative decoding, one native call per step, with the CPU draft or a device draft (see "
      "dovetail_ext.speculative). Holds references to both engines.")
      .def(py::init([](LlamaEngine& target, DraftEngine& draft) {
             return std::make_unique<GreedySpeculator>(target, draft);
           }),
           py::arg("target"), py::arg("draft"), py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def(py::init([](LlamaEngine& target, DeviceDraftEngine& draft) {
             return std::make_unique<GreedySpeculator>(target, draft);
           }),
           py::arg("target"), py::arg("draft"), py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def("step", [](GreedySpeculator& g, const py::handle& feat_obj, const py::handle& tok_obj, int64_t top_k,
                      int64_t depth, int64_t total_tokens, double min_score, bool rows) -> py::tuple {
             const StepInputs in(g, feat_obj, tok_obj);
             GreedyStep r;
             {
               py::gil_scoped_release nogil;
               r = g.step(in.feats.data(), in.tokens.data(), in.n, TreeShape{top_k, depth, total_tokens, min_score},
                          rows);
             }
             const StepArrays a(r);
             if (!rows) return py::make_tuple(a.emitted, a.features, r.tree_size, r.draft_s, r.verify_s, r.accept_s);
             return py::make_tuple(a.emitted, a.features, r.tree_size, r.draft_s, r.verify_s, r.accept_s, a.rows);
           },
           py::arg("features"), py::arg("next_tokens"), py::arg("top_k"), py::arg("depth"), py::arg("total_tokens"),
           py::arg("min_score"), py::arg("rows") = false,
           "One step: feed the draft the pairs (features [n, D], next_tokens [n], the last being the root), grow "
           "a tree, verify it on the target, commit the accepted path. Returns (emitted tokens: accepted + bonus, "
           "target features of the committed rows, tree size, draft / verify / accept seconds); with rows=True "
           "also the target's logits row each emitted token was chosen from [len(emitted), V].")
      .def("propose", [](GreedySpeculator& g, const py::handle& feat_obj, const py::handle& tok_obj, int64_t top_k,
                         int64_t depth, int64_t total_tokens, double min_score) {
             const StepInputs in(g, feat_obj, tok_obj);
             DraftTree t;
             {
               py::gil_scoped_release nogil;
               t = g.propose(in.feats.data(), in.tokens.data(), in.n, TreeShape{top_k, depth, total_tokens, min_score});
             }
             py::array_t<int64_t> toks((int64_t)t.tokens.size()), parents((int64_t)t.parents.size());
             std::copy(t.tokens.begin(), t.tokens.end(), toks.mutable_data());
             std::copy(t.parents.begin(), t.parents.end(), parents.mutable_data());
             return py::make_tuple(toks, parents);
           },
           py::arg("features"), py::arg("next_tokens"), py::arg("top_k"), py::arg("depth"), py::arg("total_tokens"),
           py::arg("min_score"),
           "Steps 1-3 only: feed the draft the pairs and grow a tree; returns (tokens, parents), root first.")
      .def("set_lookup", [](GreedySpeculator& g, const py::object& params) {
             if (params.is_none()) return g.set_lookup(nullptr);
             const LookupParams p{params.attr("min_n").cast<int64_t>(), params.attr("max_n").cast<int64_t>(),
                                  params.attr("max_tokens").cast<int64_t>()};
             g.set_lookup(&p);
           },
           py::arg("params"),
           "Prompt lookup in step() (params with min_n, max_n, max_tokens, e.g. dovetail_ext.lookup.LookupParams), "
           "or None (off, the default): a step whose context repeats verifies the chain that followed, and the "
           "draft takes its pairs in at its next step. Resets.")
      .def("set_corpus", [](GreedySpeculator& g, std::shared_ptr<TokenCorpus> c) { g.set_corpus(std::move(c)); },
           py::arg("corpus").none(true),
           "A TokenCorpus for the lookup where the context has no match, or None (kept across set_lookup).")
      .def("reset", &GreedySpeculator::reset, "Drop the lookup context and the pairs held back for the draft.")
      .def_property_readonly("lookup_steps", &GreedySpeculator::lookup_steps,
                             "Steps so far that verified a prompt-lookup chain.")
      .def_property_readonly("corpus_steps", &GreedySpeculator::corpus_steps,
                             "Those of them whose chain came from the corpus.");

  py::class_<TokenCorpus, std::shared_ptr<TokenCorpus>>(m, "TokenCorpus",
      "A body of tokens indexed for corpus lookup (dovetail_ext.lookup.TokenCorpus wraps it).")
      .def(py::init([](const py::handle& tok_obj, int64_t min_n, int64_t max_n, int64_t max_tokens,
                       int64_t min_count, double min_frac) {
             auto t = as_array<int32_t>(tok_obj, "tokens");
             check_shape(t, {-1}, "tokens");
             std::vector<int32_t> v(t.data(), t.data() + t.shape(0));
             py::gil_scoped_release nogil;
             return std::make_shared<TokenCorpus>(std::move(v), CorpusParams{min_n, max_n, max_tokens, min_count, min_frac});
           }),
           py::arg("tokens"), py::arg("min_n"), py::arg("max_n"), py::arg("max_tokens"), py::arg("min_count"),
           py::arg("min_frac"))
      .def("propose", [](const TokenCorpus& c, const py::handle& ctx_obj, int64_t limit) {
             auto ctx = as_array<int32_t>(ctx_obj, "context");
             check_shape(ctx, {-1}, "context");
             std::vector<int32_t> out(c.params().max_tokens);
             const int64_t k = c.propose(ctx.data(), ctx.shape(0), limit, out.data());
             return py::array_t<int32_t>(k, out.data());
           },
           py::arg("context"), py::arg("limit"),
           "The chain for a context (int32, at most min(limit, max_tokens) tokens; empty: no suffix qualified).")
      .def_property_readonly("tokens", [](const TokenCorpus& c) {
             return py::array_t<int32_t>((py::ssize_t)c.tokens().size(), c.tokens().data());
           })
      .def("__len__", [](const TokenCorpus& c) { return c.tokens().size(); });

  py::class_<NgramLookup>(m, "NgramLookup",
      "The context's n-grams and where each last continued (dovetail_ext.lookup.NgramLookup wraps it).")
      .def(py::init([](int64_t min_n, int64_t max_n, int64_t max_tokens) {
             return std::make_unique<NgramLookup>(LookupParams{min_n, max_n, max_tokens});
           }),
           py::arg("min_n"), py::arg("max_n"), py::arg("max_tokens"))
      .def("extend", [](NgramLookup& l, const py::handle& tok_obj) {
             auto t = as_array<int32_t>(tok_obj, "tokens");
             check_shape(t, {-1}, "tokens");
             l.extend(t.data(), t.shape(0));
           },
           py::arg("tokens"), "Append tokens (int32 [n]) to the context.")
      .def("propose", [](const NgramLookup& l, int64_t limit) {
             std::vector<int32_t> out(l.params().max_tokens);
             const int64_t c = l.propose(limit, out.data());
             return py::array_t<int32_t>(c, out.data());
           },
           py::arg("limit"), "The chain (int32, at most min(limit, max_tokens) tokens; empty: no match).")
      .def("clear", &NgramLookup::clear)
      .def("set_corpus", [](NgramLookup& l, std::shared_ptr<TokenCorpus> c) { l.set_corpus(std::move(c)); },
           py::arg("corpus").none(true),
           "A TokenCorpus whose chain a context without a match proposes instead, or None.")
      .def_property_readonly("last_from_corpus", &NgramLookup::last_from_corpus,
                             "Whether the last chain proposed came from the corpus.")
      .def_property_readonly("tokens", [](const NgramLookup& l) {
             return py::array_t<int32_t>((py::ssize_t)l.tokens().size(), l.tokens().data());
           });

  py::class_<DeviceDraftEngine>(m, "DeviceDraftEngine",
      "Dovetail draft on a device backend: 'cuda' (GPU) or 'host' (the same engine on the CPU with scalar "
      "kernels, for tests). Use dovetail_ext.draft.Draft(device='cuda').")
      .def(py::init([](const py::dict& cfg, const py::dict& weights, const LlamaEngine& target, int64_t context,
                       int64_t max_batch, const std::string& backend, int device, bool graphs,
                       const py::handle& vmap_obj) {
             LayerDims d = layer_dims(cfg);
             std::vector<int32_t> vmap;
             if (!vmap_obj.is_none()) {
               auto a = int32_vector(vmap_obj, "vocab_map");
               vmap.assign(a.data(), a.data() + a.size());
             }
             EngineOptions o = engine_options(context, max_batch, 1, "bf16");
             std::vector<py::array> keep;
             WeightMap views = weight_map(weights, keep);
             const int64_t layers = get_int(cfg, "num_layers");
             py::gil_scoped_release nogil;
             return std::make_unique<DeviceDraftEngine>(device_ops(backend, device), d, layers, o, views,
                                                        *target.token_embedding(), *target.lm_head(), std::move(vmap),
                                                        graphs);
           }),
           py::arg("config"), py::arg("weights"), py::arg("target"), py::arg("context"), py::arg("max_batch") = 128,
           py::arg("backend") = "cuda", py::arg("device") = 0, py::arg("graphs") = true,
           py::arg("vocab_map") = py::none())
      .def("forward", [](DeviceDraftEngine& e, const py::handle& feat_obj, const py::handle& src_obj,
                         const py::handle& tok_obj, const py::handle& pos_obj, const py::handle& anc_obj, bool append,
                         const py::handle& topk_obj, int64_t k, bool return_hidden) {
             auto tokens = int32_vector(tok_obj, "tokens");
             auto positions = int32_vector(pos_obj, "positions");
             const int64_t T = tokens.size(), D = e.dims().dim;
             DT_CHECK(positions.size() == T, "positions has " + std::to_string(positions.size()) +
                                                 " entries for " + std::to_string(T) + " tokens");
             DT_CHECK(feat_obj.is_none() != src_obj.is_none(), "give either features or src_rows");
             py::array_t<float, py::array::c_style> feats;
             py::array_t<int32_t, py::array::c_style> src;
             if (!feat_obj.is_none()) {
               feats = as_array<float>(feat_obj, "features");
               check_shape(feats, {T, D}, "features");
             } else {
               src = int32_vector(src_obj, "src_rows");
               DT_CHECK(src.size() == T, "src_rows has " + std::to_string(src.size()) + " entries for " +
                                             std::to_string(T) + " tokens");
             }
             const int64_t P = append ? e.pending() : 0;
             py::array_t<uint8_t, py::array::c_style> anc;
             if (!anc_obj.is_none()) anc = ancestor_matrix(anc_obj, T, P + T);
             auto rows = row_list(topk_obj, "topk_rows");
             DT_CHECK(rows.empty() || (k >= 1 && k <= 256), "top-k must be in [1, 256], got " + std::to_string(k));
             py::array_t<int32_t> ids({(int64_t)rows.size(), rows.empty() ? (int64_t)0 : k});
             py::array_t<float> logp({(int64_t)rows.size(), rows.empty() ? (int64_t)0 : k});
             py::object hidden_obj = py::none();
             float* hp = nullptr;
             if (return_hidden) {
               py::array_t<float> hidden({T, D});
               hp = hidden.mutable_data();
               hidden_obj = hidden;
             }
             const float* fp = feat_obj.is_none() ? nullptr : feats.data();
             const int32_t* sp = src_obj.is_none() ? nullptr : src.data();
             const uint8_t* ap = anc_obj.is_none() ? nullptr : anc.data();
             {
               py::gil_scoped_release nogil;
               e.forward(fp, sp, tokens.data(), positions.data(), T, ap, append, hp, rows.data(),
                         (int64_t)rows.size(), k, ids.mutable_data(), logp.mutable_data());
             }
             return py::make_tuple(hidden_obj, ids, logp);
           },
           py::arg("features"), py::arg("src_rows"), py::arg("tokens"), py::arg("positions"),
           py::arg("ancestors") = py::none(), py::arg("append") = false, py::arg("topk_rows") = py::none(),
           py::arg("k") = 1, py::arg("return_hidden") = true,
           "Draft forward on features [T, D] from the host, or on rows src_rows of the output history (the "
           "outputs of the last call with append=False and the append calls since, which stay on the device); "
           "returns (hidden [T, D] or None, topk ids, topk logp).")
      .def("commit", [](DeviceDraftEngine& e, const py::handle& kept_obj) {
             auto kept = row_list(kept_obj, "kept");
             py::gil_scoped_release nogil;
             e.commit(kept.data(), (int64_t)kept.size());
           }, py::arg("kept"))
      .def("truncate", [](DeviceDraftEngine& e, int64_t n) { e.truncate(n); }, py::arg("n"))
      .def("read_kv", [](DeviceDraftEngine& e, int64_t layer, int64_t n) {
             const int64_t KV = e.dims().kv_heads, Dh = e.dims().head_dim;
             DT_CHECK(n >= 0 && n <= e.options().context, "slot count outside the context");
             py::array_t<float> k({KV, n, Dh}), v({KV, n, Dh});
             e.read_kv(layer, n, k.mutable_data(), v.mutable_data());
             return py::make_tuple(k, v);
           }, py::arg("layer"), py::arg("n"), "KV slots [0, n) of one layer as fp32 [KV, n, Dh].")
      .def_property_readonly("stats", [](const DeviceDraftEngine& e) { return stats_dict(e.stats()); },
           "Transfer and call counters: bytes each way, copy time, calls served by recorded graphs.")
      .def_static("transfer_layout", [](int64_t T, int64_t P, int64_t D, int64_t n_topk, int64_t k,
                                        bool host_features, bool want_hidden) {
             const auto L = DeviceDraftEngine::layout(T, P, D, n_topk, k, host_features, want_hidden);
             py::dict d;
             d["in_bytes"] = L.in_bytes; d["out_bytes"] = L.out_bytes;
             d["feat"] = L.feat; d["src"] = L.src; d["tokens"] = L.tokens; d["positions"] = L.positions;
             d["bits"] = L.bits; d["rows"] = L.rows; d["ids"] = L.ids; d["logp"] = L.logp; d["hidden"] = L.hidden;
             return d;
           }, py::arg("T"), py::arg("P"), py::arg("D"), py::arg("n_topk"), py::arg("k"), py::arg("host_features"),
           py::arg("want_hidden"), "Byte layout of one call's host<->device transfers.")
      .def_property_readonly("n_past", &DeviceDraftEngine::n_past)
      .def_property_readonly("pending", &DeviceDraftEngine::pending)
      .def_property_readonly("context", [](const DeviceDraftEngine& e) { return e.options().context; })
      .def_property_readonly("max_batch", [](const DeviceDraftEngine& e) { return e.options().max_batch; })
      .def_property_readonly("draft_vocab", &DeviceDraftEngine::draft_vocab)
      .def_property_readonly("history_rows", &DeviceDraftEngine::history_rows)
      .def_property_readonly("device_bytes", &DeviceDraftEngine::device_bytes)
      .def_property_readonly("staging_bytes", &DeviceDraftEngine::staging_bytes)
      .def_property_readonly("backend", &DeviceDraftEngine::backend)
      .def_property_readonly("device_name", &DeviceDraftEngine::device_name);

  py::class_<DeviceTargetPrefix>(m, "DeviceTargetPrefix",
      "The first N layers of a target on a device backend ('cuda', or 'host' for tests): partial offload "
      "(use dovetail_ext.target.TargetEngine(gpu_layers=N)).")
      .def(py::init([](const py::dict& cfg, const py::dict& weights, const LlamaEngine& target, int64_t layers,
                       int64_t context, int64_t max_batch, const std::string& backend, int device, bool graphs) {
             LayerDims d = layer_dims(cfg);  // (biases, norms, gate and windows as the CPU layers)
             const float embed_scale = get_flag(cfg, "scale_embeddings") ? std::sqrt((float)d.dim) : 1.0f;
             EngineOptions o = engine_options(context, max_batch, 1, "bf16");
             std::vector<py::array> keep;
             WeightMap views = weight_map(weights, keep);
             d.rope_factors = rope_factors_named(views, d.head_dim);  // the target's RoPE on both sides
             py::gil_scoped_release nogil;
             return std::make_unique<DeviceTargetPrefix>(device_ops(backend, device), d, layers, o, views,
                                                         *target.token_embedding(), graphs, embed_scale);
           }),
           py::arg("config"), py::arg("weights"), py::arg("target"), py::arg("layers"), py::arg("context"),
           py::arg("max_batch") = 128, py::arg("backend") = "cuda", py::arg("device") = 0, py::arg("graphs") = true)
      .def("forward", [](DeviceTargetPrefix& e, const py::handle& tok_obj, const py::handle& pos_obj,
                         const py::handle& anc_obj) {
             auto tokens = int32_vector(tok_obj, "tokens");
             auto positions = int32_vector(pos_obj, "positions");
             const int64_t T = tokens.size(), D = e.dims().dim;
             DT_CHECK(positions.size() == T, "positions has " + std::to_string(positions.size()) +
                                                 " entries for " + std::to_string(T) + " tokens");
             py::array_t<uint8_t, py::array::c_style> anc;
             if (!anc_obj.is_none()) anc = ancestor_matrix(anc_obj, T, T);
             py::array_t<float> hidden({T, D});
             const uint8_t* ap = anc_obj.is_none() ? nullptr : anc.data();
             {
               py::gil_scoped_release nogil;
               e.forward(tokens.data(), positions.data(), T, ap, hidden.mutable_data());
             }
             return hidden;
           },
           py::arg("tokens"), py::arg("positions"), py::arg("ancestors") = py::none(),
           "Hidden states [T, D] after the offloaded layers.")
      .def("commit", [](DeviceTargetPrefix& e, const py::handle& kept_obj) {
             auto kept = row_list(kept_obj, "kept");
             py::gil_scoped_release nogil;
             e.commit(kept.data(), (int64_t)kept.size());
           }, py::arg("kept"))
      .def("truncate", [](DeviceTargetPrefix& e, int64_t n) { e.truncate(n); }, py::arg("n"))
      .def("read_kv", [](DeviceTargetPrefix& e, int64_t layer, int64_t n) {
             const int64_t KV = e.dims().kv_heads, Dh = e.dims().head_dim;
             DT_CHECK(n >= 0 && n <= e.options().context, "slot count outside the context");
             py::array_t<float> k({KV, n, Dh}), v({KV, n, Dh});
             e.read_kv(layer, n, k.mutable_data(), v.mutable_data());
             return py::make_tuple(k, v);
           }, py::arg("layer"), py::arg("n"))
      .def_property_readonly("stats", [](const DeviceTargetPrefix& e) { return stats_dict(e.stats()); })
      .def_property_readonly("n_past", &DeviceTargetPrefix::n_past)
      .def_property_readonly("pending", &DeviceTargetPrefix::pending)
      .def_property_readonly("layers", &DeviceTargetPrefix::layers)
      .def_property_readonly("device_bytes", &DeviceTargetPrefix::device_bytes)
      .def_property_readonly("backend", &DeviceTargetPrefix::backend)
      .def_property_readonly("device_name", &DeviceTargetPrefix::device_name);
}

}  // namespace dovetail::bind
