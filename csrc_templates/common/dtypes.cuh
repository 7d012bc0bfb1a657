// Element types by the short names specs use ('fp32', 'bf16', 'fp16', 'e4m3'), and float conversions.
// Kernel headers include this (CUDA only, never torch) so nvcc -c can compile them on any machine.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace jitmoe {

using dtype_fp32 = float;
using dtype_bf16 = __nv_bfloat16;
using dtype_fp16 = __half;
using dtype_e4m3 = __nv_fp8_e4m3;  // FP8 operands and GEMM1's FP8 output only (no arithmetic on it)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
// Saturating (the largest finite e4m3 is 448; e4m3 has no infinity), round to nearest even: the decode GEMM1's e4m3
// rows (sm90ws converts pairs itself, store_pair).
template <> __device__ __forceinline__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float x) {
  __nv_fp8_e4m3 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  return r;
}

}  // namespace jitmoe
