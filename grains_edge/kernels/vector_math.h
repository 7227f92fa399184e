// Vector arithmetic the kernels share: horizontal sums of many vectors at once (cached_attention.cc's scores, the
// linear kernels' 4 x 4 output tiles) and e^x (attention's softmax, the gated linears' sigmoid).

#pragma once

#include <cstdint>

#include "cpu.h"

#if defined(GRAINS_AVX512)
// 16 vectors -> one whose lane u is the sum of p[u]'s lanes: pairs, then quads, interleaved and added (45
// operations, where 16 separate horizontal sums take about 130).
inline __m512 sums_of_16(const __m512 p[16]) {
  __m512 pairs[8], quads[4], halves[2];
  for (int u = 0; u < 8; ++u) {  // 128-bit lane: a0+a2 b0+b2 a1+a3 b1+b3
    pairs[u] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * u], p[2 * u + 1]), _mm512_unpackhi_ps(p[2 * u], p[2 * u + 1]));
  }
  for (int u = 0; u < 4; ++u) {  // 128-bit lane: a b c d, each a quarter of its vector's sum
    quads[u] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * u], pairs[2 * u + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(pairs[2 * u], pairs[2 * u + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int u = 0; u < 2; ++u) {  // 128-bit lanes: quads 2u and 2u + 1, each as two halves of their sums
    halves[u] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * u], quads[2 * u + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * u], quads[2 * u + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// A 4 x 4 tile of outputs from its 16 accumulators: out[c * stride + i] = the sum of p[4 c + i]'s lanes.
inline void store_sums_4x4(const __m512 p[16], float* out, int64_t stride) {
  const __m512 all = sums_of_16(p);
  _mm_storeu_ps(out, _mm512_extractf32x4_ps(all, 0));
  _mm_storeu_ps(out + stride, _mm512_extractf32x4_ps(all, 1));
  _mm_storeu_ps(out + 2 * stride, _mm512_extractf32x4_ps(all, 2));
  _mm_storeu_ps(out + 3 * stride, _mm512_extractf32x4_ps(all, 3));
}

// e^x for x <= 0 (scores minus their maximum, a sigmoid's -|z|), 16 at a time: 2^(x log2 e) as 2^n * 2^f,
// |f| <= 1/2, 2^f by its Taylor series to degree 7 (relative error below 1e-7), 2^n by scalef (0 below float's
// range).
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
