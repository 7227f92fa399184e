// What the kernels may use on this CPU (the library is built with -march=native): GRAINS_AVX2 (with F16C and
// FMA) and GRAINS_AVX512 (F, BW, VL and VNNI); without them each kernel has a plain C++ path.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define GRAINS_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GRAINS_AVX512 1
#endif
#endif

// IEEE half -> float, exactly.
inline float half_to_float(uint16_t h) {
#if defined(GRAINS_AVX2)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) return std::ldexp(static_cast<float>(mantissa), -24) * (sign ? -1.f : 1.f);
  const uint32_t bits = sign | ((exponent == 31 ? 255 : exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
#endif
}
