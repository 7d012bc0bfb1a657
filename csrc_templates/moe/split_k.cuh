// Split-K for the grouped GEMMs (moe_gemm_args.cuh): shared by the SM80 and SM90 kernels.
//
// With few rows per expert (decode) a GEMM has too few output tiles to fill the GPU, and every CTA streams a long
// K range of weights. Split-K gives each output tile k_splits CTAs, each over a contiguous run of whole BLOCK_K
// tiles, writing raw fp32 sums to `partials`; a second launch adds the slices in slice order (deterministic: no
// atomics) and applies the epilogue the GEMM kernel would have applied (bias + activation, or bias x routing
// weight). Partials of padding rows are neither written nor read.
//   GEMM1 partials: [k_splits, m_pad_max, n_b] (row p, up columns [0, N), gate columns [N, 2N) when gated)
//   GEMM2 partials: [k_splits, num_slots, N]  (row = slot)
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "common/dtypes.cuh"
#include "common/pdl.cuh"
#include "moe/activation.cuh"
#include "moe/moe_gemm_args.cuh"

namespace jitmoe::moe {

// Half-open range of k tiles of slice z: the k_tiles tiles split into runs of ceil(k_tiles / k_splits); trailing
// slices may be empty (they then write zero partials, so the reduce never reads stale values).
struct KTileRange {
  int begin;
  int end;
};

__host__ __device__ __forceinline__ KTileRange k_tile_range(int k_tiles, int k_splits, int z) {
  const int per = (k_tiles + k_splits - 1) / k_splits;
  const int begin = min(z * per, k_tiles);
  return {begin, min(begin + per, k_tiles)};
}

// Geometry of the partials: slice z, row r, column c is at base + z * slice + r * ld + c.
struct PartialsView {
  float* base;
  int64_t ld;     // floats per row: n_b
  int64_t slice;  // floats per slice
};

template <bool kGemm2, bool kGated>
__device__ __forceinline__ PartialsView partials_view(const MoeGemmArgs& args) {
  const int64_t ld = static_cast<int64_t>(args.n) * (kGated ? 2 : 1);
  return {args.partials, ld, ld * (kGemm2 ? args.num_slots : args.m_pad_max)};
}

// Columns per thread of the reduce: 4 consecutive (N is a multiple of 8).
constexpr int kReduceVec = 4;
constexpr int kReduceThreads = 128;

// One row p of the sorted order per blockIdx.x, kReduceVec columns per thread along blockIdx.y.
template <typename T, Act A, bool kGemm2>
__global__ void __launch_bounds__(kReduceThreads) split_k_reduce_kernel(const __grid_constant__ MoeGemmArgs args,
                                                                        int block_m) {
  constexpr bool kGated = !kGemm2 && ActTraits<A>::kGated;
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int p = blockIdx.x;
  const int col = (blockIdx.y * kReduceThreads + threadIdx.x) * kReduceVec;
  if (p >= *args.num_padded || col >= args.n) return;
  const int s = args.sorted_ids[p];
  const int e = args.block_expert[p / block_m];
  if (s < 0 || s >= args.num_slots || e < 0 || e >= args.num_experts) return;
  const PartialsView pv = partials_view<kGemm2, kGated>(args);
  const float* part = pv.base + (kGemm2 ? s : p) * pv.ld + col;
  float up[kReduceVec] = {}, gate[kReduceVec] = {};
  for (int z = 0; z < args.k_splits; ++z) {
    const float4 u = *reinterpret_cast<const float4*>(part + z * pv.slice);
    up[0] += u.x; up[1] += u.y; up[2] += u.z; up[3] += u.w;
    if constexpr (kGated) {
      const float4 g = *reinterpret_cast<const float4*>(part + z * pv.slice + args.n);
      gate[0] += g.x; gate[1] += g.y; gate[2] += g.z; gate[3] += g.w;
    }
  }
  const T* bias = static_cast<const T*>(args.bias);  // [E, n_b] or nullptr
  const int64_t bias_row = static_cast<int64_t>(e) * pv.ld;
  ActParams prm;
  if constexpr (!kGemm2) prm = load_act_params<A>(args, e);
  const float scale = kGemm2 && args.slot_weights != nullptr ? args.slot_weights[s] : 1.f;
  T* out = static_cast<T*>(args.out) + static_cast<int64_t>(kGemm2 ? s : p) * args.n + col;
#pragma unroll
  for (int v = 0; v < kReduceVec; ++v) {
    float u = up[v] + (bias ? to_float(bias[bias_row + col + v]) : 0.f);
    if constexpr (kGemm2) {
      out[v] = from_float<T>(u * scale);
    } else {
      const float g = gate[v] + (kGated && bias ? to_float(bias[bias_row + args.n + col + v]) : 0.f);
      out[v] = from_float<T>(apply_act<A>(u, g, prm));
    }
  }
}

// Second launch of a split-K GEMM (no-op without a split).
template <typename T, Act A, bool kGemm2>
void launch_split_k_reduce(const MoeGemmArgs& args, int block_m, cudaStream_t stream) {
  if (args.k_splits <= 1) return;
  constexpr int kColsPerBlock = kReduceThreads * kReduceVec;
  const dim3 grid(args.m_pad_max, (args.n + kColsPerBlock - 1) / kColsPerBlock);
  launch_pdl(split_k_reduce_kernel<T, A, kGemm2>, {grid, kReduceThreads}, stream, args, block_m);
}

}  // namespace jitmoe::moe
