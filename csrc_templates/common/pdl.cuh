// Programmatic dependent launch (PDL, sm_90+): a kernel launched with launch_pdl may be scheduled while the kernel
// before it in the stream is still running, so its launch latency and its set-up overlap that kernel's tail.
//
// The contract, for every kernel launched with launch_pdl: call pdl_start() before the first access to global memory
// that an earlier kernel of the stream writes or reads. It waits until those kernels have completed and their writes
// are visible (at once without a PDL launch, or below sm_90), then lets the next PDL kernel be scheduled as soon as
// every CTA of this one has called it or exited; that kernel still waits for this one before it reads anything.
//
// JITMOE_PDL=0 in the environment launches without the attribute (read at every launch: A/B timing, debugging).
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace jitmoe {

// The two halves of pdl_start, for a kernel that tracks its dependence on the previous one in finer grain (the
// sm90ws GEMM2 with per-block completion counters): it lets the next kernel launch early but must still call
// pdl_wait before its grid completes, so that its completion implies the previous kernel's.
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

__device__ __forceinline__ void pdl_start() {
  pdl_wait();
  pdl_launch_dependents();
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

// What a launch needs besides the stream and the arguments. cluster > 1 launches clusters of that many CTAs along x;
// cluster == 1 sets no cluster attribute (the sm90ws kernel measured up to 1.6x slower launched as clusters of one).
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t smem = 0;
  unsigned cluster = 1;
};

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the previous kernel of the stream (see above).
// Returns the launch error, which the callers' bindings report through cudaGetLastError like a <<<>>> launch.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), const LaunchShape& shape, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attrs[2] = {};
  unsigned count = 0;
  if (shape.cluster > 1) {
    attrs[count].id = cudaLaunchAttributeClusterDimension;
    attrs[count++].val.clusterDim = {shape.cluster, 1, 1};
  }
  if (pdl_enabled()) {
    attrs[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace jitmoe
