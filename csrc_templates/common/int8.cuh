// INT8 weight-only quantization: int8 -> float / bf16 / fp16 conversions and per-channel scale loads.
//
// Every int8 value is exact in fp32, bf16 (8 significant bits) and fp16. The conversions avoid the slow I2F path:
// byte b, biased to u = b + 128 (an xor of the sign bit), is placed in the low mantissa bits of a float whose
// exponent makes one mantissa step worth 1 (2^23 in fp32, 2^10 in fp16); subtracting that float and the bias gives b
// exactly. One prmt and one add per value (per two values in fp16).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "common/dtypes.cuh"

namespace jitmoe {

using dtype_s8 = int8_t;  // INT8 weight-only: weights only, never an activation or an output

constexpr uint32_t kS8Bias = 0x80808080u;  // + 128 in every byte (modulo 256): two's complement -> biased

// Byte i (0-3) of `biased` (a word already xor-ed with kS8Bias) as the float b.
__device__ __forceinline__ float s8_biased_to_float(uint32_t biased, int i) {
  const uint32_t bits = __byte_perm(biased, 0x4B000000u, 0x7440u | static_cast<uint32_t>(i));  // 2^23 + u
  return __uint_as_float(bits) - 8388736.f;                                                    // - (2^23 + 128)
}

// The four int8 values of `word` (byte 0 first) as two packed pairs of Elem (bf16x2 or half2): lo = bytes 0, 1;
// hi = bytes 2, 3 (the low half of each pair is the lower byte).
template <typename Elem>
__device__ __forceinline__ void s8x4_to_pairs(uint32_t word, uint32_t& lo_pair, uint32_t& hi_pair) {
  const uint32_t biased = word ^ kS8Bias;
  if constexpr (std::is_same_v<Elem, __half>) {
    // 0x64uu = 1024 + u in fp16; minus 1152 = 1024 + 128 leaves b.
    const __half2 magic = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const uint32_t lo = __byte_perm(biased, 0x64646464u, 0x5140u);
    const uint32_t hi = __byte_perm(biased, 0x64646464u, 0x5342u);
    const __half2 l = __hsub2(*reinterpret_cast<const __half2*>(&lo), magic);
    const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&hi), magic);
    lo_pair = *reinterpret_cast<const uint32_t*>(&l);
    hi_pair = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    static_assert(std::is_same_v<Elem, __nv_bfloat16>, "bf16 or fp16 pairs");
    // Exact small integers: the upper 16 bits of their fp32 form are their bf16 form.
    uint32_t f[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __float_as_uint(s8_biased_to_float(biased, i));
    lo_pair = __byte_perm(f[0], f[1], 0x7632u);
    hi_pair = __byte_perm(f[2], f[3], 0x7632u);
  }
}

// Per-channel weight scale `index` of an array of fp32 (fp32 true) or Elem values.
template <typename Elem>
__device__ __forceinline__ float load_scale(const void* scales, int64_t index, bool fp32) {
  return fp32 ? static_cast<const float*>(scales)[index] : to_float(static_cast<const Elem*>(scales)[index]);
}

// Scales `index` and `index + 1` (index even) with one load.
template <typename Elem>
__device__ __forceinline__ float2 load_scale_pair(const void* scales, int64_t index, bool fp32) {
  if (fp32) return *reinterpret_cast<const float2*>(static_cast<const float*>(scales) + index);
  const Elem* pair = static_cast<const Elem*>(scales) + index;
  const uint32_t bits = *reinterpret_cast<const uint32_t*>(pair);
  const Elem* two = reinterpret_cast<const Elem*>(&bits);
  return make_float2(to_float(two[0]), to_float(two[1]));
}

}  // namespace jitmoe
