// Run-time CPU feature detection and the ISA switch that picks kernel paths.
//
// The wheel is built for baseline x86-64; files under cpu/x86/avx2 and cpu/x86/avx512 are
// compiled with their own flags and only called when the running CPU (and OS) supports
// them. `set_isa` forces a path (tests run every path; DOVETAIL_ISA sets it at start-up).
#pragma once
#include <string>
#include <vector>

namespace dovetail {

// AvxVnni: the AVX2 kernels with 256-bit vpdpbusd for the quantized dot products (AVX-VNNI:
// Alder Lake and later Intel client CPUs; the same instruction in its EVEX form where the
// CPU has AVX512_VNNI and AVX512VL instead, which the tests run). Its integer block sums
// are those of pmaddubsw, so its results are the AVX2 path's, bit for bit.
// Avx512: the AVX-512 kernels (F, BW, VL, DQ and VNNI: Skylake-SP's successors from Cascade
// Lake on, Ice Lake, Zen 4), bf16 dot products by two FMAs with vdpbf16ps's arithmetic.
// Avx512Bf16: the same kernels with vdpbf16ps itself (Cooper Lake, Sapphire Rapids, Zen 4).
enum class Isa { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3, Avx512Bf16 = 4 };

// The AVX-512 kernel family, with or without the native bf16 dot product.
inline bool is_avx512(Isa isa) { return isa == Isa::Avx512 || isa == Isa::Avx512Bf16; }
// The AVX2 kernel family, with or without VNNI dot products.
inline bool is_avx2(Isa isa) { return isa == Isa::Avx2 || isa == Isa::AvxVnni; }

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avxvnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
};

const CpuFeatures& cpu_features();
Isa best_isa();                       // best path this CPU supports
std::vector<Isa> supported_isas();    // every path this CPU can run
Isa active_isa();                     // the path kernels use now
void set_isa(Isa isa);                // throws ValueError if unsupported here
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // throws ValueError on unknown names

}  // namespace dovetail
