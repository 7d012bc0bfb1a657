// GEMM1 prologue of the sm90ws kernel: gathers the token rows into the expert-sorted order so TMA can load A.
//
// a_sorted[p, :] = x[sorted_ids[p] / topk, :] for every real row p < num_padded (a slot s is real when
// 0 <= s < num_slots). Padding rows and rows past num_padded are left untouched: they only feed output rows that
// GEMM2 never reads.
//
// Token-major, so each row of x is read from DRAM once: walking the sorted order instead reads a token's row again
// for each of its k experts, after the L2 has turned over (on the H100, Qwen3-30B T = 16384: 443 MB read for a 67 MB
// x, 358 us). Two launches: the first inverts sorted_ids into slot_rows[s] = p (skipped when moe_align wrote
// slot_rows itself); the second gives each token to a warp, which loads the row's chunks once and stores them to the
// rows of the token's slots. Slots that no row holds (experts of other EP ranks) may keep stale slot_rows entries;
// a row counts only when sorted_ids points back at the slot, so no clearing launch is needed.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "common/pdl.cuh"

namespace jitmoe::moe::sm90ws {

constexpr int kGatherThreads = 128;
constexpr int kGatherChunks = 8;  // 16-byte chunks per lane in flight: 4 KiB per warp and round

__device__ __forceinline__ int sorted_rows_in_use(const int32_t* num_padded, int m_pad_max) {
  return max(0, min(*num_padded, m_pad_max));
}

// slot_rows[sorted_ids[p]] = p for every real row p.
__global__ void __launch_bounds__(kGatherThreads) invert_sorted_ids_kernel(
    const int32_t* __restrict__ sorted_ids, const int32_t* __restrict__ num_padded, int32_t* __restrict__ slot_rows,
    int m_pad_max, int num_slots) {
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int rows = sorted_rows_in_use(num_padded, m_pad_max);
  for (int p = blockIdx.x * kGatherThreads + threadIdx.x; p < rows; p += gridDim.x * kGatherThreads) {
    const int s = sorted_ids[p];
    if (s >= 0 && s < num_slots) slot_rows[s] = p;
  }
}

// One warp per token (grid-stride): its row of x once, to the sorted row of each of its slots.
__global__ void __launch_bounds__(kGatherThreads) gather_token_rows_kernel(
    const uint4* __restrict__ x,                // [T, row bytes / 16] 16-byte chunks of the token rows
    const int32_t* __restrict__ sorted_ids,     // [m_pad_max]
    const int32_t* __restrict__ num_padded,     // [1]
    const int32_t* __restrict__ slot_rows,      // [T * topk]
    uint4* __restrict__ a_sorted,               // [m_pad_max, row bytes / 16]
    int m_pad_max, int num_tokens, int topk, int chunks_per_row) {
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int rows = sorted_rows_in_use(num_padded, m_pad_max);
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (kGatherThreads / 32);
  for (int t = blockIdx.x * (kGatherThreads / 32) + threadIdx.x / 32; t < num_tokens; t += warps) {
    const uint4* src = x + static_cast<int64_t>(t) * chunks_per_row;
    for (int j0 = 0; j0 < topk; j0 += 32) {  // lane l looks up choice j0 + l
      const int s = t * topk + j0 + lane;
      int row = j0 + lane < topk ? slot_rows[s] : -1;
      if (row < 0 || row >= rows || sorted_ids[row] != s) row = -1;
      const unsigned targets = __ballot_sync(0xffffffffu, row >= 0);
      if (targets == 0) continue;  // warp-uniform
      // The trip count is the warp's, not the lane's: every lane must reach the __shfl_sync below, also when a row
      // has fewer than 32 chunks (K < 256; lanes without a chunk there once skipped the loop and the warp hung).
      for (int base = 0; base < chunks_per_row; base += 32 * kGatherChunks) {
        const int c0 = base + lane;
        uint4 v[kGatherChunks];
#pragma unroll
        for (int u = 0; u < kGatherChunks; ++u) {
          if (c0 + 32 * u < chunks_per_row) v[u] = __ldg(src + c0 + 32 * u);
        }
        for (unsigned rest = targets; rest != 0; rest &= rest - 1) {
          const int p = __shfl_sync(0xffffffffu, row, __ffs(rest) - 1);
          uint4* dst = a_sorted + static_cast<int64_t>(p) * chunks_per_row;
#pragma unroll
          for (int u = 0; u < kGatherChunks; ++u) {
            if (c0 + 32 * u < chunks_per_row) dst[c0 + 32 * u] = v[u];
          }
        }
      }
    }
  }
}

// Both launches (the first only when slot_rows is not filled yet) on `stream`, each over at most `max_blocks`
// blocks; never synchronises.
inline void launch_gather(const void* x, const int32_t* sorted_ids, const int32_t* num_padded, int32_t* slot_rows,
                          bool slot_rows_filled, void* a_sorted, int m_pad_max, int num_slots, int topk,
                          int row_bytes, int max_blocks, cudaStream_t stream) {
  const auto capped = [max_blocks](int64_t items, int per_block) {
    const int64_t blocks = (items + per_block - 1) / per_block;
    return static_cast<int>(blocks < max_blocks ? blocks : max_blocks);
  };
  const int num_tokens = num_slots / topk;
  if (m_pad_max <= 0 || num_tokens <= 0) return;
  if (!slot_rows_filled) {
    launch_pdl(invert_sorted_ids_kernel, {capped(m_pad_max, kGatherThreads), kGatherThreads}, stream, sorted_ids,
               num_padded, slot_rows, m_pad_max, num_slots);
  }
  launch_pdl(gather_token_rows_kernel, {capped(num_tokens, kGatherThreads / 32), kGatherThreads}, stream,
             static_cast<const uint4*>(x), sorted_ids, num_padded, slot_rows, static_cast<uint4*>(a_sorted),
             m_pad_max, num_tokens, topk, row_bytes / 16);
}

}  // namespace jitmoe::moe::sm90ws
