// moe_align, single CTA (small slot counts): sort the (token, choice) slots by local expert, padded per expert to
// the GEMM tile.
//
// A slot is s = t * topk + j; its expert is topk_ids[s] - expert_offset when that lies in [0, num_experts)
// (expert parallelism: other ranks' experts and invalid ids are dropped here). The output lists, expert by
// expert in ascending order, the expert's slots in ascending slot order followed by padding (num_slots) up to a
// multiple of block_m; block_expert names the expert of every block_m rows (-1 past the end).
//
// One CTA of 1024 threads, four phases separated by __syncthreads:
//   1. count:   every warp counts its slice of the slots into its own row table[w][:] (align_common.cuh).
//   2. scan:    one thread per expert turns its column into exclusive prefixes over the warps and the expert's
//               total; a block-wide exclusive scan of the padded totals gives every expert's start row, which is
//               added to the column: table[w][e] is now the first row warp w writes for expert e.
//   3. fill:    block_expert for every used block, padding rows after each expert's slots (a warp per expert),
//               and the unused tail.
//   4. place:   the walk of (1) again, writing each slot to its row (and, when asked, each slot's row to slot_rows);
//               warps own consecutive slot ranges whose rows are ordered by (2), so the result is deterministic and
//               stable.
// Shared memory is (count_warps + 1) * num_experts ints (O(E), never O(E^2)); the launcher shrinks
// count_warps so it fits the device (E = 4096 still gets 13 warps on an H100, 9 on an A100).
// Large slot counts take the many-CTA kernel (moe_align_multi.cuh) instead; both produce identical output.
#pragma once
#include <cstdint>

#include "permute/align_common.cuh"

namespace jitmoe::permute {

constexpr int kAlignThreads = 1024;
constexpr int kAlignWarps = kAlignThreads / 32;

// Phase 2: per-warp write cursors and per-expert totals (row count_warps of the table); returns the padded total.
__device__ __forceinline__ int scan_experts(const AlignArgs& a, int* table, int* scratch) {
  int* totals = table + static_cast<long long>(a.count_warps) * a.num_experts;  // [num_experts]
  int carry = 0;
  for (int first = 0; first < a.num_experts; first += kAlignThreads) {
    const int e = first + threadIdx.x;
    const int total = e < a.num_experts ? warp_column_prefix(table, a.count_warps, a.num_experts, e) : 0;
    int round_total;
    const int start = carry + block_exclusive_scan<kAlignWarps>(round_up(total, a.block_m), scratch, &round_total);
    if (e < a.num_experts) {
      for (int w = 0; w < a.count_warps; ++w) table[static_cast<long long>(w) * a.num_experts + e] += start;
      totals[e] = total;
      a.expert_counts[e] = total;
    }
    carry += round_total;
  }
  return carry;
}

// Phase 3: warp w fills experts w, w + kAlignWarps, ...; then the whole block fills the tail.
__device__ __forceinline__ void fill_blocks_and_padding(const AlignArgs& a, const int* table, int used_rows) {
  const int* starts = table;                                                          // row 0: start row of e
  const int* totals = table + static_cast<long long>(a.count_warps) * a.num_experts;  // [num_experts]
  for (int e = threadIdx.x >> 5; e < a.num_experts; e += kAlignWarps) fill_expert(a, e, totals[e], starts[e]);
  fill_tail(a, used_rows, threadIdx.x, kAlignThreads);
  if (threadIdx.x == 0) *a.num_padded = used_rows;
}

__global__ void __launch_bounds__(kAlignThreads, 1) moe_align_kernel(AlignArgs a) {
  extern __shared__ int table[];  // [count_warps + 1][num_experts]: per-warp counts -> cursors; last row totals
  __shared__ int scratch[kAlignWarps + 1];
  const int w = threadIdx.x >> 5;
  const int cells = (a.count_warps + 1) * a.num_experts;
  for (int i = threadIdx.x; i < cells; i += kAlignThreads) table[i] = 0;
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  __syncthreads();
  int begin = 0, end = 0;
  if (w < a.count_warps) warp_slice(0, a.num_slots, a.count_warps, w, &begin, &end);
  int* row = table + static_cast<long long>(w) * a.num_experts;  // [num_experts] this warp's counts -> cursors
  count_slice<false>(a, begin, end, row);
  __syncthreads();
  const int used_rows = scan_experts(a, table, scratch);
  __syncthreads();
  fill_blocks_and_padding(a, table, used_rows);
  __syncthreads();
  place_slice(a, begin, end, row);
}

}  // namespace jitmoe::permute
