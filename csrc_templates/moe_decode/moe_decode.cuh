// Decode path of the fused MoE layer: weight-streaming kernels for a few tokens, where every (token, choice) slot
// has its own expert rows and a grouped GEMM's tiles would be mostly padding.
//
//   gemm1:  inter[s, n] = act(x[t] . fc1[e, n] + b1[e, n], x[t] . fc1[e, I + n] + b1[e, I + n])   (gated)
//   gemm2:  out[t, n]   = sum over j < k of w[t, j] * (inter[t k + j] . fc2[e_j, n] + b2[e_j, n])
//
// with s = t * k + j and e = topk_ids[s] - expert_offset; slots whose expert is not local are skipped (GEMM1 leaves
// their inter row unwritten, GEMM2 adds nothing for them), so a token without a local expert gets zeros. GEMM2
// sums a token's choices itself in a fixed order: no sorting, no padding, no per-slot buffer, no atomics.
//
// Each warp owns kCols output columns and streams their weight rows (K contiguous) in 16-byte chunks, lane l taking
// chunks l, l + 32, ...; it loads the chunks of the vector it multiplies them with (x[t] or an inter row, read by
// every warp of the grid and so served by L2) in the same round, so nothing is staged and no barrier stands between
// the launch and the first weight request. A round issues the loads of kUnroll1 (GEMM1) or kUnroll2 chunk steps of
// every row before their FMAs so each lane keeps many 16-byte requests in flight: at these sizes the kernels are bound
// by DRAM latency x bandwidth, not by arithmetic. GEMM2 has a token's k choices to stream: its warps split them (warp
// q of a column group takes choices q, q + jw, ...) so a one-token call still fills the GPU with requests, and a final
// in-block step adds the groups' partial sums in a fixed order.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.cuh"
#include "common/pdl.cuh"
#include "moe/activation.cuh"
#include "moe_decode/moe_decode_args.h"

namespace jitmoe::moe_decode {

using moe::Act;
using moe::ActParams;

constexpr int kWarps = 4;     // GEMM1
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 4;      // output columns per warp
constexpr int kChunk = 8;     // elements per 16-byte chunk
constexpr int kColsPerBlock = kWarps * kCols;
// H and I are multiples of kChunk (moe_decode.fits_decode), so a warp's kCols columns are all in range or all past
// the end: warps test their first column only.
static_assert(kChunk % kCols == 0, "a warp's columns must not straddle the end of a row");
constexpr int kUnroll1 = 2;   // GEMM1 chunk steps in flight together (2 x kCols rows when gated)
constexpr int kWarps2 = 8;    // GEMM2: column groups x choice warps
constexpr int kThreads2 = 32 * kWarps2;
constexpr int kUnroll2 = 2;   // GEMM2 chunk steps in flight together
// GEMM2 blocks per SM the registers must allow: four (64 registers) put a one-token call's blocks in one wave on the
// H100; sm_80's code needs 94 (it spills at 80).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kMinBlocks2 = 2;
#else
constexpr int kMinBlocks2 = 4;
#endif

// GEMM2's warps per column group: they split the token's choices. A power of two (the column groups must tile the
// block) no larger than k, so no warp idles on a token with few choices.
__host__ __device__ constexpr int choice_warps(int topk) {
  int jw = 1;
  while (2 * jw <= kWarps2 && 2 * jw <= topk) jw *= 2;
  return jw;
}
__host__ __device__ constexpr int gemm2_cols_per_block(int topk) { return kWarps2 / choice_warps(topk) * kCols; }

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

// acc[r] += this lane's share of rows[r] . vec over `chunks` 16-byte chunks (all in global memory).
template <typename T, int R, int U>
__device__ __forceinline__ void accumulate_rows(const uint4* const (&rows)[R], const uint4* vec, int chunks, int lane,
                                                float (&acc)[R]) {
  for (int base = lane; base < chunks; base += 32 * U) {
    uint4 w[R][U], v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + 32 * u;
      const bool in = c < chunks;
      v[u] = in ? __ldg(vec + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < R; ++r) w[r][u] = in ? __ldg(rows[r] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + 32 * u >= chunks) break;
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += dot8<T>(w[r][u], v[u]);
    }
  }
}

// grid (ceil(I / kColsPerBlock), T * k): one slot's kColsPerBlock columns of inter.
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads) decode_gemm1_kernel(const DecodeArgs a) {
  constexpr bool kGated = moe::ActTraits<A>::kGated;
  constexpr int kRows = kGated ? 2 * kCols : kCols;
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int s = blockIdx.y;
  const int e = local_expert(a, s);
  if (e < 0) return;  // block-uniform
  const uint4* x =
      reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + static_cast<int64_t>(s / a.topk) * a.hidden);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kCols;
  if (n0 >= a.inter_size) return;  // warp-uniform
  const int n1 = kGated ? 2 * a.inter_size : a.inter_size;
  const int chunks = a.hidden / kChunk;
  const T* fc1 = static_cast<const T*>(a.fc1) + static_cast<int64_t>(e) * n1 * a.hidden;
  const uint4* rows[kRows];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = n0 + c;
    rows[c] = reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(n) * a.hidden);
    if constexpr (kGated) {
      rows[kCols + c] = reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(a.inter_size + n) * a.hidden);
    }
  }
  float acc[kRows] = {};
  accumulate_rows<T, kRows, kUnroll1>(rows, x, chunks, lane, acc);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane != 0) return;
  const T* bias = a.fc1_bias ? static_cast<const T*>(a.fc1_bias) + static_cast<int64_t>(e) * n1 : nullptr;
  const ActParams params = moe::load_act_params<A>(a.act_alpha, a.act_beta, a.act_limit, e);
  T* inter = static_cast<T*>(a.inter) + static_cast<int64_t>(s) * a.inter_size;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = n0 + c;
    const float up = acc[c] + (bias ? to_float(bias[n]) : 0.f);
    float gate = 0.f;
    if constexpr (kGated) gate = acc[kCols + c] + (bias ? to_float(bias[a.inter_size + n]) : 0.f);
    inter[n] = from_float<T>(moe::apply_act<A>(up, gate, params));
  }
}

// grid (ceil(H / gemm2_cols_per_block(k)), T): one token's output columns, in column groups of kCols per warp.
// Warp q of a group streams the rows of choices q, q + jw, ... and keeps per-lane partial sums; the group's first
// warp then adds the jw partials in order and reduces over lanes, so the result does not depend on timing.
template <typename T>
__global__ void __launch_bounds__(kThreads2, kMinBlocks2) decode_gemm2_kernel(const DecodeArgs a) {
  __shared__ float partial[kWarps2][kCols][32];
  __shared__ float bias_partial[kWarps2][kCols];
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int t = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int jw = choice_warps(a.topk);
  const int group = warp / jw, q = warp % jw;
  const int n0 = blockIdx.x * gemm2_cols_per_block(a.topk) + group * kCols;
  const int chunks = a.inter_size / kChunk;
  float acc[kCols] = {};
  float bias_sum[kCols] = {};
  const bool in_range = n0 < a.hidden;  // warp-uniform; the warp still meets the barrier below
  for (int j = in_range ? q : a.topk; j < a.topk; j += jw) {
    const int s = t * a.topk + j;
    const int e = local_expert(a, s);
    if (e < 0) continue;  // warp-uniform
    const float w = a.slot_weights[s];
    const T* fc2 = static_cast<const T*>(a.fc2) + static_cast<int64_t>(e) * a.hidden * a.inter_size;
    const uint4* rows[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      rows[c] = reinterpret_cast<const uint4*>(fc2 + static_cast<int64_t>(n0 + c) * a.inter_size);
    }
    const uint4* inter =
        reinterpret_cast<const uint4*>(static_cast<const T*>(a.inter) + static_cast<int64_t>(s) * a.inter_size);
    float part[kCols] = {};
    accumulate_rows<T, kCols, kUnroll2>(rows, inter, chunks, lane, part);
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = fmaf(w, part[c], acc[c]);
    if (a.fc2_bias != nullptr) {
      const T* bias = static_cast<const T*>(a.fc2_bias) + static_cast<int64_t>(e) * a.hidden;
#pragma unroll
      for (int c = 0; c < kCols; ++c) bias_sum[c] += w * to_float(bias[n0 + c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    partial[warp][c][lane] = acc[c];
    if (lane == 0) bias_partial[warp][c] = bias_sum[c];
  }
  __syncthreads();
  if (q != 0 || !in_range) return;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(t) * a.hidden;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    float v = 0.f, b = 0.f;
    for (int p = 0; p < jw; ++p) {
      v += partial[warp + p][c][lane];
      b += bias_partial[warp + p][c];
    }
    v = warp_sum(v);
    if (lane == 0) out[n0 + c] = from_float<T>(v + b);
  }
}

}  // namespace jitmoe::moe_decode
