// The _core extension: argument checks and conversions only; all compute lives in csrc/.
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "common/cpu_features.h"
#include "common/thread_pool.h"
#ifdef DOVETAIL_WITH_CUDA
#include "cuda/runtime.h"
#include "model/device_ops.h"
#endif

namespace dovetail::bind {
namespace {

bool cuda_compiled() {
#ifdef DOVETAIL_WITH_CUDA
  return cuda::compiled();
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef DOVETAIL_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

// The cuBLAS library the CUDA engines would use, or None (not found, or no CUDA build).
py::object cuda_cublas() {
#ifdef DOVETAIL_WITH_CUDA
  const std::string name = cublas_library();
  if (!name.empty()) return py::str(name);
#endif
  return py::none();
}

}  // namespace
}  // namespace dovetail::bind

PYBIND11_MODULE(_core, m) {
  using namespace dovetail;
  m.doc() = "dovetail_ext native core (CPU kernels, LLaMA target engine, optional CUDA)";
  m.attr("__version__") = DOVETAIL_VERSION;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what());
    } catch (const ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "dovetail_ext: out of memory");
    }
  });

  m.def("cpu_features", [] {
    const auto& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c; d["avxvnni"] = f.avxvnni;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq; d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
    return d;
  }, "CPU features detected at run time.");
  m.def("supported_isas", [] {
    std::vector<std::string> out;
    for (Isa i : supported_isas()) out.emplace_back(isa_name(i));
    return out;
  }, "Kernel paths this CPU can run, slowest first.");
  m.def("get_isa", [] { return std::string(isa_name(active_isa())); }, "The kernel path in use.");
  m.def("set_isa", [](const std::string& name) { set_isa(isa_from_name(name)); }, py::arg("name"),
        "Force a kernel path: 'scalar', 'avx2', 'avxvnni', 'avx512' or 'avx512bf16' (ValueError if unsupported here).");
  m.def("pool_stats", [] {
        const ThreadPool::Stats s = ThreadPool::instance().stats();
        py::dict d;
        d["parallel_jobs"] = s.parallel_jobs;
        d["fallback_jobs"] = s.fallback_jobs;
        d["stretches"] = s.stretches;
        d["fallback"] = ThreadPool::instance().fallback();
        return d;
      }, "The native thread pool's counters: jobs split across threads, jobs run on the calling "
         "thread alone after stalls (another process holding a core), the serial stretches begun, "
         "and whether that fallback is on.");
  m.def("reset_pool_stats", [] { ThreadPool::instance().reset_stats(); }, "Zero the pool_stats counters.");
  m.def("set_pool_fallback", [](bool on) { ThreadPool::instance().set_fallback(on); }, py::arg("on"),
        "Whether stalls send the next jobs to the calling thread alone (default True). False offers "
        "every job to the workers: for a quiet machine, and for kernel benchmarks.");
  m.def("cuda_compiled", &bind::cuda_compiled, "True when the CUDA sources were compiled in.");
  m.def("cuda_device_count", &bind::cuda_device_count, "Number of usable CUDA devices (0 without a driver).");
  m.def("cuda_cublas", &bind::cuda_cublas,
        "The cuBLAS library the CUDA draft and offload engines open at run time, or None when not found.");

  bind::bind_ops(m);
  bind::bind_engine(m);
  bind::bind_davit(m);
}
