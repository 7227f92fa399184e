// What both of CachedAttention's own steps use (cached_attention.cc, prompt_attention.h): their inputs and
// outputs, and their arithmetic.

#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu.h"
#include "vector_math.h"

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

// x (d floats of a query or a key) as it is cached and attended at position p: rotated by p's angles when the
// step has rotary embedding, else as it is; into `to`.
inline void at_position(const AttentionStep& st, const float* x, int64_t p, float* to) {
  if (st.cos != nullptr) {
    rotate_half(x, st.cos + p * (st.d / 2), st.sin + p * (st.d / 2), st.d, to);
  } else {
    std::copy(x, x + st.d, to);
  }
}

// The first key a query at position p attends to: the last `window` keys, [p - window + 1, p], as
// GroupQueryAttention's local window and a Hugging Face sliding window; all of them without a window (-1).
inline int64_t first_key(int64_t p, int64_t window) { return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0; }

#if defined(GRAINS_AVX512)
// 16 V floats of `rows` (up to 4) rows of sums, d apart: sums[x] = sums[x] shrink[x] + sum_u weights[x stride
// + u] values[u], over n values d apart; the 4 V accumulators in registers (a count known at compile time:
// indexed by a run-time one, they were kept in memory, a store per multiply-add).
template <int V>
inline void add_weighted_chunk(float* sums, int64_t rows, const float* shrink, const float* weights, int64_t stride,
                               const float* values, int64_t n, int64_t d) {
  __m512 acc[4][V];
  for (int x = 0; x < 4; ++x) {
    for (int v = 0; v < V; ++v) {
      acc[x][v] = x < rows ? _mm512_mul_ps(_mm512_loadu_ps(sums + x * d + 16 * v), _mm512_set1_ps(shrink[x])) : _mm512_setzero_ps();
    }
  }
  for (int64_t u = 0; u < n; ++u) {
    __m512 value[V];
    for (int v = 0; v < V; ++v) value[v] = _mm512_loadu_ps(values + u * d + 16 * v);
    for (int x = 0; x < 4; ++x) {
      if (x < rows) {
        const __m512 w = _mm512_set1_ps(weights[x * stride + u]);
        for (int v = 0; v < V; ++v) acc[x][v] = _mm512_fmadd_ps(w, value[v], acc[x][v]);
      }
    }
  }
  for (int64_t x = 0; x < rows; ++x) {
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(sums + x * d + 16 * v, acc[x][v]);
  }
}

// add_weighted_chunk over all d floats of the rows (d a multiple of 16), 64 at a time.
inline void add_weighted_values(float* sums, int64_t rows, const float* shrink, const float* weights, int64_t stride,
                                const float* values, int64_t n, int64_t d) {
  int64_t at = 0;
  for (; at + 64 <= d; at += 64) add_weighted_chunk<4>(sums + at, rows, shrink, weights, stride, values + at, n, d);
  switch ((d - at) / 16) {
    case 3: add_weighted_chunk<3>(sums + at, rows, shrink, weights, stride, values + at, n, d); break;
    case 2: add_weighted_chunk<2>(sums + at, rows, shrink, weights, stride, values + at, n, d); break;
    case 1: add_weighted_chunk<1>(sums + at, rows, shrink, weights, stride, values + at, n, d); break;
    default: break;
  }
}
#endif
