// grains_edge.CachedAttention: com.microsoft.GroupQueryAttention's contract, with kernels of its own for the
// steps into a KV cache held in place: a decode step, one token per row (the engine's and the server's), and a
// prompt step (prompt_attention.h) whose rows all have the same length or are first prompts right-padded to the
// longest (the server's newcomers); every other step (a padded prompt continuing a cache, a cache that is not
// in place, attributes it does not take) runs ONNX Runtime's own GroupQueryAttention, created inside this kernel.
//
//   inputs   query [b, s, H d] (or q|k|v packed [b, s, (H + 2 KV) d] with key and value absent), key and
//            value [b, s, KV d], past_key and past_value [b, KV, capacity, d] (the same buffers as the
//            present outputs), seqlens_k [b] int32 (row i's tokens - 1), total_sequence_length [] int32,
//            cos_cache and sin_cache [positions, d / 2] (rotary embedding, optional)
//   outputs  output [b, s, H d]; present_key, present_value [b, KV, capacity, d]
//   attrs    num_heads, kv_num_heads, scale (0: 1/sqrt(d)), do_rotary, local_window_size (-1: none); the
//            own kernels take rotary_interleaved 0 and softcap 0 only
//
// Decoding, row i's new token sits at position p = seqlens_k[i]: its key (rotated at p) and value are written at
// p in the cache, and each query head attends to the keys [max(0, p - window + 1), p] of its KV head (the last
// `window`, as GroupQueryAttention's local window and a Hugging Face sliding window). The KV heads of all rows
// are split across the session's threads; each reads its keys and values once for the H / KV query heads that
// share them, where ONNX Runtime's kernel makes one matrix product per query head.
//
// Sources: ONNX Runtime's contrib op docs (GroupQueryAttention) and custom-op C++ API (Ort::Op, which creates
// and invokes its own kernels); rotary embedding: Su et al. 2021, the rotate-half form of GPT-NeoX / Llama.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_math.h"
#include "cpu.h"
#include "prompt_attention.h"
#include "vector_math.h"

namespace {

#if defined(GRAINS_AVX512)
constexpr bool kOwnPrompt = true;  // prompt_attention.h
#else
constexpr bool kOwnPrompt = false;
#endif

// dot(a, b) over d floats (d a multiple of 16 on the vector path).
float dot(const float* a, const float* b, int64_t d) {
#if defined(GRAINS_AVX512)
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), sum);
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t i = 0; i < d; ++i) sum += a[i] * b[i];
  return sum;
#endif
}

// scores [heads, length] = queries [heads, d] . keys [length, d]^T: 16 keys at a time, read from L1 by every
// head, their 16 products summed across lanes together.
void scores_of(const float* queries, int64_t heads, const float* keys, int64_t length, int64_t d, float* scores) {
  int64_t t = 0;
#if defined(GRAINS_AVX512)
  for (; t + 16 <= length; t += 16) {
    for (int64_t j = 0; j < heads; ++j) {
      __m512 products[16];
      for (__m512& product : products) product = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {  // 16 lanes of the head's query against the same lanes of 16 keys
        const __m512 q = _mm512_loadu_ps(queries + j * d + i);
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) products[u] = _mm512_fmadd_ps(q, _mm512_loadu_ps(keys + (t + u) * d + i), products[u]);
      }
      _mm512_storeu_ps(scores + j * length + t, sums_of_16(products));
    }
  }
#endif
  for (; t < length; ++t) {
    for (int64_t j = 0; j < heads; ++j) scores[j * length + t] = dot(queries + j * d, keys + t * d, d);
  }
}

// out [heads, d] = weights [heads, length] . values [length, d] / totals [heads]: each value read once for up
// to 4 heads.
void weigh_values(const float* weights, const float* totals, int64_t heads, const float* values, int64_t length,
                  int64_t d, float* out) {
  std::fill(out, out + heads * d, 0.f);
#if defined(GRAINS_AVX512)
  const float keep[4] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t first = 0; first < heads; first += 4) {
    const int64_t some = std::min<int64_t>(4, heads - first);
    add_weighted_values(out + first * d, some, keep, weights + first * length, length, values, length, d);
  }
#else
  for (int64_t j = 0; j < heads; ++j) {
    for (int64_t t = 0; t < length; ++t) {
      for (int64_t i = 0; i < d; ++i) out[j * d + i] += weights[j * length + t] * values[t * d + i];
    }
  }
#endif
  for (int64_t j = 0; j < heads; ++j) {
    for (int64_t i = 0; i < d; ++i) out[j * d + i] /= totals[j];
  }
}

// scores[0 : length] -> e^(score - max), in place; returns their sum.
float exponentials(float* scores, int64_t length) {
  const float top = *std::max_element(scores, scores + length);
  float total = 0.f;
  int64_t t = 0;
#if defined(GRAINS_AVX512)
  __m512 sums = _mm512_setzero_ps();
  for (; t + 16 <= length; t += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + t, e);
    sums = _mm512_add_ps(sums, e);
  }
  total = _mm512_reduce_add_ps(sums);
#endif
  for (; t < length; ++t) {
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  return total;
}

// Task: row `task / kv_heads`, KV head `task % kv_heads`: append its key and value, then attend for its query
// heads together (queries scaled in advance), each block of keys and each value read once for all of them.
void attend(void* data, size_t task) {
  const AttentionStep& st = *static_cast<const AttentionStep*>(data);
  const int64_t b = static_cast<int64_t>(task) / st.kv_heads, g = static_cast<int64_t>(task) % st.kv_heads;
  const int64_t p = st.seqlens[b], d = st.d, group = st.heads / st.kv_heads;
  const int64_t start = first_key(p, st.window), length = p + 1 - start;
  float* keys = st.keys + ((b * st.kv_heads + g) * st.capacity) * d;
  float* values = st.values + ((b * st.kv_heads + g) * st.capacity) * d;
  const float *k = st.k + b * st.kv_row + g * d, *v = st.v + b * st.kv_row + g * d;
  at_position(st, k, p, keys + p * d);
  std::copy(v, v + d, values + p * d);
  std::vector<float> queries(group * d), scores(group * length), totals(group);  // [group, d], [group, length]
  for (int64_t j = 0; j < group; ++j) {
    at_position(st, st.q + b * st.q_row + (g * group + j) * d, p, queries.data() + j * d);
  }
  for (float& element : queries) element *= st.scale;
  scores_of(queries.data(), group, keys + start * d, length, d, scores.data());
  for (int64_t j = 0; j < group; ++j) totals[j] = exponentials(scores.data() + j * length, length);
  weigh_values(scores.data(), totals.data(), group, values + start * d, length, d, st.out + (b * st.heads + g * group) * d);
}

int64_t attribute_or(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

float float_attribute_or(const Ort::ConstKernelInfo& info, const char* name, float fallback) {
  try {
    return info.GetAttribute<float>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

struct CachedAttentionKernel {
  CachedAttentionKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    heads_ = info.GetAttribute<int64_t>("num_heads");
    kv_heads_ = info.GetAttribute<int64_t>("kv_num_heads");
    scale_ = float_attribute_or(info, "scale", 0.f);
    rotary_ = attribute_or(info, "do_rotary", 0);
    interleaved_ = attribute_or(info, "rotary_interleaved", 0);
    window_ = attribute_or(info, "local_window_size", -1);
    softcap_ = float_attribute_or(info, "softcap", 0.f);
    inputs_ = info.GetInputCount();
    const int64_t ints[] = {heads_, kv_heads_, rotary_, interleaved_, window_};
    const char* int_names[] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "local_window_size"};
    std::vector<Ort::OpAttr> attributes;
    for (int i = 0; i < 5; ++i) attributes.emplace_back(int_names[i], &ints[i], 1, OrtOpAttrType::ORT_OP_ATTR_INT);
    attributes.emplace_back("scale", &scale_, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT);
    attributes.emplace_back("softcap", &softcap_, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT);
    const char* type_names[] = {"T", "M"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
    stock_ = Ort::Op::Create(raw_info, "GroupQueryAttention", "com.microsoft", 1, type_names, types, 2,
                             attributes.data(), attributes.size(), inputs_, 3);
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue query = context.GetInput(0), past_key = context.GetInput(3), past_value = context.GetInput(4);
    const Ort::ConstValue seqlens = context.GetInput(5), total = context.GetInput(6);
    const std::vector<int64_t> shape = query.GetTensorTypeAndShapeInfo().GetShape();  // [b, s, width]
    const std::vector<int64_t> cache = past_key.GetTensorTypeAndShapeInfo().GetShape();  // [b, KV, capacity, d]
    const int64_t batch = shape[0], d = cache[3];
    const int64_t total_length = total.GetTensorData<int32_t>()[0];
    std::vector<int64_t> present = cache;
    present[2] = std::max<int64_t>(cache[2], total_length);
    Ort::UnownedValue output = context.GetOutput(0, {shape[0], shape[1], heads_ * d});
    Ort::UnownedValue present_key = context.GetOutput(1, present), present_value = context.GetOutput(2, present);
    const bool in_place = present_key.GetTensorRawData() == past_key.GetTensorRawData() &&
                          present_value.GetTensorRawData() == past_value.GetTensorRawData();
    const bool own = in_place && total_length <= cache[2] && d % 16 == 0 && interleaved_ == 0 && softcap_ == 0.f &&
                     (rotary_ == 0 || inputs_ > 7) && window_ != 0;
    const int32_t* lengths = seqlens.GetTensorData<int32_t>();
    // a prompt step's rows: all as long as the step (any past), or first prompts right-padded to the longest,
    // whose real positions see only real keys (causal), so that the padding's own outputs matter to nothing
    const bool unpadded = std::all_of(lengths, lengths + batch, [&](int32_t p) { return p + 1 == total_length; });
    const bool padded_first = total_length == shape[1] &&
                              std::all_of(lengths, lengths + batch, [&](int32_t p) { return 0 <= p && p < total_length; });
    const bool decode = own && shape[1] == 1;
    const bool prompt = own && kOwnPrompt && shape[1] > 1 && total_length >= shape[1] && (unpadded || padded_first);
    if (!decode && !prompt) {  // ONNX Runtime's own kernel, on the same inputs and outputs
      std::vector<const OrtValue*> inputs(inputs_);
      for (size_t i = 0; i < inputs_; ++i) inputs[i] = context.GetInput(i);
      OrtValue* outputs[] = {output, present_key, present_value};
      stock_.Invoke(raw_context, inputs.data(), inputs_, outputs, 3);
      return;
    }
    const bool packed = context.GetInput(1) == nullptr;
    const float* q = query.GetTensorData<float>();
    const int64_t packed_row = (heads_ + 2 * kv_heads_) * d;
    const AttentionStep step{q,
                             packed ? q + heads_ * d : context.GetInput(1).GetTensorData<float>(),
                             packed ? q + (heads_ + kv_heads_) * d : context.GetInput(2).GetTensorData<float>(),
                             packed ? packed_row : heads_ * d,
                             packed ? packed_row : kv_heads_ * d,
                             present_key.GetTensorMutableData<float>(),
                             present_value.GetTensorMutableData<float>(),
                             lengths,
                             rotary_ ? context.GetInput(7).GetTensorData<float>() : nullptr,
                             rotary_ ? context.GetInput(8).GetTensorData<float>() : nullptr,
                             output.GetTensorMutableData<float>(),
                             batch,
                             shape[1],
                             total_length - shape[1],
                             heads_,
                             kv_heads_,
                             cache[2],
                             d,
                             window_,
                             scale_ != 0.f ? scale_ : 1.f / std::sqrt(static_cast<float>(d))};
    void* shared = const_cast<AttentionStep*>(&step);
#if defined(GRAINS_AVX512)
    if (prompt) {
      context.ParallelFor(append_prompt, static_cast<size_t>(batch * kv_heads_), 0, shared);
      const size_t blocks = static_cast<size_t>((shape[1] + kQueryBlock - 1) / kQueryBlock);
      context.ParallelFor(attend_prompt, blocks * static_cast<size_t>(batch * kv_heads_), 0, shared);
      return;
    }
#endif
    for (int64_t b = 0; b < batch; ++b) {
      if (lengths[b] < 0 || lengths[b] >= cache[2]) {
        ORT_CXX_API_THROW("CachedAttention: a row's position is outside its cache", ORT_INVALID_ARGUMENT);
      }
    }
    context.ParallelFor(attend, static_cast<size_t>(batch * kv_heads_), 0, shared);
  }

  int64_t heads_ = 0, kv_heads_ = 0, rotary_ = 0, interleaved_ = 0, window_ = -1;
  float scale_ = 0.f, softcap_ = 0.f;
  size_t inputs_ = 0;
  Ort::Op stock_{nullptr};
};

struct CachedAttentionOp : Ort::CustomOpBase<CachedAttentionOp, CachedAttentionKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new CachedAttentionKernel(api, info); }
  const char* GetName() const { return "CachedAttention"; }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    const bool optional = index == 1 || index == 2 || index == 7 || index == 8;  // packed q|k|v; no rotary
    return optional ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                    : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* cached_attention_op() {
  static const CachedAttentionOp op;
  return &op;
}
