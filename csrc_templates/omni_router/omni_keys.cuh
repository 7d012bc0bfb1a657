// Sort keys of the Omni router: unsigned integers whose order is the router's order.
//
// Axis keys rank the logits of one axis by (value desc, index asc): the element's bits go through an
// order-preserving map (NaN above +inf, -0 equal to +0) into the high half and the complemented index into the
// low half, so "larger key" means "larger value, then smaller index", and keys are unique. 16-bit logits give
// 32-bit keys (index < 2^16 because N*N < 2^31), fp32 logits 64-bit keys.
//
// Candidate keys rank pairs (i, j) by the exact value of x_i + y_j, then by the flat index i*N + j ascending. The
// exact sum is the pair (s, e) of TwoSum: s = fl32(x_i + y_j) and e = (x_i + y_j) - s, which is itself a float.
// Under round-to-nearest, s1 > s2 implies the exact sums compare the same way, and for s1 == s2 they compare as
// e1, e2, so (s, e) in lexicographic order is the exact order. Ordering by s alone would not do: two different
// sums can round to the same s, and then the rank pruning of the candidate set is no longer sound (see
// omni_router.cuh). Wide keys are 96-bit (s, e, ~index). When the logits are 16-bit and N <= 256 the key packs
// into 64 bits: e then has at most as many significant bits as one logit (it is the part of the smaller operand
// that falls below the last bit of s) and lies in the logit type's range, so it converts to that type exactly,
// and the flat index fits in 16 bits.
#pragma once
#include <cstdint>

#include "common/dtypes.cuh"
#include "omni_router/warp_bitonic.cuh"

namespace jitmoe {
namespace omni {

template <class T>
struct ElemTraits;
template <>
struct ElemTraits<float> {
  using AxisKey = uint64_t;
  static constexpr int kBits = 32;
  static constexpr uint32_t kInf = 0x7F800000u;
  static constexpr uint32_t kNaN = 0x7FC00000u;
};
template <>
struct ElemTraits<__nv_bfloat16> {
  using AxisKey = uint32_t;
  static constexpr int kBits = 16;
  static constexpr uint32_t kInf = 0x7F80u;
  static constexpr uint32_t kNaN = 0x7FC0u;
};
template <>
struct ElemTraits<__half> {
  using AxisKey = uint32_t;
  static constexpr int kBits = 16;
  static constexpr uint32_t kInf = 0x7C00u;
  static constexpr uint32_t kNaN = 0x7E00u;
};

template <class T>
using AxisKeyOf = typename ElemTraits<T>::AxisKey;

// Order-preserving map of an element's bit pattern onto an unsigned of the same width: every NaN maps to the
// largest value, -0 and +0 to the same value, and every real value (-inf included) to something above zero.
// Written as selects, not early returns: it runs for every candidate, and branches there cost more than the
// three outcomes.
template <class T>
__device__ __forceinline__ uint32_t ordered(uint32_t bits) {
  constexpr uint32_t kSign = 1u << (ElemTraits<T>::kBits - 1);
  constexpr uint32_t kAll = kSign | (kSign - 1u);
  const uint32_t magnitude = bits & (kSign - 1u);
  const uint32_t finite = (bits & kSign) ? (~bits & kAll) : (bits | kSign);
  const uint32_t signless_zero = magnitude == 0u ? kSign : finite;
  return magnitude > ElemTraits<T>::kInf ? kAll : signless_zero;
}

// Inverse of ordered() (a NaN comes back as the canonical quiet NaN).
template <class T>
__device__ __forceinline__ uint32_t unordered(uint32_t ord) {
  constexpr uint32_t kSign = 1u << (ElemTraits<T>::kBits - 1);
  constexpr uint32_t kAll = kSign | (kSign - 1u);
  if (ord == kAll) return ElemTraits<T>::kNaN;
  return (ord & kSign) ? (ord & ~kSign) : (~ord & kAll);
}

template <class T>
__device__ __forceinline__ float bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float bits_to_float<float>(uint32_t bits) { return __uint_as_float(bits); }
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Bits of v rounded to T (exact whenever v is representable in T).
template <class T>
__device__ __forceinline__ uint32_t float_to_bits(float v);
template <>
__device__ __forceinline__ uint32_t float_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ uint32_t float_to_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// ---- axis keys: (value desc, index asc) ------------------------------------------------------------------------
template <class T>
__device__ __forceinline__ AxisKeyOf<T> axis_key(uint32_t bits, int index) {
  constexpr int kShift = ElemTraits<T>::kBits;
  constexpr AxisKeyOf<T> kIndexMask = (AxisKeyOf<T>(1) << kShift) - 1;
  return (AxisKeyOf<T>(ordered<T>(bits)) << kShift) | (kIndexMask - AxisKeyOf<T>(index));
}

template <class T>
__device__ __forceinline__ float axis_value(AxisKeyOf<T> key) {
  return bits_to_float<T>(unordered<T>(static_cast<uint32_t>(key >> ElemTraits<T>::kBits)));
}

template <class T>
__device__ __forceinline__ uint32_t axis_index(AxisKeyOf<T> key) {
  constexpr AxisKeyOf<T> kIndexMask = (AxisKeyOf<T>(1) << ElemTraits<T>::kBits) - 1;
  return static_cast<uint32_t>(kIndexMask - (key & kIndexMask));
}

// ---- candidate keys: (exact x_i + y_j desc, i*N + j asc) -------------------------------------------------------
// The rounding error of s = fl(a + b), exact for finite a, b (Knuth's TwoSum; the _rn intrinsics are never
// contracted or reassociated).
__device__ __forceinline__ float two_sum_error(float a, float b, float s) {
  const float b_virtual = __fsub_rn(s, a);
  return __fadd_rn(__fsub_rn(a, __fsub_rn(s, b_virtual)), __fsub_rn(b, b_virtual));
}

struct WideCandidate {
  using Key = warp_bitonic::Key96;
  static __device__ __forceinline__ Key make(float s, float err, uint32_t flat_index) {
    return Key{ordered<float>(__float_as_uint(s)), ordered<float>(__float_as_uint(err)), ~flat_index};
  }
  static __device__ __forceinline__ float score(const Key& key) { return __uint_as_float(unordered<float>(key.hi)); }
  static __device__ __forceinline__ uint32_t index(const Key& key) { return ~key.lo; }
};

// 16-bit logits and N <= 256 only (see the header comment).
template <class T>
struct PackedCandidate {
  static_assert(ElemTraits<T>::kBits == 16, "packed candidate keys need 16-bit logits");
  using Key = uint64_t;
  static __device__ __forceinline__ Key make(float s, float err, uint32_t flat_index) {
    return (Key(ordered<float>(__float_as_uint(s))) << 32) | (Key(ordered<T>(float_to_bits<T>(err))) << 16) |
           Key(0xFFFFu - flat_index);
  }
  static __device__ __forceinline__ float score(Key key) {
    return __uint_as_float(unordered<float>(static_cast<uint32_t>(key >> 32)));
  }
  static __device__ __forceinline__ uint32_t index(Key key) { return 0xFFFFu - static_cast<uint32_t>(key & 0xFFFFu); }
};

// Key of the pair (x element of key kx, y element of key ky). A non-finite s gets e = 0 (its TwoSum is undefined).
template <class T, class Candidate>
__device__ __forceinline__ typename Candidate::Key candidate_key(AxisKeyOf<T> kx, AxisKeyOf<T> ky, int n) {
  const float vx = axis_value<T>(kx);
  const float vy = axis_value<T>(ky);
  const float s = __fadd_rn(vx, vy);
  const bool finite = (__float_as_uint(s) & 0x7F800000u) != 0x7F800000u;
  const float err = finite ? two_sum_error(vx, vy, s) : 0.0f;
  return Candidate::make(s, err, axis_index<T>(kx) * static_cast<uint32_t>(n) + axis_index<T>(ky));
}

}  // namespace omni
}  // namespace jitmoe
