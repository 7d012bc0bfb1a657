// Shared helpers for the thin binding files (the only place that touches torch).
#pragma once
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

// Launch errors surface as a RuntimeError naming the kernel (checked without a device synchronize).
#define JITMOE_CHECK_LAUNCH(what)                                                                   \
  do {                                                                                              \
    cudaError_t err_ = cudaGetLastError();                                                          \
    TORCH_CHECK(err_ == cudaSuccess, "jitmoe: launch of ", what, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace jitmoe {
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
}  // namespace jitmoe
