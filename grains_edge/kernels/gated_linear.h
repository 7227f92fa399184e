// Gated linears: with the `activation` attribute, a linear kernel's N rows of W are gate | up (a gated MLP's
// two projections side by side) and its output is y [..., N/2] = act(x @ gate^T) * (x @ up^T), act SiLU
// (Llama's SwiGLU: g sigmoid(g)) or GELU's tanh form (Gemma's GeGLU: 0.5 g (1 + tanh(z)) = g sigmoid(2 z),
// z = sqrt(2/pi) (g + 0.044715 g^3)). Each task computes its 32 gate and 32 up columns side by side and writes
// their product, where the graph's Split, activation and Mul were three more nodes reading and writing them.
// Include after onnxruntime_cxx_api.h.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu.h"
#include "vector_math.h"

enum class Gate { kNone, kSilu, kGeluTanh };

// The `activation` attribute of kernel `op` over n rows of W: absent for a plain linear; gated, n must be even.
inline Gate gate_of(const OrtKernelInfo* info, int64_t n, const std::string& op) {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetAttribute<std::string>("activation");
  } catch (const Ort::Exception&) {
    return Gate::kNone;
  }
  if (name != "silu" && name != "gelu_tanh") {
    ORT_CXX_API_THROW(op + ": activation must be silu or gelu_tanh, not " + name, ORT_INVALID_ARGUMENT);
  }
  if (n % 2 != 0) ORT_CXX_API_THROW(op + ": a gated N must be even", ORT_INVALID_ARGUMENT);
  return name == "silu" ? Gate::kSilu : Gate::kGeluTanh;
}

// The output columns of a linear over n rows of W.
inline int64_t output_columns(Gate gate, int64_t n) { return gate == Gate::kNone ? n : n / 2; }

constexpr int64_t kGateColumns = 32;  // gate (and up) columns per task: both, side by side, 64 floats a row of x

// Where row n of W against row r of x goes: y[r * stride + n - first].
struct Out {
  float* y;
  int64_t stride, first;
  float* at(int64_t r, int64_t n) const { return y + r * stride + (n - first); }
};

// act(g) = g sigmoid(s(g)): the argument of the sigmoid.
inline float sigmoid_argument(Gate gate, float g) {
  return gate == Gate::kSilu ? g : 1.5957691216057308f * (g + 0.044715f * g * g * g);  // 2 sqrt(2/pi) (...)
}

#if defined(GRAINS_AVX512)
inline __m512 sigmoid_argument(Gate gate, __m512 g) {
  if (gate == Gate::kSilu) return g;
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
  return _mm512_mul_ps(_mm512_set1_ps(1.5957691216057308f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, g));
}

// sigmoid(z) = 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below: e^-|z| never overflows.
inline __m512 sigmoid(__m512 z) {
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), r, e);
}
#endif

// y[r * stride + j] = act(both[r * 64 + j]) * both[r * 64 + 32 + j] for the task's `width` columns (<= 32).
inline void gate_rows(Gate gate, const float* both, int64_t rows, int64_t width, float* y, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = both + r * 2 * kGateColumns;
    const float* u = g + kGateColumns;
    float* out = y + r * stride;
#if defined(GRAINS_AVX512)
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 present = static_cast<__mmask16>(width - j >= 16 ? 0xffff : (1u << (width - j)) - 1);
      const __m512 gv = _mm512_maskz_loadu_ps(present, g + j), uv = _mm512_maskz_loadu_ps(present, u + j);
      _mm512_mask_storeu_ps(out + j, present, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(sigmoid_argument(gate, gv))), uv));
    }
#else
    for (int64_t j = 0; j < width; ++j) out[j] = g[j] / (1.f + std::exp(-sigmoid_argument(gate, g[j]))) * u[j];
#endif
  }
}

// A gated linear's task from output column `first`: rows [first, first + 32) of gate and the same rows of up
// (`rows_of_w(from, to, out)` computes rows [from, to) of W against every row of x into `out`), side by side,
// then their product into y [rows, n/2].
template <class RowsOfW>
void gated_task(Gate gate, int64_t rows, int64_t n, int64_t first, float* y, const RowsOfW& rows_of_w) {
  const int64_t half = n / 2, width = std::min(kGateColumns, half - first);
  thread_local std::vector<float> both;  // [rows, 64]: the task's gate columns, then its up columns
  both.resize(rows * 2 * kGateColumns);
  rows_of_w(first, first + width, Out{both.data(), 2 * kGateColumns, first});
  rows_of_w(half + first, half + first + width, Out{both.data() + kGateColumns, 2 * kGateColumns, half + first});
  gate_rows(gate, both.data(), rows, width, y + first, half);
}
