// Host-side launch helpers shared by the kernel families (CUDA runtime only, never torch).
#pragma once
#include <cuda_runtime_api.h>

namespace jitmoe {

namespace {  // internal linkage: the flags below must not become process-wide (GNU unique) symbols shared by
             // every module that instantiates the same template

// Opts `kernel` into `bytes` of dynamic shared memory on the current device, once per device and process: the
// attribute is per kernel and device, and setting it costs a driver call that eager launches should not repeat.
// A failure is returned (and not cached), so the caller's launch fails with it and the binding reports it.
template <auto* kernel>
cudaError_t set_max_dynamic_smem_once(int bytes) {
  constexpr int kMaxDevices = 64;
  static bool done[kMaxDevices] = {};  // one flag array per kernel; a benign race sets the attribute twice
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  }
  if (done[device]) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  done[device] = err == cudaSuccess;
  return err;
}

}  // namespace
}  // namespace jitmoe
