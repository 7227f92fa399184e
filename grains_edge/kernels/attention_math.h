// What both of CachedAttention's own steps use (cached_attention.cc, prompt_attention.h): their inputs and
// outputs, and their arithmetic.

#pragma once

#include <cstdint>

#include "cpu.h"

// One step's tensors, as the kernels read them. A decode step has one token a row, at the position seqlens[b];
// a prompt step `tokens` a row, at past .. past + tokens - 1.
struct AttentionStep {
  const float *q, *k, *v;  // token t of row b: q at (b tokens + t) q_row, k and v at (b tokens + t) kv_row
  int64_t q_row, kv_row;
  float *keys, *values;    // the caches [b, KV, capacity, d]
  const int32_t* seqlens;  // [b]
  const float *cos, *sin;  // [positions, d / 2], or null
  float* out;              // [b, tokens, H d]
  int64_t batch, tokens, past, heads, kv_heads, capacity, d, window;
  float scale;
};

#if defined(GRAINS_AVX512)
// e^x for x <= 0 (scores minus their maximum), 16 at a time: 2^(x log2 e) as 2^n * 2^f, |f| <= 1/2, 2^f by
// its Taylor series to degree 7 (relative error below 1e-7), 2^n by scalef (0 below float's range).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));  // (t - n) ln 2
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// Rotary embedding, rotate-half form: x[0 : d/2], x[d/2 : d] rotated by one position's angles (cos, sin
// [d / 2]), into `to` (may be x).
inline void rotate_half(const float* x, const float* cos, const float* sin, int64_t d, float* to) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    to[i] = a * cos[i] - b * sin[i];
    to[i + half] = b * cos[i] + a * sin[i];
  }
}
