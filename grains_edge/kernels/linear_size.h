// The K and N attributes of grains-edge's linear kernels (y [..., N] = x [..., K] @ W^T, and a gathered table's
// N rows of K): read once, when ONNX Runtime creates the kernel. Include after onnxruntime_cxx_api.h.

#pragma once

#include <cstdint>

struct LinearSize {
  int64_t k = 0, n = 0;

  explicit LinearSize(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo attributes(info);
    k = attributes.GetAttribute<int64_t>("K");
    n = attributes.GetAttribute<int64_t>("N");
  }
};
