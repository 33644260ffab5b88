// DaViT bindings: shape/dtype checks and conversions only; compute lives in cpu/davit.cpp
// and cuda/davit.cu. CUDA entry points take device pointers as integers (the Python wrapper
// passes tensor.data_ptr()), so the extension never links libtorch.
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "bindings/common.h"
#include "cpu/davit.h"
#ifdef DOVETAIL_WITH_CUDA
#include "cuda/davit_cuda.h"
#endif

namespace dovetail::bind {
namespace {

using davit::PackedLinear;
using Linear = std::shared_ptr<PackedLinear>;
using FArray = py::array_t<float, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

FArray like(const std::vector<py::ssize_t>& shape) { return FArray(shape); }

// Optional residual with exactly x's shape.
const float* residual_ptr(const py::object& res, const FArray& x, FArray& keep) {
  if (res.is_none()) return nullptr;
  keep = as_array<float>(res, "residual");
  DT_CHECK(keep.ndim() == x.ndim(), "residual has shape " + shape_str(keep) + ", expected " + shape_str(x));
  for (py::ssize_t i = 0; i < x.ndim(); ++i)
    DT_CHECK(keep.shape(i) == x.shape(i), "residual has shape " + shape_str(keep) + ", expected " + shape_str(x));
  return keep.data();
}

Linear pack(const py::object& weight, const py::object& bias, bool bf16) {
  FArray w = as_array<float>(weight, "weight");
  DT_CHECK(w.ndim() == 2, "weight must be 2-D [out_features, in_features], got shape " + shape_str(w));
  const int out = (int)w.shape(0), in = (int)w.shape(1);
  FArray b;
  if (!bias.is_none()) {
    b = as_array<float>(bias, "bias");
    check_shape(b, {out}, "bias");
  }
  auto p = std::make_shared<PackedLinear>();
  {
    py::gil_scoped_release nogil;
    *p = davit::pack_linear(w.data(), bias.is_none() ? nullptr : b.data(), out, in, bf16);
  }
  return p;
}

FArray linear(const py::object& x_obj, const Linear& w, const py::object& res, bool gelu) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() >= 1 && x.shape(x.ndim() - 1) == w->in,
           "x has shape " + shape_str(x) + ", expected last dimension " + std::to_string(w->in));
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  shape.back() = w->out;
  FArray y = like(shape), rkeep;
  const float* r = nullptr;
  if (!res.is_none()) {
    rkeep = as_array<float>(res, "residual");
    DT_CHECK(rkeep.size() == y.size() && rkeep.shape(rkeep.ndim() - 1) == w->out,
             "residual has shape " + shape_str(rkeep) + ", expected the output shape");
    r = rkeep.data();
  }
  const long rows = x.size() / w->in;
  py::gil_scoped_release nogil;
  davit::linear(x.data(), rows, *w, y.mutable_data(), r, gelu);
  return y;
}

FArray window_attention(const py::object& x_obj, const Linear& qkv, const Linear& proj, int heads,
                        int ws, const py::object& res) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() == 4, "x must be [B, H, W, C], got shape " + shape_str(x));
  FArray y = like({x.shape(0), x.shape(1), x.shape(2), x.shape(3)}), rkeep;
  davit::WindowAttentionParams p;
  p.x = x.data();
  p.out = y.mutable_data();
  p.res = residual_ptr(res, x, rkeep);
  p.B = (int)x.shape(0); p.H = (int)x.shape(1); p.W = (int)x.shape(2); p.C = (int)x.shape(3);
  p.heads = heads; p.ws = ws;
  p.qkv = qkv.get(); p.proj = proj.get();
  py::gil_scoped_release nogil;
  davit::window_attention(p);
  return y;
}

FArray channel_attention(const py::object& x_obj, const Linear& qkv, const Linear& proj, int groups,
                         const py::object& res) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() == 3, "x must be [B, N, C], got shape " + shape_str(x));
  FArray y = like({x.shape(0), x.shape(1), x.shape(2)}), rkeep;
  davit::ChannelAttentionParams p;
  p.x = x.data();
  p.out = y.mutable_data();
  p.res = residual_ptr(res, x, rkeep);
  p.B = (int)x.shape(0); p.N = (int)x.shape(1); p.C = (int)x.shape(2);
  p.groups = groups;
  p.qkv = qkv.get(); p.proj = proj.get();
  py::gil_scoped_release nogil;
  davit::channel_attention(p);
  return y;
}

FArray layer_norm(const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, float eps) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() >= 1 && x.size() > 0, "x must be a non-empty array");
  const int C = (int)x.shape(x.ndim() - 1);
  FArray w = as_array<float>(w_obj, "weight"), b = as_array<float>(b_obj, "bias");
  check_shape(w, {C}, "weight");
  check_shape(b, {C}, "bias");
  FArray y = like(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  py::gil_scoped_release nogil;
  davit::layer_norm(x.data(), x.size() / C, C, w.data(), b.data(), eps, y.mutable_data());
  return y;
}

FArray conv_pos_enc(const py::object& x_obj, const py::object& w_obj, const py::object& b_obj) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() == 4, "x must be [B, H, W, C], got shape " + shape_str(x));
  const long C = x.shape(3);
  FArray w = as_array<float>(w_obj, "weight"), b = as_array<float>(b_obj, "bias");
  check_shape(w, {C, 1, 3, 3}, "weight");
  check_shape(b, {C}, "bias");
  FArray y = like({x.shape(0), x.shape(1), x.shape(2), x.shape(3)});
  py::gil_scoped_release nogil;
  davit::conv_pos_enc(x.data(), (int)x.shape(0), (int)x.shape(1), (int)x.shape(2), (int)C, w.data(),
                      b.data(), y.mutable_data());
  return y;
}

FArray mlp(const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, const Linear& fc1,
           const Linear& fc2, float eps) {
  FArray x = as_array<float>(x_obj, "x");
  DT_CHECK(x.ndim() >= 1 && x.size() > 0, "x must be a non-empty array");
  const int C = (int)x.shape(x.ndim() - 1);
  FArray w = as_array<float>(w_obj, "norm weight"), b = as_array<float>(b_obj, "norm bias");
  check_shape(w, {C}, "norm weight");
  check_shape(b, {C}, "norm bias");
  FArray y = like(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  py::gil_scoped_release nogil;
  davit::mlp_block(x.data(), x.size() / C, C, w.data(), b.data(), eps, *fc1, *fc2, y.mutable_data());
  return y;
}

#ifdef DOVETAIL_WITH_CUDA
template <typename T>
T* dev(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
#endif

}  // namespace

void bind_davit(py::module_& m) {
  py::class_<PackedLinear, Linear>(m, "DavitLinear",
                                   "A Linear layer repacked once for the DaViT kernels (fp32).")
      .def_property_readonly("in_features", [](const PackedLinear& l) { return l.in; })
      .def_property_readonly("out_features", [](const PackedLinear& l) { return l.out; })
      .def_property_readonly("bf16", [](const PackedLinear& l) { return l.bf16; },
                             "True when the projections run in bf16 (fp32 sums).");

  m.def("davit_get_num_threads", &davit::num_threads, "Threads the DaViT kernels use.");
  m.def("davit_set_num_threads", &davit::set_num_threads, py::arg("n"),
        "Set the threads the DaViT kernels use (default: OMP_NUM_THREADS, else all cores).");
  m.def("davit_pack_linear", &pack, py::arg("weight"), py::arg("bias") = py::none(), py::arg("bf16") = false,
        "Repack a float32 Linear weight [out, in] (and bias [out]) for the DaViT kernels; with bf16=True "
        "the layer multiplies in bf16 (weights and activations rounded, sums in fp32).");
  m.def("davit_linear", &linear, py::arg("x"), py::arg("linear"), py::arg("residual") = py::none(),
        py::arg("gelu") = false, "y = residual + x W^T + b (optionally GELU), over the last axis.");
  m.def("davit_window_attention", &window_attention, py::arg("x"), py::arg("qkv"), py::arg("proj"),
        py::arg("num_heads"), py::arg("window_size") = 7, py::arg("residual") = py::none(),
        "Window attention on a normalised [B, H, W, C] float32 map (zero padding, no mask, crop).");
  m.def("davit_channel_attention", &channel_attention, py::arg("x"), py::arg("qkv"), py::arg("proj"),
        py::arg("num_groups"), py::arg("residual") = py::none(),
        "Channel-group attention on normalised [B, N, C] float32 tokens.");
  m.def("davit_layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("eps") = 1e-5f, "LayerNorm over the last axis.");
  m.def("davit_conv_pos_enc", &conv_pos_enc, py::arg("x"), py::arg("weight"), py::arg("bias"),
        "ConvPosEnc on [B, H, W, C]: x + depthwise 3x3 conv(x) (zero padding 1) + bias.");
  m.def("davit_mlp", &mlp, py::arg("x"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("fc1"),
        py::arg("fc2"), py::arg("eps") = 1e-5f, "x + fc2(GELU(fc1(LayerNorm(x)))) over the last axis.");

#ifdef DOVETAIL_WITH_CUDA
  m.def("davit_window_attention_cuda",
        [](std::uintptr_t x, std::uintptr_t out, std::uintptr_t res, std::uintptr_t qkv_w,
           std::uintptr_t qkv_b, std::uintptr_t proj_w, std::uintptr_t proj_b, int B, int H, int W, int C,
           int heads, int ws, std::uintptr_t stream) {
          cuda::davit::WindowAttentionParams p;
          p.x = dev<const float>(x); p.out = dev<float>(out); p.res = dev<const float>(res);
          p.qkv_w = dev<const float>(qkv_w); p.qkv_b = dev<const float>(qkv_b);
          p.proj_w = dev<const float>(proj_w); p.proj_b = dev<const float>(proj_b);
          p.B = B; p.H = H; p.W = W; p.C = C; p.heads = heads; p.ws = ws;
          py::gil_scoped_release nogil;
          cuda::davit::window_attention(p, reinterpret_cast<cudaStream_t>(stream));
        },
        py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("qkv_weight"), py::arg("qkv_bias"),
        py::arg("proj_weight"), py::arg("proj_bias"), py::arg("B"), py::arg("H"), py::arg("W"),
        py::arg("C"), py::arg("num_heads"), py::arg("window_size"), py::arg("stream"),
        "Window attention on device pointers (float32, contiguous; residual 0 for none).");
  m.def("davit_channel_attention_cuda",
        [](std::uintptr_t x, std::uintptr_t out, std::uintptr_t res, std::uintptr_t qkv_w,
           std::uintptr_t qkv_b, std::uintptr_t proj_w, std::uintptr_t proj_b, int B, int N, int C,
           int groups, std::uintptr_t stream) {
          cuda::davit::ChannelAttentionParams p;
          p.x = dev<const float>(x); p.out = dev<float>(out); p.res = dev<const float>(res);
          p.qkv_w = dev<const float>(qkv_w); p.qkv_b = dev<const float>(qkv_b);
          p.proj_w = dev<const float>(proj_w); p.proj_b = dev<const float>(proj_b);
          p.B = B; p.N = N; p.C = C; p.groups = groups;
          py::gil_scoped_release nogil;
          cuda::davit::channel_attention(p, reinterpret_cast<cudaStream_t>(stream));
        },
        py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("qkv_weight"), py::arg("qkv_bias"),
        py::arg("proj_weight"), py::arg("proj_bias"), py::arg("B"), py::arg("N"), py::arg("C"),
        py::arg("num_groups"), py::arg("stream"),
        "Channel attention on device pointers (float32, contiguous; residual 0 for none).");
#endif
}

}  // namespace dovetail::bind
