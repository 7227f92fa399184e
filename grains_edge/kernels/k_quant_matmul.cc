// grains_edge.Q4_0MatMul, Q4_KMatMul, Q5_KMatMul and Q6_KMatMul: y = x @ W^T for W stored as ggml blocks, the
// bytes a GGUF holds; grains_edge.Q4_0Gather, Q4_KGather, Q5_KGather and Q6_KGather: rows of such a W (an
// embedding table, tied to the head or not).
//
//   Q4_0MatMul  inputs  x [..., K] float32; blocks [N, K/32 * 18] uint8 (block_q4_0: float16 d, qs[16]), K a
//                       multiple of 256 (8 blocks are taken as one super-block)
//   Q4_KMatMul  inputs  x [..., K] float32; blocks [N, K/256 * 144] uint8 (block_q4_K: float16 d and dmin,
//                       12 bytes of 6-bit scales and minimums, qs[128])
//   Q5_KMatMul  inputs  x [..., K] float32; blocks [N, K/256 * 176] uint8 (block_q5_K: Q4_K's fields and
//                       qh[32], the fifth bits, before qs[128])
//   Q6_KMatMul  inputs  x [..., K] float32; blocks [N, K/256 * 210] uint8 (block_q6_K: ql[128], qh[64],
//                       int8 scales[16], float16 d)
//               output  y [..., N] float32;  attributes K, N, and optionally activation (silu | gelu_tanh): then
//                       W's rows are gate | up and y [..., N/2] = act(x @ gate^T) * (x @ up^T) (gated_linear.h)
//   {kind}Gather  inputs  blocks [N, K/256 * bytes] uint8 (as the MatMul of that kind takes them); ids [...]
//                 int64;  output  rows [..., K] float32, as gguf-py's dequantization rounds them;  attributes K, N
//
// A super-block holds 256 weights in sub-blocks j with their own scale: Q4_0 8 of 32, w = d_j (q - 8); Q4_K 8
// of 32, w = d sc_j q - dmin m_j (levels 0..15; Q5_K the same with levels 0..31, centred on 16 below where
// Q4_K's are on 8); Q6_K 16 of 16, w = d sc_j (q - 32) (levels 0..63). As in
// Q4_1MatMul, each row of x is first quantized per block of 32 to int8 (xq, dx = max|x_b| / 127, block sums S_b
// kept in float), so
//
//   Q4_0   y[n] = sum_j d_j dx_j ((q_j - 8) . xq_j)
//   Q4_K   y[n] = sum_j d sc_j dx_j ((q_j - 8) . xq_j) + (8 d sc_j - dmin m_j) S_j      (Q5_K: 16 for 8)
//   Q6_K   y[n] = sum_j d sc_j dx_b(j) ((q_j - 32) . xq_j)
//
// centred as in Q4_1MatMul (xq's rounding errors weighed by at most 8 and 32 level steps, not 15 and 63), and
// computed with unsigned levels against signed xq (AVX512-VNNI dpbusd): Q4_0 as d_j dx_j (q_j . xq_j - 8
// sum(xq_j)), Q4_K as d sc_j (dx_j (q_j . xq_j) + 8 (S_j - dx_j sum(xq_j))) - dmin m_j S_j, Q6_K as d sc_j dx_b(j)
// (q_j . xq_j - 32 sum(xq_j)). A super-block's levels unpack into four 64-byte vectors in the format's own order
// (Q6_K: elements in order; Q4_K and Q5_K: sub-blocks 0,2 | 1,3 | 4,6 | 5,7, the low and high nibbles of their
// 32-byte runs, Q5_K's fifth bits added;
// Q4_0: the low then high nibbles of blocks 0-3, then of 4-7), so x is quantized into that order once per call.
// The bytes are read as the GGUF stores them, one memory stream per row of W: 4.5, 4.5, 5.5 and 6.56 bits per
// weight, where ONNX Runtime's MatMulNBits needs 5 (float32 scales), 5 (Q4_K's d sc_j and dmin m_j as Q4_1
// fields, rounded to float16), 10 (Q5_K widened to 8-bit levels, its offsets folded in) and 10.
//
// Sources: ggml's block_q4_0, block_q4_K, block_q5_K and block_q6_K layouts (ggml-common.h), dequantize_row_q4_0
// / _q4_K / _q5_K / _q6_K and get_scale_min_k4 (ggml-quants.c); ONNX Runtime's custom-op C++ API (onnxruntime_cxx_api.h,
// CustomOpBase). Registered by register.cc.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "block_quantize.h"
#include "cpu.h"
#include "gated_linear.h"
#include "linear_size.h"
#include "row_prefetch.h"
#include "vector_math.h"

namespace {

constexpr int64_t kSuper = 256;       // weights per super-block
constexpr int64_t kRowsPerTask = 32;  // rows of W per parallel task
static_assert(kRowsPerTask == kGateColumns, "a gated task's gate and up rows are its own output columns");
// rows of W kept hot while every row of x passes over them: all of a task's (8, a quarter, read each row of x
// four times per task, and a 1B model's 512-token prompt took 5 % longer)
constexpr int64_t kRowTile = 32;
constexpr int64_t kUnpackOnce = 8;    // rows of x from which a task unpacks each tile of W once

uint16_t load_u16(const uint8_t* bytes) {
  uint16_t half;
  std::memcpy(&half, bytes, 2);
  return half;
}

float half_at(const uint8_t* bytes) { return half_to_float(load_u16(bytes)); }

uint32_t load_u32(const uint8_t* bytes) {
  uint32_t word;
  std::memcpy(&word, bytes, 4);
  return word;
}

// --- the formats: where each element's level lies, the sub-block scales, the per-sub-block terms -------

struct Q6_K {
  static constexpr int64_t kBytes = 210;
  static constexpr const char* kName = "Q6_KMatMul";
  static constexpr const char* kGather = "Q6_KGather";
  static constexpr bool kPaired = false;  // each vector's sub-blocks are its own (16 elements: 4 lanes)

  // Half h (16 elements) of block b (32) of a super-block: where it lies in the unpacked vectors (in order).
  static int place(int b, int h) { return 32 * b + 16 * h; }

  // The six-bit level of element e, as dequantize_row_q6_K reads it.
  static int level(const uint8_t* block, int e) {
    const int half = e / 128, k = (e % 128) / 32, l = e % 32;
    const uint8_t low = block[64 * half + l + 32 * (k & 1)], high = block[128 + 32 * half + l];
    return ((k < 2 ? low & 15 : low >> 4) | (((high >> (2 * k)) & 3) << 4));
  }

  // The 256 weights of a super-block, d sc_j (q - 32).
  static void dequantize(const uint8_t* block, float* out) {
    const float d = half_at(block + 208);
    for (int e = 0; e < kSuper; ++e) {
      out[e] = d * static_cast<float>(static_cast<int8_t>(block[192 + e / 16])) * static_cast<float>(level(block, e) - 32);
    }
  }

  // Per sub-block j: the scale of x over it (that of its block of 32), and the term of x added with weight
  // d sc_j, -32 dx_b sum(xq_j); from each block's scale dx, float sum S and the sums of its halves' levels.
  static void sub_blocks(const float* dx, const float*, const int32_t (*levels)[2], float* scales, float* terms) {
    for (int j = 0; j < 16; ++j) {
      scales[j] = dx[j / 2];
      terms[j] = -32.f * dx[j / 2] * static_cast<float>(levels[j / 2][j % 2]);
    }
  }

  // One super-block's share of y, one element at a time: the vector path's arithmetic in plain C++ (x's
  // levels `xq` in the format's order, its scale and terms per sub-block).
  static float plain(const uint8_t* block, const int8_t* xq, const float* scales, const float* terms) {
    const float d = half_at(block + 208);
    float total = 0.f;
    for (int j = 0; j < 16; ++j) {
      int32_t dot = 0;
      for (int e = 16 * j; e < 16 * j + 16; ++e) dot += level(block, e) * xq[e];  // in order: place(e) = e
      const float scale = d * static_cast<float>(static_cast<int8_t>(block[192 + j]));
      total += scale * (scales[j] * static_cast<float>(dot) + terms[j]);
    }
    return total;
  }
};

// Q4_K and Q5_K: 8 sub-blocks of 32, w = d sc_j q - dmin m_j with 6-bit scales and minimums (ggml's
// get_scale_min_k4) in the same 12 bytes after d and dmin; `Self` gives the levels (Self::level, 4 or 5 bits)
// and the level they are centred on (Self::kCentre).
template <class Self>
struct AffineK {
  static constexpr bool kPaired = true;  // vectors 2p and 2p + 1 hold the same sub-blocks in the same lanes

  // Vectors 0, 1: elements 0-15, 16-31 of sub-blocks 0, 2, 1, 3 (a 16-byte lane each); vectors 2, 3: of 4, 6, 5, 7.
  static int place(int b, int h) {
    static constexpr int kLane[4] = {0, 2, 1, 3};
    return 64 * (2 * (b / 4) + h) + 16 * kLane[b % 4];
  }

  // The 6-bit scale and minimum of sub-block j (ggml's get_scale_min_k4).
  static void scale_min(const uint8_t* packed, int j, int* scale, int* minimum) {
    if (j < 4) {
      *scale = packed[j] & 63;
      *minimum = packed[j + 4] & 63;
    } else {
      *scale = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
      *minimum = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
  }

  // The 256 weights of a super-block, (d sc_j) q - (dmin m_j), the product rounded before the subtraction as
  // numpy rounds it (volatile: a fused multiply-add would round once and differ from gguf-py in the last bit).
  static void dequantize(const uint8_t* block, float* out) {
    const float d = half_at(block), dmin = half_at(block + 2);
    for (int j = 0; j < 8; ++j) {
      int scale, minimum;
      scale_min(block + 4, j, &scale, &minimum);
      const float step = d * static_cast<float>(scale), offset = dmin * static_cast<float>(minimum);
      for (int e = 32 * j; e < 32 * j + 32; ++e) {
        volatile float product = step * static_cast<float>(Self::level(block, e));
        out[e] = product - offset;
      }
    }
  }

  // Per sub-block j (lanes 0..7): the scale dx_j and the rounding term c (S_j - dx_j sum(xq_j)), c the centre,
  // for the weight d sc_j; in lanes 8..15 of the terms, the block sums S_j, for the weights -dmin m_j.
  static void sub_blocks(const float* dx, const float* sums, const int32_t (*levels)[2], float* scales, float* terms) {
    for (int j = 0; j < 8; ++j) {
      scales[j] = dx[j];
      terms[j] = Self::kCentre * (sums[j] - dx[j] * static_cast<float>(levels[j][0] + levels[j][1]));
      terms[8 + j] = sums[j];
    }
  }

  static float plain(const uint8_t* block, const int8_t* xq, const float* scales, const float* terms) {
    const float d = half_at(block), dmin = half_at(block + 2);
    float total = 0.f;
    for (int j = 0; j < 8; ++j) {
      int scale, minimum;
      scale_min(block + 4, j, &scale, &minimum);
      int32_t dot = 0;
      for (int e = 32 * j; e < 32 * j + 32; ++e) dot += Self::level(block, e) * xq[place(j, e % 32 / 16) + e % 16];
      total += d * static_cast<float>(scale) * (scales[j] * static_cast<float>(dot) + terms[j]) -
               dmin * static_cast<float>(minimum) * terms[8 + j];
    }
    return total;
  }
};

// 144 bytes: d, dmin, 12 bytes of scales, 128 of nibbles (per 64 weights 32 bytes: sub-block 2p in the low
// nibbles, 2p + 1 in the high ones).
struct Q4_K : AffineK<Q4_K> {
  static constexpr int64_t kBytes = 144;
  static constexpr const char* kName = "Q4_KMatMul";
  static constexpr const char* kGather = "Q4_KGather";
  static constexpr float kCentre = 8.f;

  static int level(const uint8_t* block, int e) {
    const uint8_t byte = block[16 + 32 * (e / 64) + e % 32];
    return (e % 64) < 32 ? byte & 15 : byte >> 4;
  }
};

// 176 bytes: Q4_K's fields, 32 bytes of fifth bits (bit j of byte l: element l of sub-block j), then the 128
// bytes of nibbles as Q4_K's; levels 0..31.
struct Q5_K : AffineK<Q5_K> {
  static constexpr int64_t kBytes = 176;
  static constexpr const char* kName = "Q5_KMatMul";
  static constexpr const char* kGather = "Q5_KGather";
  static constexpr float kCentre = 16.f;

  static int level(const uint8_t* block, int e) {
    const int p = e / 64, l = e % 32, high = (e % 64) >= 32;
    const uint8_t byte = block[48 + 32 * p + l];
    return (high ? byte >> 4 : byte & 15) | (((block[16 + l] >> (2 * p + high)) & 1) << 4);
  }
};

// Q4_0 has blocks of 32, not super-blocks: 8 of them (144 bytes, 256 weights) are taken as one.
struct Q4_0 {
  static constexpr int64_t kBytes = 144;
  static constexpr const char* kName = "Q4_0MatMul";
  static constexpr const char* kGather = "Q4_0Gather";
  static constexpr bool kPaired = true;  // vectors 2p and 2p + 1: the low and high halves of the same blocks

  static int place(int b, int h) {  // vectors 0..3: the low halves of blocks 0-3, their high halves, then 4-7
    return 64 * (2 * (b / 4) + h) + 16 * (b % 4);
  }

  static int level(const uint8_t* block, int e) {
    const uint8_t byte = block[18 * (e / 32) + 2 + e % 16];
    return (e % 32) < 16 ? byte & 15 : byte >> 4;
  }

  // The 256 weights of 8 blocks, d_j (q - 8).
  static void dequantize(const uint8_t* block, float* out) {
    for (int e = 0; e < kSuper; ++e) out[e] = half_at(block + 18 * (e / 32)) * static_cast<float>(level(block, e) - 8);
  }

  // Per block j (lanes 0..7): the scale dx_j and the term -8 dx_j sum(xq_j), for the weight d_j.
  static void sub_blocks(const float* dx, const float*, const int32_t (*levels)[2], float* scales, float* terms) {
    for (int j = 0; j < 8; ++j) {
      scales[j] = dx[j];
      terms[j] = -8.f * dx[j] * static_cast<float>(levels[j][0] + levels[j][1]);
    }
  }

  static float plain(const uint8_t* block, const int8_t* xq, const float* scales, const float* terms) {
    float total = 0.f;
    for (int j = 0; j < 8; ++j) {
      int32_t dot = 0;
      for (int e = 32 * j; e < 32 * j + 32; ++e) dot += level(block, e) * xq[place(j, e % 32 / 16) + e % 16];
      total += half_at(block + 18 * j) * (scales[j] * static_cast<float>(dot) + terms[j]);
    }
    return total;
  }
};

// Rows of x [K] quantized per block of 32. Per super-block: the levels in the format's vector order (each
// half block where `place` puts it), and per sub-block the scale of x over it and the format's terms.
template <class F>
struct QuantizedRows {
  int64_t supers;
  std::vector<int8_t> ordered;  // [rows, K]
  std::vector<float> scales;    // [rows, supers, 16], of x over each sub-block
  std::vector<float> terms;     // [rows, supers, 16]

  QuantizedRows(Ort::KernelContext& context, const float* x, int64_t rows, int64_t k)
      : supers(k / kSuper), ordered(rows * k), scales(rows * supers * 16, 0.f), terms(rows * supers * 16, 0.f) {
    for_each_row(context, rows, [&](int64_t r) {
      for (int64_t s = 0; s < supers; ++s) {
        const int64_t at = r * k + s * kSuper, super = r * supers + s;
        float dx[8], sums[8];
        int32_t levels[8][2];  // per block, the sums of its two halves' levels
        for (int b = 0; b < 8; ++b) {
          int8_t* into = ordered.data() + at;
          const QuantizedBlock block = quantize_block(x + at + 32 * b, into + F::place(b, 0), into + F::place(b, 1));
          dx[b] = block.scale;
          sums[b] = block.sum;
          levels[b][0] = block.levels[0];
          levels[b][1] = block.levels[1];
        }
        F::sub_blocks(dx, sums, levels, scales.data() + super * 16, terms.data() + super * 16);
      }
    });
  }
};

#if defined(GRAINS_AVX512)
// One super-block of W unpacked: its levels as four 64-byte vectors in the format's order, and the scale of
// each sub-block (as 16 float lanes, indexed by `spread` per vector), which are also the weights of x's 16
// terms (Q4_K: -dmin m_j in lanes 8..15, for the block sums). The unpacking is forced inline: called, it kept
// these in memory and cleared the upper registers every step.
struct Unpacked {
  __m512i q[4];
  __m512 scales;  // Q4_0: d_j; Q4_K: d sc_j, then -dmin m_j; Q6_K: d sc_j
};

[[gnu::always_inline]] inline void unpack(const Q6_K&, const uint8_t* block, Unpacked* u) {
  const __m512i nibble = _mm512_set1_epi8(0x0f), pair = _mm512_set1_epi8(0x30);
  // the high bit pairs of elements 0..63 and 64..127 of a half: (qh << 4, qh << 2) and (qh, qh >> 2) & 0x30
  const __m512i up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i down = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  u->scales = _mm512_mul_ps(  // d sc_j [16]
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)))),
      _mm512_set1_ps(half_at(block + 208)));
  for (int h = 0; h < 2; ++h) {
    const __m512i low = _mm512_loadu_si512(block + 64 * h);
    const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h)));
    u->q[2 * h] = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(_mm512_sllv_epi16(high, up), pair));
    u->q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble),
                                      _mm512_and_si512(_mm512_srlv_epi16(high, down), pair));
  }
}

// The scales of a Q4_K / Q5_K super-block: d sc_j in lanes 0..7, -dmin m_j in 8..15.
[[gnu::always_inline]] inline void unpack_k_scales(const uint8_t* block, Unpacked* u) {
  // ggml's 12-byte packing of 8 scales and 8 minimums of 6 bits (words w0 w1 w2) -> 16 bytes: scales 0-3
  // (w0 & 63s), 4-7 (w2's low nibbles | w0's top bit pairs << 4), minimums 0-3 (w1 & 63s), 4-7 (w2's high
  // nibbles | w1's top bit pairs << 4), in vector registers (get_scale_min_k4 for all 8 at once)
  const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));  // w0 w1 w2 and the 4 bytes after them
  const __m128i first = _mm_shuffle_epi32(words, _MM_SHUFFLE(1, 1, 0, 0)), third = _mm_shuffle_epi32(words, _MM_SHUFFLE(2, 2, 2, 2));
  const __m128i low = _mm_and_si128(first, _mm_set1_epi8(63));
  const __m128i nibbles = _mm_and_si128(_mm_srlv_epi32(third, _mm_set_epi32(4, 4, 0, 0)), _mm_set1_epi8(15));
  const __m128i tops = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(first, 6), _mm_set1_epi8(3)), 4);
  const __m128i bytes = _mm_blend_epi32(low, _mm_or_si128(nibbles, tops), 0b1010);
  const __m512 both = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));  // scales 0..7, then minimums 0..7
  const __m128 halves = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(block))));  // d, dmin
  const __m512 weights = _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                               _mm512_castps128_ps512(halves));
  const __m512 scaled = _mm512_mul_ps(both, weights);
  u->scales = _mm512_mask_sub_ps(scaled, 0xff00, _mm512_setzero_ps(), scaled);  // d sc_j in lanes 0..7, -dmin m_j in 8..15
}

// Q4_K / Q5_K levels of 64 bytes of nibbles, low and high (sub-blocks 4h and 4h + 2, 4h + 1 and 4h + 3, a 32-byte
// half each), regrouped by 16-byte lanes into vectors 2h and 2h + 1 (`AffineK::place`).
[[gnu::always_inline]] inline void regroup_k(__m512i low, __m512i high, int h, Unpacked* u) {
  u->q[2 * h] = _mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(2, 0, 2, 0));      // their elements 0-15
  u->q[2 * h + 1] = _mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(3, 1, 3, 1));  // their elements 16-31
}

[[gnu::always_inline]] inline void unpack(const Q4_K&, const uint8_t* block, Unpacked* u) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  unpack_k_scales(block, u);
  for (int h = 0; h < 2; ++h) {  // runs 2h and 2h + 1 of 32 bytes
    const __m512i packed_levels = _mm512_loadu_si512(block + 16 + 64 * h);
    regroup_k(_mm512_and_si512(packed_levels, nibble), _mm512_and_si512(_mm512_srli_epi16(packed_levels, 4), nibble), h, u);
  }
}

// The fifth bits of 64 levels as 16s: bit `first` of each of the 32 bytes of `bits` (broadcast to both halves)
// for the low half, bit `second` for the high half.
[[gnu::always_inline]] inline __m512i fifth_bits(__m512i bits, int first, int second) {
  const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(first)), _mm256_set1_epi16(static_cast<int16_t>(second)), 1);
  return _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(bits, shifts), _mm512_set1_epi8(1)), 4);
}

[[gnu::always_inline]] inline void unpack(const Q5_K&, const uint8_t* block, Unpacked* u) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  unpack_k_scales(block, u);
  const __m512i bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16)));
  for (int h = 0; h < 2; ++h) {  // runs 2h and 2h + 1: sub-blocks 4h (bit 4h), 4h + 2 low; 4h + 1, 4h + 3 high
    const __m512i packed_levels = _mm512_loadu_si512(block + 48 + 64 * h);
    const __m512i low = _mm512_or_si512(_mm512_and_si512(packed_levels, nibble), fifth_bits(bits, 4 * h, 4 * h + 2));
    const __m512i high = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(packed_levels, 4), nibble),
                                         fifth_bits(bits, 4 * h + 1, 4 * h + 3));
    regroup_k(low, high, h, u);
  }
}

[[gnu::always_inline]] inline void unpack(const Q4_0&, const uint8_t* block, Unpacked* u) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m128i halves = _mm_set_epi16(  // d of blocks 7..0
      static_cast<int16_t>(load_u16(block + 126)), static_cast<int16_t>(load_u16(block + 108)),
      static_cast<int16_t>(load_u16(block + 90)), static_cast<int16_t>(load_u16(block + 72)),
      static_cast<int16_t>(load_u16(block + 54)), static_cast<int16_t>(load_u16(block + 36)),
      static_cast<int16_t>(load_u16(block + 18)), static_cast<int16_t>(load_u16(block)));
  u->scales = _mm512_zextps256_ps512(_mm256_cvtph_ps(halves));  // d_j in lanes 0..7
  for (int four = 0; four < 2; ++four) {  // blocks 4 four..4 four + 3: 16 bytes of levels each
    const uint8_t* first = block + 72 * four + 2;
    __m512i levels = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(first)));
    levels = _mm512_inserti32x4(levels, _mm_loadu_si128(reinterpret_cast<const __m128i*>(first + 18)), 1);
    levels = _mm512_inserti32x4(levels, _mm_loadu_si128(reinterpret_cast<const __m128i*>(first + 36)), 2);
    levels = _mm512_inserti32x4(levels, _mm_loadu_si128(reinterpret_cast<const __m128i*>(first + 54)), 3);
    u->q[2 * four] = _mm512_and_si512(levels, nibble);
    u->q[2 * four + 1] = _mm512_and_si512(_mm512_srli_epi16(levels, 4), nibble);
  }
}

// For vector g, the lane -> sub-block scale index of `Unpacked::scales`.
__m512i spread(const Q6_K&, int g) {  // sub-blocks of 16: lanes 4j'..4j'+3 -> 4 g + j'
  return _mm512_add_epi32(_mm512_set1_epi32(4 * g),
                          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
}

__m512i spread(const Q4_0&, int g) {  // vectors 0, 1 hold blocks 0-3, vectors 2, 3 blocks 4-7, 4 lanes each
  return _mm512_add_epi32(_mm512_set1_epi32(4 * (g / 2)),
                          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
}

__m512i spread(const Q4_K&, int g) {  // vectors 2p, 2p + 1: sub-blocks 4p + 0, 2, 1, 3, 4 lanes each
  return _mm512_add_epi32(_mm512_set1_epi32(4 * (g / 2)),
                          _mm512_set_epi32(3, 3, 3, 3, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0));
}

__m512i spread(const Q5_K&, int g) { return spread(Q4_K{}, g); }  // the same order
#endif

#if !defined(GRAINS_AVX512)
struct Unpacked {};  // the plain path reads the bytes themselves
#endif

// out[c * stride + i] = row n + i of W against row r + c of x, for R rows of W and C rows of x: R x C
// accumulators; the rows of x share each unpacked super-block of W, read from `unpacked` (rows n.., their
// super-blocks in order) when the task unpacked its tile once for many rows of x, else from the bytes.
template <class F, int R, int C>
void dot_rows(const uint8_t* w, int64_t n, const Unpacked* unpacked, const QuantizedRows<F>& x, int64_t r, float* out,
              int64_t stride) {
  const int64_t supers = x.supers, row_bytes = supers * F::kBytes;
#if defined(GRAINS_AVX512)
  const bool long_row = R == 1 && supers * kSuper > kLongRowWeights;
  const F format{};
  const __m512i lanes[4] = {spread(format, 0), spread(format, 1), spread(format, 2), spread(format, 3)};
  // one row of W against one of x: a sum per product, so that the multiply-adds of a super-block do not wait
  // on each other (one chain of 5 was the decode step's limit); more rows have R x C chains already
  constexpr int P = R * C == 1 ? 4 : 1;
  __m512 acc[R][C][P];
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) {
      for (int p = 0; p < P; ++p) acc[i][c][p] = _mm512_setzero_ps();
    }
  }
  for (int64_t s = 0; s < supers; ++s) {
    // unrolled, so that acc[i][c] are registers
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      Unpacked u;
      if (unpacked != nullptr) {
        u = unpacked[i * supers + s];
      } else {
        const uint8_t* block = w + (n + i) * row_bytes + s * F::kBytes;
        prefetch_ahead(block, F::kBytes, row_bytes, long_row);  // the same super-block a few rows on
        unpack(format, block, &u);
      }
      for (int c = 0; c < C; ++c) {
        const int64_t super = (r + c) * supers + s;
        const int8_t* xq = x.ordered.data() + super * kSuper;
        const __m512 scales = _mm512_mul_ps(u.scales, _mm512_loadu_ps(x.scales.data() + super * 16));  // per sub-block
        acc[i][c][0] = _mm512_fmadd_ps(u.scales, _mm512_loadu_ps(x.terms.data() + super * 16), acc[i][c][0]);
        constexpr int kStep = F::kPaired ? 2 : 1;  // vectors summed in int32 before their one conversion
        for (int g = 0; g < 4; g += kStep) {
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u.q[g], _mm512_loadu_si512(xq + 64 * g));
          if (F::kPaired) dot = _mm512_dpbusd_epi32(dot, u.q[g + 1], _mm512_loadu_si512(xq + 64 * (g + 1)));
          const __m512 scale = _mm512_permutexvar_ps(lanes[g], scales);
          acc[i][c][g % P] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][c][g % P]);
        }
      }
    }
  }
  if constexpr (R * C == 16) {  // lane 4c + i of one vector of sums: out[c * stride + i], 4 at a time
    __m512 sums[16];
    for (int c = 0; c < C; ++c) {
      for (int i = 0; i < R; ++i) sums[4 * c + i] = acc[i][c][0];
    }
    store_sums_4x4(sums, out, stride);
  } else {
    for (int i = 0; i < R; ++i) {
      for (int c = 0; c < C; ++c) {
        for (int p = 1; p < P; ++p) acc[i][c][0] = _mm512_add_ps(acc[i][c][0], acc[i][c][p]);
        out[c * stride + i] = _mm512_reduce_add_ps(acc[i][c][0]);
      }
    }
  }
#else
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) {
      float total = 0.f;
      for (int64_t s = 0; s < supers; ++s) {
        const int64_t super = (r + c) * supers + s;
        total += F::plain(w + (n + i) * row_bytes + s * F::kBytes, x.ordered.data() + super * kSuper,
                          x.scales.data() + super * 16, x.terms.data() + super * 16);
      }
      out[c * stride + i] = total;
    }
  }
#endif
}

template <class F>
struct Work {
  const uint8_t* w;
  const QuantizedRows<F>* x;
  float* y;  // [rows, N], or [rows, N/2] gated
  int64_t rows, n;
  Gate gate;
};

// Rows [tile, tile_end) of W against rows [r, r + C) of x. One row of x (a decode step) takes the rows of W
// one at a time, each over its whole K, so that a task reads its rows as one sequential stream (as in
// q4_1_matmul.cc); several rows of x take 4 rows of W at a time, each unpacked super-block shared by them.
template <class F, int C>
void rows_of_x(const Work<F>& work, int64_t tile, int64_t tile_end, int64_t r, const Unpacked* unpacked, const Out& out) {
  const int64_t supers = work.x->supers;
  auto rows_from = [&](int64_t n) { return unpacked == nullptr ? nullptr : unpacked + (n - tile) * supers; };
  int64_t n = tile;
  if (C > 1) {
    for (; n + 4 <= tile_end; n += 4) dot_rows<F, 4, C>(work.w, n, rows_from(n), *work.x, r, out.at(r, n), out.stride);
  }
  for (; n < tile_end; ++n) dot_rows<F, 1, C>(work.w, n, rows_from(n), *work.x, r, out.at(r, n), out.stride);
}

// Rows [first, last) of W against every row of x, kRowTile rows of W at a time. For a prompt (at least
// kUnpackOnce rows of x) each tile is unpacked once into `buffer`, not once per 4 rows of x.
template <class F>
void run_rows(const Work<F>& work, int64_t first, int64_t last, std::vector<Unpacked>& buffer, const Out& out) {
  const int64_t supers = work.x->supers;
  for (int64_t tile = first; tile < last; tile += kRowTile) {
    const int64_t tile_end = std::min(tile + kRowTile, last);
#if defined(GRAINS_AVX512)
    for (int64_t n = tile; !buffer.empty() && n < tile_end; ++n) {
      for (int64_t s = 0; s < supers; ++s) {
        unpack(F{}, work.w + (n * supers + s) * F::kBytes, &buffer[(n - tile) * supers + s]);
      }
    }
#endif
    const Unpacked* unpacked = buffer.empty() ? nullptr : buffer.data();
    int64_t r = 0;
    for (; r + 4 <= work.rows; r += 4) rows_of_x<F, 4>(work, tile, tile_end, r, unpacked, out);
    for (; r < work.rows; ++r) rows_of_x<F, 1>(work, tile, tile_end, r, unpacked, out);
  }
}

// Task t: rows [32 t, 32 t + 32) of W against every row of x; gated, those rows of gate and of up, then their
// product.
template <class F>
void run_task(void* data, size_t task) {
  const Work<F>& work = *static_cast<const Work<F>*>(data);
  const int64_t first = static_cast<int64_t>(task) * kRowsPerTask;
  std::vector<Unpacked> buffer;
#if defined(GRAINS_AVX512)
  if (work.rows >= kUnpackOnce) buffer.resize(kRowTile * work.x->supers);
#endif
  if (work.gate == Gate::kNone) {
    run_rows(work, first, std::min(first + kRowsPerTask, work.n), buffer, Out{work.y, work.n, 0});
    return;
  }
  gated_task(work.gate, work.rows, work.n, first, work.y,
             [&](int64_t from, int64_t to, const Out& out) { run_rows(work, from, to, buffer, out); });
}

void check_blocks(const Ort::ConstValue& blocks, int64_t k, int64_t n, int64_t bytes, const std::string& op) {
  if (k % kSuper != 0 || blocks.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n * (k / kSuper) * bytes)) {
    ORT_CXX_API_THROW(op + ": K must be a multiple of 256 and blocks hold N * K/256 super-blocks", ORT_INVALID_ARGUMENT);
  }
}

template <class F>
struct MatMulKernel {
  MatMulKernel(const OrtApi&, const OrtKernelInfo* info) : size_(info), gate_(gate_of(info, size_.n, F::kName)) {}

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue x = context.GetInput(0), blocks = context.GetInput(1);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != size_.k) {
      ORT_CXX_API_THROW(std::string(F::kName) + ": x's last axis must be K", ORT_INVALID_ARGUMENT);
    }
    check_blocks(blocks, size_.k, size_.n, F::kBytes, F::kName);
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    const int64_t columns = output_columns(gate_, size_.n);
    shape.back() = columns;
    Ort::UnownedValue y = context.GetOutput(0, shape);
    if (rows == 0) return;
    const QuantizedRows<F> quantized(context, x.GetTensorData<float>(), rows, size_.k);
    Work<F> work{blocks.GetTensorData<uint8_t>(), &quantized, y.GetTensorMutableData<float>(), rows, size_.n, gate_};
    context.ParallelFor(run_task<F>, static_cast<size_t>((columns + kRowsPerTask - 1) / kRowsPerTask), 0, &work);
  }

  const LinearSize size_;
  const Gate gate_;
};

template <class F>
struct GatherKernel {
  GatherKernel(const OrtApi&, const OrtKernelInfo* info) : size_(info) {}

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue blocks = context.GetInput(0), ids = context.GetInput(1);
    check_blocks(blocks, size_.k, size_.n, F::kBytes, F::kGather);
    std::vector<int64_t> shape = ids.GetTensorTypeAndShapeInfo().GetShape();
    const size_t count = ids.GetTensorTypeAndShapeInfo().GetElementCount();
    shape.push_back(size_.k);
    float* out = context.GetOutput(0, shape).GetTensorMutableData<float>();
    const int64_t* id = ids.GetTensorData<int64_t>();
    const uint8_t* table = blocks.GetTensorData<uint8_t>();
    const int64_t supers = size_.k / kSuper;
    for (size_t t = 0; t < count; ++t) {
      if (id[t] < 0 || id[t] >= size_.n) {
        ORT_CXX_API_THROW(std::string(F::kGather) + ": an id is outside the table", ORT_INVALID_ARGUMENT);
      }
      for (int64_t s = 0; s < supers; ++s) F::dequantize(table + (id[t] * supers + s) * F::kBytes, out + t * size_.k + s * kSuper);
    }
  }

  const LinearSize size_;
};

template <class F>
struct MatMulOp : Ort::CustomOpBase<MatMulOp<F>, MatMulKernel<F>> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new MatMulKernel<F>(api, info); }
  const char* GetName() const { return F::kName; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

template <class F>
struct GatherOp : Ort::CustomOpBase<GatherOp<F>, GatherKernel<F>> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new GatherKernel<F>(api, info); }
  const char* GetName() const { return F::kGather; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* q4_0_matmul_op() {
  static const MatMulOp<Q4_0> op;
  return &op;
}

const OrtCustomOp* q4_k_matmul_op() {
  static const MatMulOp<Q4_K> op;
  return &op;
}

const OrtCustomOp* q6_k_matmul_op() {
  static const MatMulOp<Q6_K> op;
  return &op;
}

const OrtCustomOp* q4_0_gather_op() {
  static const GatherOp<Q4_0> op;
  return &op;
}

const OrtCustomOp* q5_k_matmul_op() {
  static const MatMulOp<Q5_K> op;
  return &op;
}

const OrtCustomOp* q5_k_gather_op() {
  static const GatherOp<Q5_K> op;
  return &op;
}

const OrtCustomOp* q4_k_gather_op() {
  static const GatherOp<Q4_K> op;
  return &op;
}

const OrtCustomOp* q6_k_gather_op() {
  static const GatherOp<Q6_K> op;
  return &op;
}
