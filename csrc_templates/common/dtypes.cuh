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
using dtype_e4m3 = __nv_fp8_e4m3;  // FP8 operands and GEMM1's FP8 output only (no arithmetic, no conversions here)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

}  // namespace jitmoe
