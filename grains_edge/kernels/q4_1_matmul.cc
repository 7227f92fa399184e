// grains_edge.Q4_1MatMul: y = x @ W^T for W stored as ggml Q4_1 blocks, exactly as a GGUF stores them.
//
//   inputs   x [..., K] float32; nibbles [N, K/2] uint8, 16 bytes per block of 32 (element j in the low
//            nibble of byte j, element j + 16 in the high one); d, m [N, K/32] float16; w = d * q + m
//            (a GGUF's Q4_1 blocks {d, m, nibbles}, with the three fields in separate arrays)
//   output   y [..., N] float32;  attributes K, N, and optionally activation (silu | gelu_tanh): then W's rows
//            are gate | up and y [..., N/2] = act(x @ gate^T) * (x @ up^T) (gated_linear.h)
//
// Like llama.cpp's q4_1 x q8_1 dot product, each row of x is first quantized per block of 32 to int8
// (xq, scale dx = max|x_b| / 127) with its block sums S_b kept in float. The sum is the centred one,
//
//   y[n] = sum_b d[n,b] * dx_b * ((q[n,b] - 8) . xq_b) + (m[n,b] + 8 d[n,b]) * S_b
//
// (levels 0..15 against xq's rounding errors would weigh them up to 15 d, centred at most 8 d: half the
// logit error), computed as d dx (q . xq) + m S + d * 8 (S - dx sum(xq)) so that the integer products stay
// unsigned x signed (AVX2 maddubs, AVX512-VNNI dpbusd). One kernel per linear, against three stock ONNX
// Runtime kernels for the same exact weight (gguf_blocks.py). Rows of W are split across the session's
// intra-op threads (KernelContext_ParallelFor).
//
// Sources: ggml's block_q4_1 layout (ggml-common.h) and its q4_1 x q8_1 dot product idea; ONNX Runtime's
// custom-op C++ API (onnxruntime_cxx_api.h, CustomOpBase). Registered by register.cc.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "block_quantize.h"
#include "cpu.h"
#include "gated_linear.h"
#include "linear_size.h"
#include "row_prefetch.h"

namespace {

constexpr int64_t kBlock = 32;       // weights per block
constexpr int64_t kRowsPerTask = 32; // rows of W per parallel task
static_assert(kRowsPerTask == kGateColumns, "a gated task's gate and up rows are its own output columns");
constexpr int64_t kRowTile = 8;      // rows of W kept hot while every row of x passes over them
constexpr int64_t kGroup = 16;       // blocks per AVX-512 step

// One row of x [K] -> its int8 levels split as the weight nibbles are, per block: lo [16 * blocks] the
// elements 0..15, hi the elements 16..31; scales dx, block sums sx and the rounding terms ex [blocks]
// (below). Each array is padded with zeros to whole groups of kGroup blocks.
struct QuantizedRows {
  int64_t blocks, padded;  // blocks per row, rounded up to kGroup
  std::vector<int8_t> lo, hi;
  std::vector<float> dx, sx, ex;

  QuantizedRows(Ort::KernelContext& context, const float* x, int64_t rows, int64_t k)
      : blocks(k / kBlock), padded((k / kBlock + kGroup - 1) / kGroup * kGroup),
        lo(rows * padded * 16), hi(rows * padded * 16), dx(rows * padded), sx(rows * padded), ex(rows * padded) {
    for_each_row(context, rows, [&](int64_t r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = (r * padded + b) * 16;
        const QuantizedBlock block = quantize_block(x + r * k + b * kBlock, lo.data() + at, hi.data() + at);
        dx[r * padded + b] = block.scale;
        sx[r * padded + b] = block.sum;
        ex[r * padded + b] = 8.f * (block.sum - block.scale * static_cast<float>(block.levels[0] + block.levels[1]));
      }
    });
  }
};

struct Weights {
  const uint8_t* nibbles;  // [N, K/2]
  const uint16_t* d;       // [N, K/32] float16
  const uint16_t* m;       // [N, K/32] float16
};

// out[c * stride + i] = sum_b d[n+i,b] * dx_b * (q[n+i,b] . xq_b) + m[n+i,b] * S_b for R rows of W from
// row n and C quantized rows of x from row r. R x C independent accumulators hide the multiply-add
// latency; the rows of W share each block of x, and (in a batch or a prompt) the rows of x each unpacked block of W.
template <int R, int C>
void dot_rows(const Weights& w, int64_t n, const QuantizedRows& x, int64_t r, float* out, int64_t stride) {
  const int64_t blocks = x.blocks;
  const int8_t *lo[C], *hi[C];
  const float *dx[C], *sx[C], *ex[C];
  for (int c = 0; c < C; ++c) {
    lo[c] = x.lo.data() + (r + c) * x.padded * 16;
    hi[c] = x.hi.data() + (r + c) * x.padded * 16;
    dx[c] = x.dx.data() + (r + c) * x.padded;
    sx[c] = x.sx.data() + (r + c) * x.padded;
    ex[c] = x.ex.data() + (r + c) * x.padded;
  }
#if defined(GRAINS_AVX512)
  const bool long_row = R == 1 && blocks * kBlock > kLongRowWeights;
  // 16 blocks per step: their scales d * dx in one register per row of x, the offset terms m * S + d * ex
  // added to the same accumulators, then 4 blocks (64 bytes of nibbles) per product, lanes 4j..4j+3 of which
  // belong to block j. Nothing but the R x C accumulators lives across steps, so 4 x 4 of them fit the 32
  // registers without spilling.
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i spread[4] = {
      _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
      _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
      _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
      _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; b += kGroup) {
    const int64_t left = std::min<int64_t>(kGroup, blocks - b);
    const __mmask16 present = static_cast<__mmask16>(left == kGroup ? 0xffff : (1u << left) - 1);
    // unrolled, so that acc[i][c] are registers: indexed by a loop variable they were kept in memory
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int64_t row = n + i;
      const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, w.d + row * blocks + b));
      const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, w.m + row * blocks + b));
      __m512 scale[C];
      for (int c = 0; c < C; ++c) {
        scale[c] = _mm512_mul_ps(d, _mm512_loadu_ps(dx[c] + b));
        acc[i][c] = _mm512_fmadd_ps(d, _mm512_loadu_ps(ex[c] + b), _mm512_fmadd_ps(m, _mm512_loadu_ps(sx[c] + b), acc[i][c]));
      }
      const uint8_t* nibbles = w.nibbles + (row * blocks + b) * 16;
      prefetch_ahead(nibbles, 4 * 64, blocks * 16, long_row);  // this chunk a few rows on
      for (int64_t g = 0; g < (left + 3) / 4; ++g) {
        const int64_t rest = left - 4 * g;
        const __mmask64 bytes = rest >= 4 ? ~0ULL : (1ULL << (16 * rest)) - 1;
        const __m512i packed = _mm512_maskz_loadu_epi8(bytes, nibbles + g * 64);
        const __m512i q_lo = _mm512_and_si512(packed, low), q_hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
        for (int c = 0; c < C; ++c) {
          const __m512i x_lo = _mm512_loadu_si512(lo[c] + (b + 4 * g) * 16);
          const __m512i x_hi = _mm512_loadu_si512(hi[c] + (b + 4 * g) * 16);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q_lo, x_lo), q_hi, x_hi);
          acc[i][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread[g], scale[c]), acc[i][c]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) out[c * stride + i] = _mm512_reduce_add_ps(acc[i][c]);
  }
#else
  for (int c = 0; c < C; ++c) {
    float* row_out = out + c * stride;
#if defined(GRAINS_AVX2)
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[R];
    float offsets[R];
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm256_setzero_ps();
      offsets[i] = 0.f;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i xb = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi[c] + b * 16)),
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo[c] + b * 16)));
      for (int i = 0; i < R; ++i) {
        const int64_t row = n + i;
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.nibbles + row * blocks * 16 + b * 16));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);  // [32] 0..15
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xb), _mm256_set1_epi16(1));     // [8] int32
        const float d = _cvtsh_ss(w.d[row * blocks + b]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * dx[c][b]), acc[i]);
        offsets[i] += _cvtsh_ss(w.m[row * blocks + b]) * sx[c][b] + d * ex[c][b];
      }
    }
    for (int i = 0; i < R; ++i) {
      __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
      sum = _mm_hadd_ps(sum, sum);
      sum = _mm_hadd_ps(sum, sum);
      row_out[i] = _mm_cvtss_f32(sum) + offsets[i];
    }
#else
    for (int i = 0; i < R; ++i) {
      const int64_t row = n + i;
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* packed = w.nibbles + row * blocks * 16 + b * 16;
        int32_t dot = 0;
        for (int64_t j = 0; j < 16; ++j) dot += (packed[j] & 0x0f) * lo[c][b * 16 + j] + (packed[j] >> 4) * hi[c][b * 16 + j];
        total += half_to_float(w.d[row * blocks + b]) * dx[c][b] * static_cast<float>(dot) +
                 half_to_float(w.m[row * blocks + b]) * sx[c][b] + half_to_float(w.d[row * blocks + b]) * ex[c][b];
      }
      row_out[i] = total;
    }
#endif
  }
#endif
}

struct Work {
  Weights w;
  const QuantizedRows* x;
  float* y;  // [rows, N], or [rows, N/2] gated
  int64_t rows, n;
  Gate gate;
};

// Rows [tile, tile_end) of W against rows [r, r + C) of x. One row of x (a decode step) takes the rows of W
// one at a time, each over its whole K, so that a task reads its rows as one sequential stream: 4 rows at a
// time were 4 interleaved streams per field, and a 1B model's decode 1.5x slower. Several rows of x take 4
// rows of W at a time, each unpacked block shared by them.
template <int C>
void rows_of_x(const Work& work, int64_t tile, int64_t tile_end, int64_t r, const Out& out) {
  int64_t n = tile;
  if (C > 1) {
    for (; n + 4 <= tile_end; n += 4) dot_rows<4, C>(work.w, n, *work.x, r, out.at(r, n), out.stride);
  }
  for (; n < tile_end; ++n) dot_rows<1, C>(work.w, n, *work.x, r, out.at(r, n), out.stride);
}

// Rows [first, last) of W against every row of x, kRowTile rows of W at a time.
void run_rows(const Work& work, int64_t first, int64_t last, const Out& out) {
  for (int64_t tile = first; tile < last; tile += kRowTile) {
    const int64_t tile_end = std::min(tile + kRowTile, last);
    int64_t r = 0;
#if defined(GRAINS_AVX512)
    for (; r + 4 <= work.rows; r += 4) rows_of_x<4>(work, tile, tile_end, r, out);  // a batch or a prompt: 4 rows of x at a time
#endif
    for (; r + 2 <= work.rows; r += 2) rows_of_x<2>(work, tile, tile_end, r, out);
    for (; r < work.rows; ++r) rows_of_x<1>(work, tile, tile_end, r, out);
  }
}

// Task t: rows [32 t, 32 t + 32) of W against every row of x; gated, those rows of gate and of up, then their
// product.
void run_task(void* data, size_t task) {
  const Work& work = *static_cast<const Work*>(data);
  const int64_t first = static_cast<int64_t>(task) * kRowsPerTask;
  if (work.gate == Gate::kNone) {
    run_rows(work, first, std::min(first + kRowsPerTask, work.n), Out{work.y, work.n, 0});
    return;
  }
  gated_task(work.gate, work.rows, work.n, first, work.y,
             [&](int64_t from, int64_t to, const Out& out) { run_rows(work, from, to, out); });
}

struct Q4_1MatMulKernel {
  Q4_1MatMulKernel(const OrtApi&, const OrtKernelInfo* info) : size_(info), gate_(gate_of(info, size_.n, "Q4_1MatMul")) {}

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue x = context.GetInput(0);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != size_.k || size_.k % kBlock != 0) {
      ORT_CXX_API_THROW("Q4_1MatMul: x's last axis must be K, a multiple of 32", ORT_INVALID_ARGUMENT);
    }
    const size_t blocks = static_cast<size_t>(size_.n * (size_.k / kBlock));
    const Ort::ConstValue nibbles = context.GetInput(1), d = context.GetInput(2), m = context.GetInput(3);
    if (nibbles.GetTensorTypeAndShapeInfo().GetElementCount() != blocks * 16 ||
        d.GetTensorTypeAndShapeInfo().GetElementCount() != blocks ||
        m.GetTensorTypeAndShapeInfo().GetElementCount() != blocks) {
      ORT_CXX_API_THROW("Q4_1MatMul: nibbles, d and m must hold N * K/32 blocks", ORT_INVALID_ARGUMENT);
    }
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    const int64_t columns = output_columns(gate_, size_.n);
    shape.back() = columns;
    Ort::UnownedValue y = context.GetOutput(0, shape);
    if (rows == 0) return;

    const QuantizedRows quantized(context, x.GetTensorData<float>(), rows, size_.k);
    const Weights weights{nibbles.GetTensorData<uint8_t>(), reinterpret_cast<const uint16_t*>(d.GetTensorRawData()),
                          reinterpret_cast<const uint16_t*>(m.GetTensorRawData())};
    Work work{weights, &quantized, y.GetTensorMutableData<float>(), rows, size_.n, gate_};
    context.ParallelFor(run_task, static_cast<size_t>((columns + kRowsPerTask - 1) / kRowsPerTask), 0, &work);
  }

  const LinearSize size_;
  const Gate gate_;
};

struct Q4_1MatMulOp : Ort::CustomOpBase<Q4_1MatMulOp, Q4_1MatMulKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Q4_1MatMulKernel(api, info); }
  const char* GetName() const { return "Q4_1MatMul"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    static const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16};
    return types[index];
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* q4_1_matmul_op() {
  static const Q4_1MatMulOp op;
  return &op;
}
