// AVX-512 helpers shared by the kernels under cpu/x86/avx512/ (include only from files
// built with the AVX-512 flags).
#pragma once
#include <immintrin.h>

#include "cpu/x86/exp_poly.h"

namespace dovetail::x86 {

// exp(x), 16 lanes (exp_poly.h), scalef by 2^n.
inline __m512 exp_ps(__m512 x) {
  using namespace exp_poly;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kMin)), _mm512_set1_ps(kMax));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  for (float c : {kP1, kP2, kP3, kP4, kP5}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// bf16 pair dot products: 16 lanes of 32-bit pairs, the low half element 2j and the high
// half element 2j + 1 of each. vdpbf16ps's arithmetic is acc += a[2j+1] b[2j+1], then
// acc += a[2j] b[2j], each product exact in fp32. dot_bf16 on pairs is the instruction itself
// (Isa::Avx512Bf16; it also treats denormals as zero). Where the CPU lacks it, the pairs are
// split into fp32 halves once (split_bf16) and dot_bf16 on halves runs the same sums as two
// FMAs: scalar's and AVX2's arithmetic bit for bit. bf16_operand<native> gives the form.
struct Bf16Halves {
  __m512 hi, lo;  // elements 2j + 1 and 2j as fp32
};
inline Bf16Halves split_bf16(__m512i pairs) {
  return {_mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u))),
          _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16))};
}
template <bool kNative>
inline auto bf16_operand(__m512i pairs) {
  if constexpr (kNative)
    return pairs;
  else
    return split_bf16(pairs);
}
inline __m512 dot_bf16(__m512 acc, const Bf16Halves& a, const Bf16Halves& b) {
  return _mm512_fmadd_ps(a.lo, b.lo, _mm512_fmadd_ps(a.hi, b.hi, acc));
}
inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {  // vdpbf16ps (no compiler flag needed)
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

}  // namespace dovetail::x86
