// Horizontal sums of many vectors at once (cached_attention.cc's scores, k_quant_matmul.cc's outputs).

#pragma once

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
#endif
