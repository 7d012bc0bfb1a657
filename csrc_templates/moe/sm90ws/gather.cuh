// GEMM1 prologue of the sm90ws kernel: gathers the token rows into the expert-sorted order so TMA can load A.
//
// a_sorted[p, :] = x[sorted_ids[p] / topk, :] for every real row p < num_padded (a slot s is real when
// 0 <= s < num_slots). Padding rows and rows past num_padded are left untouched: they only feed output rows that
// GEMM2 never reads. Blocks stride over rows; the threads of a block copy a row's 16-byte chunks (K % 8 == 0).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace jitmoe::moe::sm90ws {

constexpr int kGatherThreads = 128;

__global__ void __launch_bounds__(kGatherThreads) gather_sorted_rows_kernel(
    const uint4* __restrict__ x,               // [T, K / 8] 16-byte chunks of the token rows
    const int32_t* __restrict__ sorted_ids,    // [m_pad_max]
    const int32_t* __restrict__ num_padded,    // [1]
    uint4* __restrict__ a_sorted,              // [m_pad_max, K / 8]
    int m_pad_max, int num_slots, int topk, int chunks_per_row) {
  const int rows = min(*num_padded, m_pad_max);
  for (int p = blockIdx.x; p < rows; p += gridDim.x) {
    const int s = sorted_ids[p];
    if (s < 0 || s >= num_slots) continue;  // padding row (block-uniform: the whole block skips it)
    const uint4* src = x + static_cast<int64_t>(s / topk) * chunks_per_row;
    uint4* dst = a_sorted + static_cast<int64_t>(p) * chunks_per_row;
    for (int c = threadIdx.x; c < chunks_per_row; c += kGatherThreads) dst[c] = src[c];
  }
}

// One launch over at most `max_blocks` blocks; never synchronises.
inline void launch_gather(const void* x, const int32_t* sorted_ids, const int32_t* num_padded, void* a_sorted,
                          int m_pad_max, int num_slots, int topk, int k, int max_blocks, cudaStream_t stream) {
  const int blocks = m_pad_max < max_blocks ? m_pad_max : max_blocks;
  if (blocks <= 0) return;
  gather_sorted_rows_kernel<<<blocks, kGatherThreads, 0, stream>>>(
      static_cast<const uint4*>(x), sorted_ids, num_padded, static_cast<uint4*>(a_sorted), m_pad_max, num_slots,
      topk, k / 8);
}

}  // namespace jitmoe::moe::sm90ws
