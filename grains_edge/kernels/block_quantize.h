// Rows of x are quantized per block of 32 to int8, like llama.cpp's q8 blocks, by every linear kernel: the
// levels round x * 127 / max|x| to nearest even, and the kernels keep the block's scale, float sum and the sums
// of its two halves' levels for their offset and rounding terms. Include after onnxruntime_cxx_api.h.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cpu.h"

struct QuantizedBlock {
  float scale;        // max|x| / 127
  float sum;          // of the 32 floats
  int32_t levels[2];  // sums of the levels of elements 0-15 and 16-31
};

// x [32] -> levels of elements 0-15 into `low`, 16-31 into `high` (16 bytes each).
inline QuantizedBlock quantize_block(const float* x, int8_t* low, int8_t* high) {
  QuantizedBlock out{};
#if defined(GRAINS_AVX512)
  // the same rounding as the plain loop (nearest even, the default mode), 16 elements per instruction; only
  // the order of the float sum differs
  const __m512 first = _mm512_loadu_ps(x), second = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
  out.sum = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
  const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i first_levels = _mm512_cvtps_epi32(_mm512_mul_ps(first, inverse));
  const __m512i second_levels = _mm512_cvtps_epi32(_mm512_mul_ps(second, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(low), _mm512_cvtsepi32_epi8(first_levels));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm512_cvtsepi32_epi8(second_levels));
  out.levels[0] = _mm512_reduce_add_epi32(first_levels);
  out.levels[1] = _mm512_reduce_add_epi32(second_levels);
#else
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) {
    amax = std::max(amax, std::fabs(x[j]));
    out.sum += x[j];
  }
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  for (int j = 0; j < 16; ++j) {
    low[j] = static_cast<int8_t>(std::nearbyint(x[j] * inverse));
    high[j] = static_cast<int8_t>(std::nearbyint(x[j + 16] * inverse));
    out.levels[0] += low[j];
    out.levels[1] += high[j];
  }
#endif
  out.scale = amax / 127.f;
  return out;
}

constexpr int64_t kRowsPerQuantizeTask = 16;

// each(r) for the rows r of x: on the session's threads for a prompt's many rows (done before the product on one
// thread, the quantization of a 1B model's 512-token prompt left the other core idle for 0.18 s), else here.
template <class Each>
void for_each_row(Ort::KernelContext& context, int64_t rows, const Each& each) {
  if (rows < 2 * kRowsPerQuantizeTask) {
    for (int64_t r = 0; r < rows; ++r) each(r);
    return;
  }
  struct Job {
    const Each* each;
    int64_t rows;
  } job{&each, rows};
  auto task = [](void* data, size_t index) {
    const Job& job = *static_cast<const Job*>(data);
    const int64_t first = static_cast<int64_t>(index) * kRowsPerQuantizeTask;
    for (int64_t r = first; r < std::min(first + kRowsPerQuantizeTask, job.rows); ++r) (*job.each)(r);
  };
  context.ParallelFor(task, static_cast<size_t>((rows + kRowsPerQuantizeTask - 1) / kRowsPerQuantizeTask), 0, &job);
}
