// Shared helpers for the thin binding files (the only place that touches torch).
// NOTE: deliberately not <torch/extension.h>: it pulls in the whole C++ frontend and takes ~4x longer to compile
// (83 s vs 22 s measured on a loaded 2-core box); a binding needs only Tensor, the pybind casters and c10/cuda.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>
#include <cuda_runtime.h>

#include <optional>

// Launch errors surface as a RuntimeError naming the kernel (checked without a device synchronize).
#define JITMOE_CHECK_LAUNCH(what)                                                                   \
  do {                                                                                              \
    cudaError_t err_ = cudaGetLastError();                                                          \
    TORCH_CHECK(err_ == cudaSuccess, "jitmoe: launch of ", what, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace jitmoe {
// The data pointer of an optional tensor as T*, or nullptr when it is absent.
template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
}  // namespace jitmoe
