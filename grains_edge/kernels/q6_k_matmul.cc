// grains_edge.Q6_KMatMul: y = x @ W^T for W stored as ggml Q6_K super-blocks, the bytes a GGUF holds;
// grains_edge.Q6_KGather: rows of such a W (a tied embedding table that is also the LM head).
//
//   Q6_KMatMul  inputs  x [..., K] float32; blocks [N, K/256 * 210] uint8 (block_q6_K: ql[128], qh[64],
//                       int8 scales[16], float16 d)
//               output  y [..., N] float32;  attributes K, N
//   Q6_KGather  inputs  blocks [N, K/256 * 210] uint8; ids [...] int64
//               output  rows [..., K] float32, d * sc_j * (q - 32) as ggml's dequantize_row_q6_K rounds it;
//                       attributes K, N
//
// A super-block of 256 weights is 16 sub-blocks of 16 six-bit levels q with scale d * sc_j. As in
// Q4_1MatMul, each row of x is first quantized per block of 32 to int8 (xq, dx = max|x_b| / 127), so
//
//   y[n] = sum_j d sc_j dx_b(j) * (q_j . xq_j - 32 sum(xq_j))
//
// with unsigned levels against signed xq (AVX512-VNNI dpbusd). The 210 bytes of a super-block are read as
// the GGUF stores them, one memory stream per row of W; as MatMulNBits' 8-bit blocks of 16 they were 10 bits
// per weight (float32 scales), here 6.56.
//
// Sources: ggml's block_q6_K layout (ggml-common.h) and dequantize_row_q6_K (ggml-quants.c); ONNX Runtime's
// custom-op C++ API (onnxruntime_cxx_api.h, CustomOpBase). Registered by register.cc.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu.h"

namespace {

constexpr int64_t kSuper = 256;       // weights per super-block
constexpr int64_t kSuperBytes = 210;  // bytes per super-block
constexpr int64_t kRowsPerTask = 32;  // rows of W per parallel task
constexpr int64_t kRowTile = 8;       // rows of W kept hot while every row of x passes over them

// The six-bit level of element e (0..255) of a super-block, as dequantize_row_q6_K reads it.
int level(const uint8_t* block, int e) {
  const int half = e / 128, k = (e % 128) / 32, l = e % 32;
  const uint8_t low = block[64 * half + l + 32 * (k & 1)], high = block[128 + 32 * half + l];
  return ((k < 2 ? low & 15 : low >> 4) | (((high >> (2 * k)) & 3) << 4));
}

// Rows of x [K] quantized per block of 32, in element order: xq [rows, K] int8; per super-block, the scale of
// each int32 lane of the four 64-element dot products (lane L of product g covers elements 64 g + 4 L..+3,
// block 2 g + L / 8) and the offset terms -32 dx_b(j) sum(xq_j) of its 16 sub-blocks.
struct QuantizedRows {
  int64_t supers;
  std::vector<int8_t> xq;
  std::vector<float> lane_dx;  // [rows, supers, 4, 16]
  std::vector<float> offset;   // [rows, supers, 16]

  QuantizedRows(const float* x, int64_t rows, int64_t k)
      : supers(k / kSuper), xq(rows * k), lane_dx(rows * (k / kSuper) * 64), offset(rows * (k / kSuper) * 16) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < k / 32; ++b) {
        const float* xb = x + r * k + b * 32;
        int8_t* qb = xq.data() + r * k + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float inverse = amax > 0.f ? 127.f / amax : 0.f, dx = amax / 127.f;
        int32_t sums[2] = {0, 0};  // of the block's two sub-blocks
        for (int j = 0; j < 32; ++j) {
          qb[j] = static_cast<int8_t>(std::nearbyint(xb[j] * inverse));
          sums[j / 16] += qb[j];
        }
        const int64_t s = b / 8, in_super = b % 8;  // this block's super-block and place in it
        float* lanes = lane_dx.data() + (r * supers + s) * 64 + (in_super / 2) * 16 + (in_super % 2) * 8;
        std::fill(lanes, lanes + 8, dx);
        float* offsets = offset.data() + (r * supers + s) * 16 + in_super * 2;
        offsets[0] = -32.f * dx * static_cast<float>(sums[0]);
        offsets[1] = -32.f * dx * static_cast<float>(sums[1]);
      }
    }
  }
};

// out[c * stride + i] = row n + i of W against row r + c of x, for R rows of W and C rows of x: R x C
// accumulators; the rows of x share each unpacked super-block of W.
template <int R, int C>
void dot_rows(const uint8_t* w, int64_t n, const QuantizedRows& x, int64_t r, float* out, int64_t stride) {
  const int64_t supers = x.supers, row_bytes = supers * kSuperBytes;
#if defined(GRAINS_AVX512)
  const __m512i nibble = _mm512_set1_epi8(0x0f), pair = _mm512_set1_epi8(0x30);
  // the high bit pairs of elements 0..63 and 64..127 of a half: (qh << 4, qh << 2) and (qh, qh >> 2) & 0x30
  const __m512i up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i down = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i spread[4] = {
      _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
      _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
      _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
      _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < supers; ++s) {
    // unrolled, so that acc[i][c] are registers
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const uint8_t* block = w + (n + i) * row_bytes + s * kSuperBytes;
      _mm_prefetch(reinterpret_cast<const char*>(block + R * row_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(block + R * row_bytes + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(block + R * row_bytes + 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(block + R * row_bytes + 192), _MM_HINT_T0);
      uint16_t half_d;
      std::memcpy(&half_d, block + 208, 2);
      const __m512 scales = _mm512_mul_ps(  // d sc_j [16]
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)))),
          _mm512_set1_ps(_cvtsh_ss(half_d)));
      __m512i q[4];  // levels of elements 64 g..64 g + 63, in order
      for (int h = 0; h < 2; ++h) {
        const __m512i low = _mm512_loadu_si512(block + 64 * h);
        const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h)));
        q[2 * h] = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(_mm512_sllv_epi16(high, up), pair));
        q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble),
                                       _mm512_and_si512(_mm512_srlv_epi16(high, down), pair));
      }
      for (int c = 0; c < C; ++c) {
        const int8_t* xq = x.xq.data() + (r + c) * supers * kSuper + s * kSuper;
        const float* lane_dx = x.lane_dx.data() + ((r + c) * supers + s) * 64;
        acc[i][c] = _mm512_fmadd_ps(scales, _mm512_loadu_ps(x.offset.data() + ((r + c) * supers + s) * 16), acc[i][c]);
        for (int g = 0; g < 4; ++g) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[g], _mm512_loadu_si512(xq + 64 * g));
          const __m512 lane_scale = _mm512_mul_ps(_mm512_permutexvar_ps(spread[g], scales), _mm512_loadu_ps(lane_dx + 16 * g));
          acc[i][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), lane_scale, acc[i][c]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) out[c * stride + i] = _mm512_reduce_add_ps(acc[i][c]);
  }
#else
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) {
      float total = 0.f;
      for (int64_t s = 0; s < supers; ++s) {
        const uint8_t* block = w + (n + i) * row_bytes + s * kSuperBytes;
        uint16_t half_d;
        std::memcpy(&half_d, block + 208, 2);
        const float d = half_to_float(half_d);
        const int8_t* xq = x.xq.data() + (r + c) * supers * kSuper + s * kSuper;
        const float* lane_dx = x.lane_dx.data() + ((r + c) * supers + s) * 64;
        const float* offset = x.offset.data() + ((r + c) * supers + s) * 16;
        for (int j = 0; j < 16; ++j) {
          int32_t dot = 0;
          for (int e = 16 * j; e < 16 * j + 16; ++e) dot += level(block, e) * xq[e];
          const float scale = d * static_cast<float>(static_cast<int8_t>(block[192 + j]));
          total += scale * (lane_dx[4 * j] * static_cast<float>(dot) + offset[j]);
        }
      }
      out[c * stride + i] = total;
    }
  }
#endif
}

struct Work {
  const uint8_t* w;
  const QuantizedRows* x;
  float* y;  // [rows, N]
  int64_t rows, n;
};

// Rows [tile, tile_end) of W against rows [r, r + C) of x. One row of x (a decode step) takes the rows of W
// one at a time, each over its whole K, so that a task reads its rows as one sequential stream: 4 rows at a
// time were 4 interleaved streams per field, and a 1B model's decode 1.5x slower. Several rows of x take 4
// rows of W at a time, each unpacked block shared by them.
template <int C>
void rows_of_x(const Work& work, int64_t tile, int64_t tile_end, int64_t r) {
  float* y = work.y + r * work.n;
  int64_t n = tile;
  if (C > 1) {
    for (; n + 4 <= tile_end; n += 4) dot_rows<4, C>(work.w, n, *work.x, r, y + n, work.n);
  }
  for (; n < tile_end; ++n) dot_rows<1, C>(work.w, n, *work.x, r, y + n, work.n);
}

// Task t: rows [32 t, 32 t + 32) of W against every row of x, kRowTile rows of W at a time.
void run_task(void* data, size_t task) {
  const Work& work = *static_cast<const Work*>(data);
  const int64_t first = static_cast<int64_t>(task) * kRowsPerTask, last = std::min(first + kRowsPerTask, work.n);
  for (int64_t tile = first; tile < last; tile += kRowTile) {
    const int64_t tile_end = std::min(tile + kRowTile, last);
    int64_t r = 0;
    for (; r + 4 <= work.rows; r += 4) rows_of_x<4>(work, tile, tile_end, r);
    for (; r < work.rows; ++r) rows_of_x<1>(work, tile, tile_end, r);
  }
}

void check_blocks(const Ort::ConstValue& blocks, int64_t k, int64_t n, const char* op) {
  if (k % kSuper != 0 ||
      blocks.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n * (k / kSuper) * kSuperBytes)) {
    ORT_CXX_API_THROW(std::string(op) + ": K must be a multiple of 256 and blocks hold N * K/256 super-blocks",
                      ORT_INVALID_ARGUMENT);
  }
}

struct Q6_KMatMulKernel {
  Q6_KMatMulKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    k_ = kernel_info.GetAttribute<int64_t>("K");
    n_ = kernel_info.GetAttribute<int64_t>("N");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue x = context.GetInput(0), blocks = context.GetInput(1);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != k_) ORT_CXX_API_THROW("Q6_KMatMul: x's last axis must be K", ORT_INVALID_ARGUMENT);
    check_blocks(blocks, k_, n_, "Q6_KMatMul");
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    shape.back() = n_;
    Ort::UnownedValue y = context.GetOutput(0, shape);
    if (rows == 0) return;
    const QuantizedRows quantized(x.GetTensorData<float>(), rows, k_);
    Work work{blocks.GetTensorData<uint8_t>(), &quantized, y.GetTensorMutableData<float>(), rows, n_};
    context.ParallelFor(run_task, static_cast<size_t>((n_ + kRowsPerTask - 1) / kRowsPerTask), 0, &work);
  }

  int64_t k_ = 0, n_ = 0;
};

struct Q6_KGatherKernel {
  Q6_KGatherKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    k_ = kernel_info.GetAttribute<int64_t>("K");
    n_ = kernel_info.GetAttribute<int64_t>("N");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue blocks = context.GetInput(0), ids = context.GetInput(1);
    check_blocks(blocks, k_, n_, "Q6_KGather");
    std::vector<int64_t> shape = ids.GetTensorTypeAndShapeInfo().GetShape();
    const size_t count = ids.GetTensorTypeAndShapeInfo().GetElementCount();
    shape.push_back(k_);
    float* out = context.GetOutput(0, shape).GetTensorMutableData<float>();
    const int64_t* id = ids.GetTensorData<int64_t>();
    const uint8_t* table = blocks.GetTensorData<uint8_t>();
    const int64_t supers = k_ / kSuper;
    for (size_t t = 0; t < count; ++t) {
      if (id[t] < 0 || id[t] >= n_) ORT_CXX_API_THROW("Q6_KGather: an id is outside the table", ORT_INVALID_ARGUMENT);
      for (int64_t s = 0; s < supers; ++s) {
        const uint8_t* block = table + (id[t] * supers + s) * kSuperBytes;
        uint16_t half_d;
        std::memcpy(&half_d, block + 208, 2);
        const float d = half_to_float(half_d);
        for (int e = 0; e < kSuper; ++e) {
          const float scale = d * static_cast<float>(static_cast<int8_t>(block[192 + e / 16]));
          out[t * k_ + s * kSuper + e] = scale * static_cast<float>(level(block, e) - 32);
        }
      }
    }
  }

  int64_t k_ = 0, n_ = 0;
};

struct Q6_KMatMulOp : Ort::CustomOpBase<Q6_KMatMulOp, Q6_KMatMulKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Q6_KMatMulKernel(api, info); }
  const char* GetName() const { return "Q6_KMatMul"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct Q6_KGatherOp : Ort::CustomOpBase<Q6_KGatherOp, Q6_KGatherKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Q6_KGatherKernel(api, info); }
  const char* GetName() const { return "Q6_KGather"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* q6_k_matmul_op() {
  static const Q6_KMatMulOp op;
  return &op;
}

const OrtCustomOp* q6_k_gather_op() {
  static const Q6_KGatherOp op;
  return &op;
}
