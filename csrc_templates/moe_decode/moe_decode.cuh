// Decode path of the fused MoE layer: weight-streaming kernels for a few tokens, where every (token, choice) slot
// has its own expert rows and a grouped GEMM's tiles would be mostly padding.
//
//   gemm1:  inter[s, n] = act(x[t] . fc1[e, n] + b1[e, n], x[t] . fc1[e, I + n] + b1[e, I + n])   (gated)
//   gemm2:  out[t, n]   = sum over j < k, in order, of w[t, j] * (inter[t k + j] . fc2[e_j, n] + b2[e_j, n])
//
// with s = t * k + j and e = topk_ids[s] - expert_offset; slots whose expert is not local are skipped (GEMM1 leaves
// their inter row unwritten, GEMM2 adds nothing for them), so a token without a local expert gets zeros. GEMM2
// sums a token's choices itself in a fixed order: no sorting, no padding, no per-slot buffer, no atomics.
//
// Each warp owns kCols output columns and streams their weight rows (K contiguous) in 16-byte chunks, lane l taking
// chunks l, l + 32, ...; the activations it multiplies them with (x[t] or the token's inter rows) sit in shared
// memory. Loads of kUnroll chunk steps of every row are issued before their FMAs so each lane keeps many 16-byte
// requests in flight: at these sizes the kernels are bound by DRAM latency x bandwidth, not by arithmetic.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.cuh"
#include "moe/activation.cuh"
#include "moe_decode/moe_decode_args.h"

namespace jitmoe::moe_decode {

using moe::Act;
using moe::ActParams;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 4;      // output columns per warp
constexpr int kUnroll = 2;    // chunk steps whose loads are in flight together
constexpr int kChunk = 8;     // elements per 16-byte chunk
constexpr int kColsPerBlock = kWarps * kCols;

// Local expert of slot s, or -1 (unsigned wrap-around keeps the subtraction defined for any id).
__device__ __forceinline__ int local_expert(const DecodeArgs& a, int s) {
  const uint32_t d = static_cast<uint32_t>(a.topk_ids[s]) - static_cast<uint32_t>(a.expert_offset);
  return d < static_cast<uint32_t>(a.num_experts) ? static_cast<int>(d) : -1;
}

template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& v) {
  const T* wp = reinterpret_cast<const T*>(&w);
  const T* vp = reinterpret_cast<const T*>(&v);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) acc = fmaf(to_float(wp[i]), to_float(vp[i]), acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc[r] += this lane's share of rows[r] . vec over `chunks` 16-byte chunks (rows in global memory, vec in shared).
// rows[r] == nullptr contributes nothing (a column past the end).
template <typename T, int R>
__device__ __forceinline__ void accumulate_rows(const uint4* const (&rows)[R], const uint4* vec, int chunks, int lane,
                                                float (&acc)[R]) {
  for (int base = lane; base < chunks; base += 32 * kUnroll) {
    uint4 w[R][kUnroll];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = base + 32 * u;
        w[r][u] = rows[r] != nullptr && c < chunks ? __ldg(rows[r] + c) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + 32 * u;
      if (c >= chunks) break;
      const uint4 v = vec[c];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += dot8<T>(w[r][u], v);
    }
  }
}

// Copies `elems` elements (a multiple of 8) from global to shared memory with the whole block; ends with a barrier.
__device__ __forceinline__ void stage_row(const void* src, uint4* dst, int elems) {
  const uint4* s = static_cast<const uint4*>(src);
  for (int c = threadIdx.x; c < elems / kChunk; c += kThreads) dst[c] = s[c];
  __syncthreads();
}

// grid (ceil(I / kColsPerBlock), T * k): one slot's kColsPerBlock columns of inter. Dynamic shared memory: H elements.
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads) decode_gemm1_kernel(const DecodeArgs a) {
  constexpr bool kGated = moe::ActTraits<A>::kGated;
  constexpr int kRows = kGated ? 2 * kCols : kCols;
  extern __shared__ uint4 x_smem[];
  const int s = blockIdx.y;
  const int e = local_expert(a, s);
  if (e < 0) return;  // block-uniform
  stage_row(static_cast<const T*>(a.x) + static_cast<int64_t>(s / a.topk) * a.hidden, x_smem, a.hidden);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kCols;
  const int n1 = kGated ? 2 * a.inter_size : a.inter_size;
  const int chunks = a.hidden / kChunk;
  const T* fc1 = static_cast<const T*>(a.fc1) + static_cast<int64_t>(e) * n1 * a.hidden;
  const uint4* rows[kRows];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const bool in = n0 + c < a.inter_size;
    rows[c] = in ? reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(n0 + c) * a.hidden) : nullptr;
    if constexpr (kGated) {
      rows[kCols + c] =
          in ? reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(a.inter_size + n0 + c) * a.hidden) : nullptr;
    }
  }
  float acc[kRows] = {};
  accumulate_rows<T, kRows>(rows, x_smem, chunks, lane, acc);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane != 0) return;
  const T* bias = a.fc1_bias ? static_cast<const T*>(a.fc1_bias) + static_cast<int64_t>(e) * n1 : nullptr;
  const ActParams params = moe::load_act_params<A>(a.act_alpha, a.act_beta, a.act_limit, e);
  T* inter = static_cast<T*>(a.inter) + static_cast<int64_t>(s) * a.inter_size;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = n0 + c;
    if (n >= a.inter_size) break;
    const float up = acc[c] + (bias ? to_float(bias[n]) : 0.f);
    float gate = 0.f;
    if constexpr (kGated) gate = acc[kCols + c] + (bias ? to_float(bias[a.inter_size + n]) : 0.f);
    inter[n] = from_float<T>(moe::apply_act<A>(up, gate, params));
  }
}

// grid (ceil(H / kColsPerBlock), T): one token's kColsPerBlock output columns, its k choices summed in order.
// Dynamic shared memory: k * I elements (the token's inter rows).
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_gemm2_kernel(const DecodeArgs a) {
  extern __shared__ uint4 inter_smem[];
  const int t = blockIdx.y;
  stage_row(static_cast<const T*>(a.inter) + static_cast<int64_t>(t) * a.topk * a.inter_size, inter_smem,
            a.topk * a.inter_size);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kCols;
  const int chunks = a.inter_size / kChunk;
  float acc[kCols] = {};
  float bias_sum[kCols] = {};
  for (int j = 0; j < a.topk; ++j) {
    const int s = t * a.topk + j;
    const int e = local_expert(a, s);
    if (e < 0) continue;  // warp-uniform
    const float w = a.slot_weights[s];
    const T* fc2 = static_cast<const T*>(a.fc2) + static_cast<int64_t>(e) * a.hidden * a.inter_size;
    const uint4* rows[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      rows[c] = n0 + c < a.hidden ? reinterpret_cast<const uint4*>(fc2 + static_cast<int64_t>(n0 + c) * a.inter_size)
                                  : nullptr;
    }
    float part[kCols] = {};
    accumulate_rows<T, kCols>(rows, inter_smem + j * chunks, chunks, lane, part);
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = fmaf(w, part[c], acc[c]);
    if (a.fc2_bias != nullptr && lane == 0) {
      const T* bias = static_cast<const T*>(a.fc2_bias) + static_cast<int64_t>(e) * a.hidden;
#pragma unroll
      for (int c = 0; c < kCols; ++c) bias_sum[c] += n0 + c < a.hidden ? w * to_float(bias[n0 + c]) : 0.f;
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = warp_sum(acc[c]);
  if (lane != 0) return;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(t) * a.hidden;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    if (n0 + c < a.hidden) out[n0 + c] = from_float<T>(acc[c] + bias_sum[c]);
  }
}

}  // namespace jitmoe::moe_decode
