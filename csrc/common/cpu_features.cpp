#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>

#include "common/error.h"

namespace dovetail {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avxvnni = __builtin_cpu_supports("avxvnni");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

bool supports(const CpuFeatures& f, Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::AvxVnni: return supports(f, Isa::Avx2) && (f.avxvnni || (f.avx512vnni && f.avx512vl));
    case Isa::Avx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.avx2 && f.fma && f.f16c;
    case Isa::Avx512Bf16: return supports(f, Isa::Avx512) && f.avx512bf16;
  }
  return false;
}

Isa initial_isa() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("DOVETAIL_ISA")) {
    std::string name(env);
    if (!name.empty() && name != "auto") {
      try {
        Isa want = isa_from_name(name);
        if (supports(cpu_features(), want)) isa = want;
      } catch (const ValueError&) {
        // An unknown value keeps the best path; `dovetail info` shows what is active.
      }
    }
  }
  return isa;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa best_isa() {
  const auto& f = cpu_features();
  if (supports(f, Isa::Avx512Bf16)) return Isa::Avx512Bf16;
  if (supports(f, Isa::Avx512)) return Isa::Avx512;
  if (supports(f, Isa::AvxVnni)) return Isa::AvxVnni;
  if (supports(f, Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Avx512Bf16})
    if (supports(cpu_features(), i)) out.push_back(i);
  return out;
}

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  DT_CHECK(supports(cpu_features(), isa),
           "ISA path '" + isa_name(isa) + "' is not supported by this CPU");
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

Isa isa_from_name(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avxvnni") return Isa::AvxVnni;
  if (name == "avx512") return Isa::Avx512;
  if (name == "avx512bf16") return Isa::Avx512Bf16;
  throw_value_error("unknown ISA path '" + name + "': expected scalar, avx2, avxvnni, avx512 or avx512bf16");
}

}  // namespace dovetail
