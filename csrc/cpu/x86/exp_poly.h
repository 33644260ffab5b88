// exp(x) for float lanes, Cephes' expf scheme, used by x86::exp_ps (AVX2 and AVX-512) and,
// one value at a time, by exp_scalar (the scalar paths that must match them bit for bit):
// x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two parts so r is
// exact), exp(r) = 1 + r + r^2 P(r) with a degree-5 P, then scaled by 2^n. Within 2 ulp
// of expf over the clamped range [-87.3, 88.3] (arguments below give ~1e-38).
#pragma once
#include <cmath>
#include <initializer_list>  // the polynomial loops over {kP1, ..., kP5}

namespace dovetail::exp_poly {

constexpr float kMax = 88.3f, kMin = -87.3f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// The vector code's steps one lane at a time: the clamps as max_ps / min_ps do them (a NaN
// becomes kMin), round to nearest even, the fused multiply-adds as fmas, and 2^n applied
// exactly (one rounding, as scalef and the AVX2 two-factor product give).
inline float exp_scalar(float x) {
  x = x > kMin ? x : kMin;
  x = x < kMax ? x : kMax;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float p = kP0;
  for (float c : {kP1, kP2, kP3, kP4, kP5}) p = std::fma(p, r, c);
  p = std::fma(p, r * r, r + 1.0f);
  return std::ldexp(p, (int)n);
}

}  // namespace dovetail::exp_poly
