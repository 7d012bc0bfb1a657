// One routing row held in registers by a "team" of threads: a single warp (small E, several rows per block) or a
// whole block (large E, one row per block).
//
// Layout: thread t of a G-thread team owns NCH chunks of CH = 16 / sizeof(T) consecutive experts; chunk c starts at
// expert (c * G + t) * CH, so one chunk load of a warp reads 512 contiguous bytes with one 16-byte load per lane.
// Rows whose start is not 16-byte aligned (odd E, offset views) take the same layout with scalar loads. Slots past
// E are marked invalid in a per-thread bit mask and never take part in any decision.
//
// Selection keys: every comparison is done on uint32 keys that order like the floats they encode (-0 is folded
// into +0 so that equal values tie), which lets warp reductions use the single-instruction redux.sync.
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_runtime.h>
#include "common/dtypes.cuh"

namespace jitmoe::routing {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kScoringSoftmax = 0;
constexpr int kScoringSigmoid = 1;

// Float -> uint32 with the same order (for non-NaN input); -0 maps to +0's key.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  u = (u == 0x80000000u) ? 0u : u;
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// Inverse of order_key (exact).
__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

template <typename T, int NCH, int G>
struct RowLayout {
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  static constexpr int kSlots = NCH * kChunk;
  static_assert(kSlots <= 32, "the per-thread validity mask is 32 bits");
  static_assert(G == 16 || G % kWarpSize == 0, "a team is a half warp or made of whole warps");

  // Expert index held by team thread t in register slot s.
  __device__ __forceinline__ static int expert(int t, int s) { return ((s / kChunk) * G + t) * kChunk + s % kChunk; }
};

// 16 bytes of T -> 16 / sizeof(T) floats (exact conversions).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4 v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      static_assert(std::is_same_v<T, __half>, "fp32, bf16 or fp16 logits");
      out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
}

// Loads team thread t's slots of one row into x; returns the mask of slots that hold a real expert (< E).
// vec16: the row start is 16-byte aligned and E % CH == 0, so every chunk is either whole or entirely past E.
template <typename T, int NCH, int G>
__device__ __forceinline__ uint32_t load_row(const T* __restrict__ row /* [E] */, int E, int t, bool vec16,
                                             float (&x)[RowLayout<T, NCH, G>::kSlots]) {
  using L = RowLayout<T, NCH, G>;
  uint32_t valid = 0;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int e0 = (c * G + t) * L::kChunk;
    if (vec16) {
      if (e0 < E) {
        unpack16<T>(__ldg(reinterpret_cast<const uint4*>(row + e0)), x + c * L::kChunk);
      } else {
#pragma unroll
        for (int j = 0; j < L::kChunk; ++j) x[c * L::kChunk + j] = 0.f;
      }
    } else {
#pragma unroll
      for (int j = 0; j < L::kChunk; ++j) x[c * L::kChunk + j] = (e0 + j < E) ? to_float(row[e0 + j]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < L::kChunk; ++j) valid |= (e0 + j < E ? 1u : 0u) << (c * L::kChunk + j);
  }
  return valid;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;  // the butterfly adds the same operands in every lane, so all lanes hold bit-identical sums
}

// G consecutive lanes of a warp (G = 32: the whole warp, 16: a half) acting as one team: reductions and ballots
// stay inside the group, and every lane names only its own group in the masks, so groups may diverge.
template <int G>
struct LaneGroup {
  static_assert(G == 16 || G == kWarpSize, "lane groups are half or whole warps");
  __device__ __forceinline__ static int lane() { return threadIdx.x % G; }
  __device__ __forceinline__ static unsigned mask() {
    return G == kWarpSize ? kFullMask : ((1u << G) - 1u) << (threadIdx.x % kWarpSize / G * G);
  }
  // Butterfly over the group's lanes: every lane ends with op over all of them (bit-identical in every lane).
  template <typename V, typename Op>
  __device__ __forceinline__ static V butterfly(V v, Op op) {
#pragma unroll
    for (int off = G / 2; off > 0; off /= 2) v = op(v, __shfl_xor_sync(mask(), v, off));
    return v;
  }
  __device__ __forceinline__ static uint32_t max_u32(uint32_t v) {
    if constexpr (G == kWarpSize) return __reduce_max_sync(kFullMask, v);
    else return butterfly(v, [](uint32_t a, uint32_t b) { return max(a, b); });
  }
  __device__ __forceinline__ static int32_t min_i32(int32_t v) {
    if constexpr (G == kWarpSize) return __reduce_min_sync(kFullMask, v);
    else return butterfly(v, [](int32_t a, int32_t b) { return min(a, b); });
  }
  __device__ __forceinline__ static float sum_f32(float v) {
    return butterfly(v, [](float a, float b) { return a + b; });
  }
};

// Reductions over the team. Every thread of the team must call them (converged). Each reduction slot is used at
// most once per kernel, so one barrier per reduction is enough.
template <int NW>
struct Team {
  static constexpr int kSlots = 4;
  uint32_t* scratch;  // [kSlots][NW] shared

  __device__ __forceinline__ void sync() const { __syncthreads(); }

  template <typename Op>
  __device__ __forceinline__ uint32_t combine(uint32_t warp_value, int slot, Op op) const {
    if (threadIdx.x % kWarpSize == 0) scratch[slot * NW + threadIdx.x / kWarpSize] = warp_value;
    __syncthreads();
    uint32_t r = scratch[slot * NW];
#pragma unroll
    for (int w = 1; w < NW; ++w) r = op(r, scratch[slot * NW + w]);
    return r;
  }
  __device__ uint32_t max_u32(uint32_t v, int slot) const {
    return combine(__reduce_max_sync(kFullMask, v), slot, [](uint32_t a, uint32_t b) { return max(a, b); });
  }
  __device__ uint32_t min_u32(uint32_t v, int slot) const {
    return combine(__reduce_min_sync(kFullMask, v), slot, [](uint32_t a, uint32_t b) { return min(a, b); });
  }
  __device__ float sum_f32(float v, int slot) const {
    const auto add = [](uint32_t a, uint32_t b) { return __float_as_uint(__uint_as_float(a) + __uint_as_float(b)); };
    return __uint_as_float(combine(__float_as_uint(warp_sum(v)), slot, add));
  }
};

template <>
struct Team<1> {
  static constexpr int kSlots = 1;
  uint32_t* scratch;  // unused: a one-warp team reduces with warp instructions only

  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ uint32_t max_u32(uint32_t v, int) const { return __reduce_max_sync(kFullMask, v); }
  __device__ __forceinline__ uint32_t min_u32(uint32_t v, int) const { return __reduce_min_sync(kFullMask, v); }
  __device__ __forceinline__ float sum_f32(float v, int) const { return warp_sum(v); }
};

// Scores of the routing function, computed in fp32 exactly the same way for selection and for the weights.
struct Scorer {
  int scoring;
  float row_max;  // softmax only: max logit of the row
  float row_sum;  // softmax only: sum of exp(x - row_max)

  __device__ __forceinline__ float operator()(float x) const {
    return scoring == kScoringSoftmax ? expf(x - row_max) / row_sum : 1.f / (1.f + expf(-x));
  }
};

// Softmax statistics of the row (max, sum of exp) over the valid slots; sigmoid needs none.
template <int NW, int S>
__device__ __forceinline__ Scorer make_scorer(int scoring, const float (&x)[S], uint32_t valid, const Team<NW>& team,
                                              int slot_max, int slot_sum) {
  Scorer sc{scoring, 0.f, 1.f};
  if (scoring != kScoringSoftmax) return sc;
  uint32_t kmax = 0;
#pragma unroll
  for (int s = 0; s < S; ++s) kmax = max(kmax, (valid >> s & 1u) ? order_key(x[s]) : 0u);
  sc.row_max = key_to_float(team.max_u32(kmax, slot_max));
  float acc = 0.f;
#pragma unroll
  for (int s = 0; s < S; ++s) acc += (valid >> s & 1u) ? expf(x[s] - sc.row_max) : 0.f;
  sc.row_sum = team.sum_f32(acc, slot_sum);
  return sc;
}

}  // namespace jitmoe::routing
