// How the linear kernels (q4_1_matmul.cc, k_quant_matmul.cc) prefetch the rows of W a task reads next.

#pragma once

#include <cstdint>

#include "cpu.h"

// A task reads rows of W one at a time (a decode step) or 4 at a time (a batch, a prompt), with the same place
// kRowsAhead rows on prefetched into L1, which holds while x's quantized row stays in L1 beside it. One row on
// was too near for rows of a few hundred bytes to a few KB (the default model's decode step 5 % slower, a 1B
// Q4_K_M one 2 %); 8 rows on was no better, or slower. A row of x longer than kLongRowWeights pushes those lines
// out before they are read: there the next row goes to L2, and only kNear bytes ahead to L1 (8B's down_proj,
// K 14336: 63 -> 45 ms a decode step; docs/design-notes.md, "Long rows of x").
constexpr int64_t kRowsAhead = 4;
constexpr int64_t kLongRowWeights = 8192;
constexpr int64_t kNear = 2048;

#if defined(GRAINS_AVX2)
// Prefetch `bytes` of W at `at` kRowsAhead rows of `row_bytes` on into L1; for a `long_row` the next row into
// L2, and the `bytes` at `at + kNear` into L1.
inline void prefetch_ahead(const uint8_t* at, int64_t bytes, int64_t row_bytes, bool long_row) {
  for (int64_t line = 0; line < bytes; line += 64) {
    if (long_row) {
      _mm_prefetch(reinterpret_cast<const char*>(at + kNear + line), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(at + row_bytes + line), _MM_HINT_T1);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(at + kRowsAhead * row_bytes + line), _MM_HINT_T0);
    }
  }
}
#endif
