// Gated linears: with the `activation` attribute, a linear kernel's N rows of W are gate | up (a gated MLP's
// two projections side by side) and its output is y [..., N/2] = act(x @ gate^T) * (x @ up^T), act SiLU
// (Llama's SwiGLU: g sigmoid(g)) or GELU's tanh form (Gemma's GeGLU: 0.5 g (1 + tanh(z)) = g sigmoid(2 z),
// z = sqrt(2/pi) (g + 0.044715 g^3)). Each task computes its 32 gate and 32 up columns side by side and writes
// their product, where the graph's Split, activation and Mul were three more nodes reading and writing them.
// Include after onnxruntime_cxx_api.h.

#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "cpu.h"
#include "vector_math.h"

enum class Gate { kNone, kSilu, kGeluTanh };

// The kernel's `activation` attribute: absent for a plain linear.
inline Gate gate_of(const OrtKernelInfo* info) {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetAttribute<std::string>("activation");
  } catch (const Ort::Exception&) {
    return Gate::kNone;
  }
  if (name == "silu") return Gate::kSilu;
  if (name == "gelu_tanh") return Gate::kGeluTanh;
  ORT_CXX_API_THROW("activation must be silu or gelu_tanh, not " + name, ORT_INVALID_ARGUMENT);
}

constexpr int64_t kGateColumns = 32;  // gate (and up) columns per task: both, side by side, 64 floats a row of x

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
