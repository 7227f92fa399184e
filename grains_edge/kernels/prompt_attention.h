// CachedAttention's own prompt step (cached_attention.cc): every row's s new tokens at positions past .. past +
// s - 1, appended to caches held in place, each query attending to the keys [max(0, p - window + 1), p] of its
// KV head (window -1: all). The rows share one past; first prompts (past 0) may be right-padded to the longest,
// whose real positions then see only real keys, and whose padding is computed like any position and ignored.
//
// As FlashAttention does (Dao et al. 2022), blocks of 16 keys pass over a block of queries (16 positions, every
// query head of the KV head), each query keeping a running maximum, sum of exponentials and weighted sum of
// values: no [s, s] score matrix is made, and each block of keys and values is read once per block of queries
// from L1. A key block is transposed once, so that a query's 16 scores are d broadcast multiply-adds:
//
//   keys [16, d] --transpose--> kt [d, 16]
//   per 4 queries:  s[x] = sum_i q[x][i] * kt[i]          (16 scores, lane u: key u)
//                   top' = max(top, max s[x]);  e = exp(s[x] - top')  (0 where the key is not visible)
//                   sums[x] = sums[x] e^(top - top') + sum_u e[u] values[u];  total likewise
//   output = sums / total
//
// AVX-512 only; elsewhere a prompt step is GroupQueryAttention's own.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_math.h"
#include "cpu.h"

#if defined(GRAINS_AVX512)

constexpr int64_t kQueryBlock = 16;  // positions per task
constexpr int64_t kKeyBlock = 16;    // keys per pass, one per lane

// Task: row `task / kv_heads`, KV head `task % kv_heads`: its new keys (rotated at their positions) and values
// into the cache.
inline void append_prompt(void* data, size_t task) {
  const AttentionStep& st = *static_cast<const AttentionStep*>(data);
  const int64_t b = static_cast<int64_t>(task) / st.kv_heads, g = static_cast<int64_t>(task) % st.kv_heads, d = st.d;
  float* keys = st.keys + (b * st.kv_heads + g) * st.capacity * d;
  float* values = st.values + (b * st.kv_heads + g) * st.capacity * d;
  for (int64_t t = 0; t < st.tokens; ++t) {
    const int64_t p = st.past + t, token = b * st.tokens + t;
    const float *k = st.k + token * st.kv_row + g * d, *v = st.v + token * st.kv_row + g * d;
    at_position(st, k, p, keys + p * d);
    std::copy(v, v + d, values + p * d);
  }
}

// The lanes of keys t0 .. t0 + n - 1 that the query at position p sees: [p - window + 1, p], or none for p < 0.
inline __mmask16 visible_keys(int64_t p, int64_t window, int64_t t0, int64_t n) {
  if (p < 0) return 0;
  const int64_t from = std::max<int64_t>(first_key(p, window) - t0, 0), to = std::min<int64_t>(p - t0, n - 1);
  if (from > to) return 0;
  return static_cast<__mmask16>(((1u << (to + 1)) - 1) & ~((1u << from) - 1));
}

// Task: a block of 16 positions of one row and KV head, the blocks nearest the end (the most keys) first, so
// that the threads finish together. Rows r of the task: position r / group, query head g group + r % group.
inline void attend_prompt(void* data, size_t task) {
  const AttentionStep& st = *static_cast<const AttentionStep*>(data);
  const int64_t pairs = st.batch * st.kv_heads, blocks = (st.tokens + kQueryBlock - 1) / kQueryBlock;
  const int64_t block = blocks - 1 - static_cast<int64_t>(task) / pairs, pair = static_cast<int64_t>(task) % pairs;
  const int64_t b = pair / st.kv_heads, g = pair % st.kv_heads, d = st.d, group = st.heads / st.kv_heads;
  const int64_t first = block * kQueryBlock, count = std::min(kQueryBlock, st.tokens - first);
  const int64_t rows = count * group, padded = (rows + 3) / 4 * 4;
  std::vector<float> queries(padded * d, 0.f), sums(padded * d, 0.f), kt(d * kKeyBlock);  // [rows, d] x2, [d, 16]
  std::vector<float> top(padded, -std::numeric_limits<float>::infinity()), total(padded, 0.f);
  std::vector<int64_t> position(padded, -1);  // -1: a row that pads the last 4
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = first + r / group, head = g * group + r % group, p = st.past + token;
    const float* q = st.q + (b * st.tokens + token) * st.q_row + head * d;
    float* to = queries.data() + r * d;
    at_position(st, q, p, to);
    for (int64_t i = 0; i < d; ++i) to[i] *= st.scale;
    position[r] = p;
  }
  const float* keys = st.keys + (b * st.kv_heads + g) * st.capacity * d;
  const float* values = st.values + (b * st.kv_heads + g) * st.capacity * d;
  const int64_t last = st.past + first + count - 1;
  const int64_t earliest = first_key(st.past + first, st.window);
  alignas(64) float weights[4][kKeyBlock];
  for (int64_t t0 = earliest / kKeyBlock * kKeyBlock; t0 <= last; t0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, last + 1 - t0);
    for (int64_t u = 0; u < kKeyBlock; ++u) {
      for (int64_t i = 0; i < d; ++i) kt[i * kKeyBlock + u] = u < n ? keys[(t0 + u) * d + i] : 0.f;
    }
    for (int64_t r0 = 0; r0 < padded; r0 += 4) {
      __mmask16 visible[4];
      float shrink[4];
      bool any = false;
      for (int x = 0; x < 4; ++x) {
        visible[x] = visible_keys(position[r0 + x], st.window, t0, n);
        any = any || visible[x] != 0;
      }
      if (!any) continue;
      __m512 scores[4], odd[4];  // two sums per row, the even and the odd i: 8 chains of multiply-adds, not 4
      for (int x = 0; x < 4; ++x) scores[x] = odd[x] = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 2) {
        const __m512 column = _mm512_loadu_ps(kt.data() + i * kKeyBlock), next = _mm512_loadu_ps(kt.data() + (i + 1) * kKeyBlock);
#pragma GCC unroll 4
        for (int x = 0; x < 4; ++x) {
          scores[x] = _mm512_fmadd_ps(_mm512_set1_ps(queries[(r0 + x) * d + i]), column, scores[x]);
          odd[x] = _mm512_fmadd_ps(_mm512_set1_ps(queries[(r0 + x) * d + i + 1]), next, odd[x]);
        }
      }
      for (int x = 0; x < 4; ++x) scores[x] = _mm512_add_ps(scores[x], odd[x]);
      for (int x = 0; x < 4; ++x) {
        const int64_t r = r0 + x;
        shrink[x] = 1.f;
        if (visible[x] == 0) {
          _mm512_store_ps(weights[x], _mm512_setzero_ps());
          continue;
        }
        const float peak = std::max(top[r], _mm512_mask_reduce_max_ps(visible[x], scores[x]));
        const __m512 e = _mm512_maskz_mov_ps(visible[x], exp_nonpositive(_mm512_sub_ps(scores[x], _mm512_set1_ps(peak))));
        shrink[x] = std::isinf(top[r]) ? 0.f : std::exp(top[r] - peak);
        total[r] = total[r] * shrink[x] + _mm512_reduce_add_ps(e);
        top[r] = peak;
        _mm512_store_ps(weights[x], e);
      }
      add_weighted_values(sums.data() + r0 * d, 4, shrink, weights[0], kKeyBlock, values + t0 * d, n, d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = first + r / group, head = g * group + r % group;
    float* out = st.out + ((b * st.tokens + token) * st.heads + head) * d;
    const float inverse = 1.f / total[r];
    for (int64_t i = 0; i < d; ++i) out[i] = sums[r * d + i] * inverse;
  }
}

#endif
