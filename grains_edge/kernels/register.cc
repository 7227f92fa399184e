// The entry point ONNX Runtime calls when a session loads this library (SessionOptions
// register_custom_ops_library): grains-edge's ops in the ONNX domain "grains_edge".

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

const OrtCustomOp* q4_1_matmul_op();  // q4_1_matmul.cc
const OrtCustomOp* cached_attention_op();  // cached_attention.cc
const OrtCustomOp* q4_0_matmul_op();  // k_quant_matmul.cc
const OrtCustomOp* q4_k_matmul_op();  // k_quant_matmul.cc
const OrtCustomOp* q5_k_matmul_op();  // k_quant_matmul.cc
const OrtCustomOp* q6_k_matmul_op();  // k_quant_matmul.cc
const OrtCustomOp* q4_0_gather_op();  // k_quant_matmul.cc
const OrtCustomOp* q4_k_gather_op();  // k_quant_matmul.cc
const OrtCustomOp* q5_k_gather_op();  // k_quant_matmul.cc
const OrtCustomOp* q6_k_gather_op();  // k_quant_matmul.cc
const OrtCustomOp* steered_add_op();  // steered_add.cc

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static Ort::CustomOpDomain domain{nullptr};
  try {
    if (!domain) {  // one domain for every session of the process; it must outlive them
      domain = Ort::CustomOpDomain("grains_edge");
      domain.Add(q4_1_matmul_op());
      domain.Add(cached_attention_op());
      domain.Add(q4_0_matmul_op());
      domain.Add(q4_k_matmul_op());
      domain.Add(q5_k_matmul_op());
      domain.Add(q6_k_matmul_op());
      domain.Add(q4_0_gather_op());
      domain.Add(q4_k_gather_op());
      domain.Add(q5_k_gather_op());
      domain.Add(q6_k_gather_op());
      domain.Add(steered_add_op());
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& error) {
    return Ort::GetApi().CreateStatus(error.GetOrtErrorCode(), error.what());
  }
  return nullptr;
}
