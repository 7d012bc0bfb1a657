// Host-side launch helpers shared by the kernel families (CUDA runtime only, never torch).
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>

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

// Attribute kAttr of the current device, queried once per device and process: launchers read the SM count and the
// shared-memory limit on every eager call. `fallback` when the query fails (not cached); attributes read this way
// must be nonzero on a working device (0 marks "not queried yet").
template <cudaDeviceAttr kAttr>
int device_attribute(int fallback) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return fallback;
  std::atomic<int>* slot = device >= 0 && device < kMaxDevices ? &cached[device] : nullptr;
  if (slot != nullptr) {
    const int known = slot->load(std::memory_order_relaxed);
    if (known != 0) return known;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess || value == 0) return fallback;
  if (slot != nullptr) slot->store(value, std::memory_order_relaxed);
  return value;
}

// Multiprocessors of the current device (1 when the query fails).
inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(1); }

}  // namespace
}  // namespace jitmoe
