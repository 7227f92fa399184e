// grains_edge.SteeredAdd: a steered layer's residual add and renormalization in one kernel,
//
//   y = h + delta,   out = (y + s) * sqrt(mean(y^2) + eps) / sqrt(mean((y + s)^2) + eps)
//
// per token (mean over the hidden axis), which is (h + s) * ||h|| / ||h + s|| of the README with h the
// layer's output. Stock ONNX Runtime takes four kernels for it (export/graph.py, `steer`); an unsteered
// layer takes one (the Add), so this keeps the steering overhead to the arithmetic.
//
//   inputs   h, delta [b, s, hidden] float32; shift [b, 1, hidden] float32 (the layer's steering row)
//   output   out [b, s, hidden] float32;  attribute epsilon (float)
//
// Sources: ONNX Runtime's custom-op C++ API (onnxruntime_cxx_api.h, CustomOpBase).

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 16;

struct Rows {
  const float *h, *delta, *shift;  // [b, s, hidden] x2, [b, 1, hidden]
  float* out;                      // [b, s, hidden]
  int64_t tokens, hidden, seq;
  float epsilon;
};

void steer_tokens(void* data, size_t task) {
  const Rows& r = *static_cast<const Rows*>(data);
  const int64_t first = static_cast<int64_t>(task) * kTokensPerTask;
  const int64_t last = std::min(first + kTokensPerTask, r.tokens);
  for (int64_t t = first; t < last; ++t) {
    const float *h = r.h + t * r.hidden, *delta = r.delta + t * r.hidden, *shift = r.shift + (t / r.seq) * r.hidden;
    float* out = r.out + t * r.hidden;
    float plain = 0.f, steered = 0.f;
    for (int64_t j = 0; j < r.hidden; ++j) {
      const float y = h[j] + delta[j], z = y + shift[j];
      out[j] = z;
      plain += y * y;
      steered += z * z;
    }
    const float scale = std::sqrt((plain / r.hidden + r.epsilon) / (steered / r.hidden + r.epsilon));
    for (int64_t j = 0; j < r.hidden; ++j) out[j] *= scale;
  }
}

struct SteeredAddKernel {
  SteeredAddKernel(const OrtApi&, const OrtKernelInfo* info) {
    epsilon_ = Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue h = context.GetInput(0), delta = context.GetInput(1), shift = context.GetInput(2);
    const std::vector<int64_t> shape = h.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> shift_shape = shift.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 3 || delta.GetTensorTypeAndShapeInfo().GetShape() != shape || shift_shape.size() != 3 ||
        shift_shape[0] != shape[0] || shift_shape[1] != 1 || shift_shape[2] != shape[2]) {
      ORT_CXX_API_THROW("SteeredAdd: h and delta must be [b, s, hidden] and shift [b, 1, hidden]", ORT_INVALID_ARGUMENT);
    }
    Ort::UnownedValue out = context.GetOutput(0, shape);
    Rows rows{h.GetTensorData<float>(), delta.GetTensorData<float>(), shift.GetTensorData<float>(),
              out.GetTensorMutableData<float>(), shape[0] * shape[1], shape[2], shape[1], epsilon_};
    const size_t tasks = static_cast<size_t>((rows.tokens + kTokensPerTask - 1) / kTokensPerTask);
    if (tasks == 1) {
      steer_tokens(&rows, 0);  // a decode step: not worth waking a thread
    } else if (tasks > 1) {
      context.ParallelFor(steer_tokens, tasks, 0, &rows);
    }
  }

  float epsilon_ = 0.f;
};

struct SteeredAddOp : Ort::CustomOpBase<SteeredAddOp, SteeredAddKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new SteeredAddKernel(api, info); }
  const char* GetName() const { return "SteeredAdd"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* steered_add_op() {
  static const SteeredAddOp op;
  return &op;
}
