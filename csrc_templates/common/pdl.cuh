// Programmatic dependent launch (PDL, sm_90+): a kernel launched with launch_pdl may be scheduled while the kernel
// before it in the stream is still running, so its launch latency and its set-up overlap that kernel's tail.
//
// The contract, for every kernel launched with launch_pdl:
//   * pdl_wait() before its first access to global memory that an earlier kernel of the stream writes or reads
//     (it returns once those kernels have completed and their writes are visible; without a PDL launch, or below
//     sm_90, it returns at once);
//   * pdl_launch_dependents() once it has passed pdl_wait(): the next PDL kernel may then be scheduled as soon as
//     every CTA of this one has called it or exited. The next kernel still waits for this one to complete before
//     it reads anything, so the call only moves its launch earlier.
// A kernel that reads only data from before the previous launch (weights, the routing the previous kernel also
// waited for) may read it before pdl_wait().
//
// JITMOE_PDL=0 in the environment launches without the attribute (read at every launch: A/B timing, debugging).
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace jitmoe {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

namespace {  // internal linkage, as in launch.cuh: per-module state

// Whether launches on the current device may use PDL: compute capability 9.0 or newer, and JITMOE_PDL is not "0".
inline bool pdl_enabled() {
  const char* env = std::getenv("JITMOE_PDL");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
  constexpr int kMaxDevices = 64;
  static int major[kMaxDevices] = {};  // 0: not queried yet; a benign race queries twice
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  if (major[device] == 0 &&
      cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    major[device] = 0;
    return false;
  }
  return major[device] >= 9;
}

}  // namespace

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the previous kernel of the stream (see above).
// Returns the launch error, which the callers' bindings report through cudaGetLastError like a <<<>>> launch.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace jitmoe
