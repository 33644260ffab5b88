// Op-level bindings: each native op callable on numpy arrays / CPU tensors, so it can be
// tested against its PyTorch twin in dovetail_ext.reference and benchmarked alone.
#include <pybind11/stl.h>

#include <cstring>

#include "bindings/common.h"
#include "cpu/ops.h"

namespace dovetail::bind {

namespace {

// Raw bytes of any C-contiguous buffer.
std::pair<const void*, size_t> raw_bytes(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  DT_CHECK(arr, std::string(name) + " must be an array");
  DT_CHECK(arr.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
  return {arr.data(), (size_t)arr.nbytes()};
}

}  // namespace

py::array_t<uint8_t, py::array::c_style> ancestor_matrix(const py::handle& obj, int64_t T, int64_t W) {
  py::array arr = py::array::ensure(obj);
  DT_CHECK(arr, "ancestors must be a [T, W] bool or uint8 array");
  DT_CHECK(arr.dtype().kind() == 'b' || arr.dtype().is(py::dtype::of<uint8_t>()),
           "ancestors must have dtype bool or uint8, got " + std::string(py::str(arr.dtype())));
  auto u8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  check_shape(u8, {T, W}, "ancestors");
  return u8;
}

namespace {

// Keys [KV, S, Dh] -> [KV, ceil(S / kKTile), Dh, kKTile] (ops.h), zero-padded.
template <typename E>
void tile_keys_into(const E* k, int64_t KV, int64_t S, int64_t Dh, E* out) {
  const int64_t S16 = attention_stride(S);
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < Dh; ++d) out[h * S16 * Dh + k_offset(s, d, Dh)] = k[(h * S + s) * Dh + d];
}

py::array tile_keys(const py::array& k, bool bf16) {
  const int64_t KV = k.shape(0), S = k.shape(1), Dh = k.shape(2), S16 = attention_stride(S);
  py::array out(k.dtype(), std::vector<int64_t>{KV, S16 / kKTile, Dh, kKTile});
  std::memset(out.mutable_data(), 0, (size_t)(out.nbytes()));
  if (bf16)
    tile_keys_into(static_cast<const uint16_t*>(k.data()), KV, S, Dh, static_cast<uint16_t*>(out.mutable_data()));
  else
    tile_keys_into(static_cast<const float*>(k.data()), KV, S, Dh, static_cast<float*>(out.mutable_data()));
  return out;
}

}  // namespace

void bind_ops(py::module_& m) {
  py::class_<PackedWeight, std::shared_ptr<PackedWeight>>(m, "PackedWeight",
      "A weight matrix [rows, cols] in its stored format (f32, f16, bf16, q8_0, q4_0, q4_1), "
      "copied once into aligned engine memory.")
      .def(py::init([](const std::string& dtype, int64_t rows, int64_t cols, const py::handle& data) {
             auto [ptr, n] = raw_bytes(data, "data");
             return std::make_shared<PackedWeight>(pack_weight(wtype_from_name(dtype), rows, cols, ptr, n));
           }),
           py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("data"))
      .def_property_readonly("dtype", [](const PackedWeight& w) { return std::string(wtype_name(w.type)); })
      .def_readonly("rows", &PackedWeight::rows)
      .def_readonly("cols", &PackedWeight::cols)
      .def("dequantize_row", [](const PackedWeight& w, int64_t r) {
             py::array_t<float> out(w.cols);
             dequantize_row(w, r, out.mutable_data());
             return out;
           }, py::arg("row"), "Row `row` as fp32 [cols].");

  m.def("linear", [](const py::handle& x_obj, const PackedWeight& w, int threads) {
        auto x = as_array<float>(x_obj, "x");
        check_shape(x, {-1, w.cols}, "x");
        DT_CHECK(threads >= 1 && threads <= 1024, "threads must be in [1, 1024], got " + std::to_string(threads));
        const int64_t T = x.shape(0);
        py::array_t<float> y({T, w.rows});
        QActs qa;
        {
          py::gil_scoped_release nogil;
          prepare_acts(w, x.data(), T, qa, threads);
          linear(w, x.data(), &qa, T, y.mutable_data(), w.rows, threads);
        }
        return y;
      }, py::arg("x"), py::arg("weight"), py::arg("threads") = 1,
      "y[T, N] = x[T, K] @ W[N, K]^T; quantized weights use int8-quantized activations, bf16 weights "
      "bf16-rounded ones.");

  m.def("convert_gguf_blocks", [](const std::string& kind, const py::handle& data_obj, int64_t cols, int threads) {
        const GgufBlocks src = kind == "Q5_0" ? GgufBlocks::Q5_0 : kind == "Q4_K" ? GgufBlocks::Q4_K
                             : kind == "Q6_K" ? GgufBlocks::Q6_K
                             : (throw_value_error("convert_gguf_blocks: kind must be Q5_0, Q4_K or Q6_K, got '" +
                                                  kind + "'"), GgufBlocks::Q5_0);
        DT_CHECK(threads >= 1 && threads <= 1024, "threads must be in [1, 1024], got " + std::to_string(threads));
        auto data = as_array<uint8_t>(data_obj, "data");
        const int64_t in_row = gguf_row_bytes(src, cols);
        check_shape(data, {-1, (long)in_row}, "data");
        const int64_t rows = data.shape(0);
        const int64_t out_row = cols / kQBlock * gguf_unit_bytes(converted_type(src));
        py::array_t<uint8_t> out({rows, out_row});
        {
          py::gil_scoped_release nogil;
          convert_gguf_rows(src, data.data(), rows, cols, out.mutable_data(), threads);
        }
        return py::make_tuple(std::string(wtype_name(converted_type(src))), out);
      }, py::arg("kind"), py::arg("data"), py::arg("cols"), py::arg("threads") = 1,
      "GGUF Q5_0 / Q4_K / Q6_K rows [rows, row bytes] -> (dtype, rows in q8_0 / q4_1), as "
      "formats.convert's numpy twins do it.");

  m.def("quantize_acts", [](const py::handle& x_obj) {
        auto x = as_array<float>(x_obj, "x");
        check_shape(x, {-1, -1}, "x");
        const int64_t T = x.shape(0), K = x.shape(1);
        QActs qa;
        quantize_acts(x.data(), T, K, qa, 1);
        py::array_t<int8_t> q({T, K});
        py::array_t<float> d({T, K / 32}), ds({T, K / 32});
        const int64_t nb = K / 32;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t b = 0; b < nb; ++b) {  // from the tiles back to rows
            const int64_t slot = act_slot(t, b, nb);
            std::memcpy(q.mutable_data() + t * K + b * 32, qa.qi.data() + slot * 32, 32);
            d.mutable_data()[t * nb + b] = qa.di[slot];
            ds.mutable_data()[t * nb + b] = qa.dsi[slot];
          }
        return py::make_tuple(q, d, ds);
      }, py::arg("x"), "Per-32-block int8 activation quantization: (q [T,K], d [T,K/32], d*sum(q) [T,K/32]).");

  m.def("rmsnorm", [](const py::handle& x_obj, const py::handle& w_obj, float eps) {
        auto x = as_array<float>(x_obj, "x");
        auto w = as_array<float>(w_obj, "weight");
        check_shape(x, {-1, -1}, "x");
        check_shape(w, {x.shape(1)}, "weight");
        py::array_t<float> y({x.shape(0), x.shape(1)});
        rmsnorm(x.data(), w.data(), y.mutable_data(), x.shape(0), x.shape(1), eps);
        return y;
      }, py::arg("x"), py::arg("weight"), py::arg("eps"), "RMSNorm over the last axis of x [T, D].");

  m.def("rope", [](const py::handle& x_obj, const py::handle& pos_obj, double theta, int64_t context) {
        auto x = as_array<float>(x_obj, "x");
        auto pos = as_array<int32_t>(pos_obj, "positions");
        check_shape(x, {-1, -1, -1}, "x");
        const int64_t T = x.shape(0), H = x.shape(1), Dh = x.shape(2);
        check_shape(pos, {T}, "positions");
        DT_CHECK(Dh % 2 == 0, "head dim must be even for RoPE, got " + std::to_string(Dh));
        DT_CHECK(context >= 1 && context <= (1 << 24), "context must be in [1, 16777216], got " + std::to_string(context));
        for (int64_t t = 0; t < T; ++t)
          DT_CHECK(pos.data()[t] >= 0 && pos.data()[t] < context, "position " + std::to_string(pos.data()[t]) +
                                                                     " outside [0, " + std::to_string(context) + ")");
        std::vector<float> c, s;
        rope_tables(theta, Dh, context, c, s);
        py::array_t<float> y({T, H, Dh});
        std::memcpy(y.mutable_data(), x.data(), sizeof(float) * T * H * Dh);
        rope_inplace(y.mutable_data(), T, H, Dh, H * Dh, pos.data(), c.data(), s.data());
        return y;
      }, py::arg("x"), py::arg("positions"), py::arg("theta"), py::arg("context"),
      "Rotate-half RoPE of x [T, H, Dh] at int32 positions [T].");

  for (const auto& [name, fn, doc] : {std::tuple{"swiglu", &swiglu, "silu(gate) * up."},
                                       std::tuple{"geglu", &geglu, "gelu_tanh(gate) * up (Gemma's GeGLU)."}}) {
    m.def(name, [fn = fn](const py::handle& g_obj, const py::handle& u_obj) {
          auto g = as_array<float>(g_obj, "gate");
          auto u = as_array<float>(u_obj, "up");
          DT_CHECK(g.size() == u.size() && g.ndim() == u.ndim(), "gate and up must have the same shape");
          std::vector<py::ssize_t> shape(g.shape(), g.shape() + g.ndim());
          py::array_t<float> y(shape);
          fn(g.data(), u.data(), y.mutable_data(), g.size());
          return y;
        }, py::arg("gate"), py::arg("up"), doc);
  }

  m.def("softcap", [](const py::handle& x_obj, float cap) {
        auto x = as_array<float>(x_obj, "x");
        DT_CHECK(std::isfinite(cap) && cap > 0, "cap must be a positive number");
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        py::array_t<float> y(shape);
        std::memcpy(y.mutable_data(), x.data(), sizeof(float) * x.size());
        softcap(y.mutable_data(), x.size(), cap);
        return y;
      }, py::arg("x"), py::arg("cap"), "Gemma 2's soft-capping: cap * tanh(x / cap).");

  m.def("dgf_gate", [](const py::handle& h1_obj, const py::handle& a_obj, const py::handle& z_obj) {
        auto h1 = as_array<float>(h1_obj, "h1");
        auto a = as_array<float>(a_obj, "a");
        auto z = as_array<float>(z_obj, "zpre");
        check_shape(h1, {-1, -1}, "h1");
        check_shape(a, {h1.shape(0), h1.shape(1)}, "a");
        check_shape(z, {h1.shape(0), h1.shape(1)}, "zpre");
        const int64_t T = h1.shape(0), D = h1.shape(1);
        py::array_t<float> h2({T, D}), g({T, D});
        for (int64_t t = 0; t < T; ++t) {
          dgf_silu_rows(a.data() + t * D, h2.mutable_data() + t * D, D);
          dgf_mix_rows(h1.data() + t * D, h2.data() + t * D, z.data() + t * D, g.mutable_data() + t * D, D);
        }
        return py::make_tuple(h2, g);
      }, py::arg("h1"), py::arg("a"), py::arg("zpre"),
      "DGF gate on [T, D] rows: (h2 = SiLU(a), g = sigmoid(zpre) * h1 + (1 - sigmoid(zpre)) * h2).");

  m.def("topk_log_softmax", [](const py::handle& x_obj, int64_t k) {
        auto x = as_array<float>(x_obj, "logits");
        check_shape(x, {-1, -1}, "logits");
        const int64_t n = x.shape(0), V = x.shape(1);
        DT_CHECK(k >= 1 && k <= V, "k must be in [1, V]");
        py::array_t<int32_t> ids({n, k});
        py::array_t<float> logp({n, k});
        topk_log_softmax(x.data(), n, V, k, ids.mutable_data(), logp.mutable_data(), 1);
        return py::make_tuple(ids, logp);
      }, py::arg("logits"), py::arg("k"), "Per row: the k most likely tokens and their log-probabilities.");

  m.def("argmax_rows", [](const py::handle& x_obj) {
        auto x = as_array<float>(x_obj, "x");
        check_shape(x, {-1, -1}, "x");
        const int64_t n = x.shape(0), V = x.shape(1);
        DT_CHECK(V >= 1, "x needs at least one column");
        py::array_t<int64_t> out(n);
        argmax_rows(x.data(), n, V, out.mutable_data());
        return out;
      }, py::arg("x"), "Per row of x [n, V]: the index of its first maximum.");

  m.def("sampling_dist", [](const py::handle& x_obj, double temperature, int64_t top_k, double top_p) {
        auto x = as_array<float>(x_obj, "logits");
        check_shape(x, {-1}, "logits");
        std::vector<int32_t> ids;
        std::vector<double> probs;
        {
          py::gil_scoped_release nogil;
          sampling_dist(x.data(), x.shape(0), temperature, top_k, top_p, ids, probs);
        }
        return py::make_tuple(py::array_t<int32_t>((py::ssize_t)ids.size(), ids.data()),
                              py::array_t<double>((py::ssize_t)probs.size(), probs.data()));
      }, py::arg("logits"), py::arg("temperature"), py::arg("top_k") = 0, py::arg("top_p") = 1.0,
      "The sampling distribution of one row of logits [V]: (ids, probs), the tokens of nonzero "
      "probability in increasing id order (int32) and their probabilities (float64), after "
      "temperature, top_k (0: off) and top_p (1.0: off).");

  m.def("sample", [](const py::handle& x_obj, double temperature, int64_t top_k, double top_p, double u) {
        auto x = as_array<float>(x_obj, "logits");
        check_shape(x, {-1}, "logits");
        py::gil_scoped_release nogil;
        thread_local std::vector<int32_t> ids;
        thread_local std::vector<double> probs;
        sampling_dist(x.data(), x.shape(0), temperature, top_k, top_p, ids, probs);
        return draw_from(ids, probs, u);
      }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("u"),
      "One token drawn from sampling_dist(logits, ...) by the uniform number u in [0, 1): the "
      "first whose running probability sum exceeds u times the total.");

  m.def("tile_keys", [](const py::array& k_obj) {
        const bool bf16 = py::array::ensure(k_obj).dtype().is(py::dtype::of<uint16_t>());
        py::array k = bf16 ? py::array(as_array<uint16_t>(k_obj, "k")) : py::array(as_array<float>(k_obj, "k"));
        check_shape(k, {-1, -1, -1}, "k");
        return tile_keys(k, bf16);
      }, py::arg("k"),
      "Keys k [KV, S, Dh] (fp32, or bf16 as uint16) in the attention kernels' layout "
      "[KV, ceil(S / 16), Dh, 16] (zero-padded slots): what attention() takes as a 4-D k.");

  m.def("attention", [](const py::handle& q_obj, const py::array& k_obj, const py::array& v_obj,
                        int64_t n_past, const py::handle& anc_obj, int threads) {
        auto q = as_array<float>(q_obj, "q");
        check_shape(q, {-1, -1, -1}, "q");
        const int64_t T = q.shape(0), H = q.shape(1), Dh = q.shape(2);
        const bool bf16 = py::array::ensure(k_obj).dtype().is(py::dtype::of<uint16_t>());
        py::array k = bf16 ? py::array(as_array<uint16_t>(k_obj, "k")) : py::array(as_array<float>(k_obj, "k"));
        py::array v = bf16 ? py::array(as_array<uint16_t>(v_obj, "v")) : py::array(as_array<float>(v_obj, "v"));
        DT_CHECK(k.ndim() == 3 || k.ndim() == 4, "k must be [KV, S, Dh] or tiled [KV, S / 16, Dh, 16], got " +
                                                      std::to_string(k.ndim()) + " dimensions");
        if (k.ndim() == 4) {
          check_shape(k, {-1, -1, Dh, kKTile}, "k");
          check_shape(v, {k.shape(0), k.shape(1) * kKTile, Dh}, "v");
        } else {
          check_shape(k, {-1, -1, Dh}, "k");
          check_shape(v, {k.shape(0), k.shape(1), Dh}, "v");
        }
        const int64_t KV = k.shape(0), S = v.shape(1);
        DT_CHECK(KV >= 1 && H % KV == 0, "query heads must be a multiple of kv heads");
        DT_CHECK(n_past >= 0 && n_past + T <= S, "k/v need n_past + T slots");
        DT_CHECK(threads >= 1 && threads <= 1024, "threads must be in [1, 1024], got " + std::to_string(threads));
        auto anc = ancestor_matrix(anc_obj, T, T);
        const uint8_t* a = anc.data();
        for (int64_t t = 0; t < T; ++t) {
          DT_CHECK(a[t * T + t], "ancestors diagonal must be set");
          for (int64_t j = t + 1; j < T; ++j) DT_CHECK(!a[t * T + j], "ancestors must be lower-triangular");
        }
        const int64_t words = (T + 63) / 64;
        std::vector<uint64_t> bits(T * words, 0);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j <= t; ++j)
            if (a[t * T + j]) bits[t * words + (j >> 6)] |= 1ull << (j & 63);
        // A 3-D k goes into the tiled layout, v padded to the same slot count.
        const int64_t S16 = attention_stride(S), elem = bf16 ? 2 : 4;
        py::array kt = k, vt = v;
        if (k.ndim() == 3) {
          kt = tile_keys(k, bf16);
          vt = py::array(v.dtype(), std::vector<int64_t>{KV, S16, Dh});
          std::memset(vt.mutable_data(), 0, (size_t)(KV * S16 * Dh * elem));
          for (int64_t h = 0; h < KV; ++h)
            std::memcpy(static_cast<uint8_t*>(vt.mutable_data()) + h * S16 * Dh * elem,
                        static_cast<const uint8_t*>(v.data()) + h * S * Dh * elem, (size_t)(S * Dh * elem));
        }
        py::array_t<float> out({T, H, Dh});
        std::vector<float> scratch((size_t)threads * attention_stride(n_past + T));
        AttentionArgs aa;
        aa.q = q.data(); aa.k = kt.data(); aa.v = vt.data(); aa.kv_type = bf16 ? KvType::BF16 : KvType::F32;
        aa.S = S16; aa.n_past = n_past; aa.T = T; aa.H = H; aa.KV = KV; aa.Dh = Dh;
        aa.anc = bits.data(); aa.anc_words = words; aa.out = out.mutable_data(); aa.scratch = scratch.data();
        {
          py::gil_scoped_release nogil;
          attention(aa, threads);
        }
        return out;
      }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_past"), py::arg("ancestors"), py::arg("threads") = 1,
      "Tree attention: q [T,H,Dh] over k [KV,S,Dh] (or tiled by tile_keys) and v [KV,S,Dh] (fp32, or bf16 as "
      "uint16); slot n_past+j holds batch token j.");
}

}  // namespace dovetail::bind
