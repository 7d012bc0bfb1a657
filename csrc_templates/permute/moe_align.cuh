// moe_align: sort the (token, choice) slots by local expert, padded per expert to the GEMM tile, in one CTA.
//
// A slot is s = t * topk + j; its expert is topk_ids[s] - expert_offset when that lies in [0, num_experts)
// (expert parallelism: other ranks' experts and invalid ids are dropped here). The output lists, expert by
// expert in ascending order, the expert's slots in ascending slot order followed by padding (num_slots) up to a
// multiple of block_m; block_expert names the expert of every block_m rows (-1 past the end).
//
// One CTA of 1024 threads, four phases separated by __syncthreads:
//   1. count:   the slots are cut into `count_warps` contiguous slices, one per warp. A warp walks its slice
//               32 slots at a time; __match_any_sync groups the lanes by expert and the lowest lane of each
//               group adds the group size to table[warp][expert]. Only that warp touches its table row, so no
//               atomics are needed and the counts are exact.
//   2. scan:    one thread per expert turns its column into exclusive prefixes over the warps and the expert's
//               total; a block-wide exclusive scan of the padded totals gives every expert's start row, which is
//               added to the column: table[w][e] is now the first row warp w writes for expert e.
//   3. fill:    block_expert for every used block, padding rows after each expert's slots, and the unused tail.
//   4. place:   the same walk as (1); a slot's row is table[w][e] plus its rank among the lanes of the same
//               expert below it, so rows follow slot order inside a warp, and warps own consecutive slot ranges
//               whose rows are ordered by (2): the result is deterministic and stable.
// Shared memory is (count_warps + 1) * num_experts ints (O(E), never O(E^2)); the launcher shrinks
// count_warps so it fits the device (E = 4096 still gets 13 warps on an H100, 9 on an A100).
#pragma once
#include <cstdint>

namespace jitmoe::permute {

constexpr int kAlignThreads = 1024;
constexpr int kAlignWarps = kAlignThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kAlignWarps == 32, "the two-level block scan assumes exactly 32 warps");

struct AlignArgs {
  const int32_t* topk_ids;  // [num_slots] global expert id of every slot
  int32_t* sorted_ids;      // [m_pad_max] slot per row of the expert-sorted order; num_slots marks padding
  int32_t* block_expert;    // [m_pad_max / block_m] local expert of every block_m rows, -1 when unused
  int32_t* num_padded;      // [1] rows in use (a multiple of block_m)
  int32_t* expert_counts;   // [num_experts] slots per local expert
  int num_slots;            // T * topk
  int num_experts;          // local experts
  int expert_offset;        // global id of local expert 0
  int block_m;              // GEMM tile rows
  int m_pad_max;            // static bound on the padded length (a multiple of block_m)
  int count_warps;          // warps owning a slice of the slots, in [1, 32]
};

// Local expert of a global id, or -1 (unsigned wrap-around keeps the subtraction defined for any id).
__device__ __forceinline__ int local_expert(int32_t id, const AlignArgs& a) {
  uint32_t d = static_cast<uint32_t>(id) - static_cast<uint32_t>(a.expert_offset);
  return d < static_cast<uint32_t>(a.num_experts) ? static_cast<int>(d) : -1;
}

// Exclusive scan of one int per thread over the whole 1024-thread block; *total gets the block sum.
// scratch: [kAlignWarps + 1] shared ints. Ends with a barrier so scratch can be reused at once.
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = value;
  for (int o = 1; o < 32; o <<= 1) {
    int up = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = scratch[lane], w_incl = w;
    for (int o = 1; o < 32; o <<= 1) {
      int up = __shfl_up_sync(kFullMask, w_incl, o);
      if (lane >= o) w_incl += up;
    }
    scratch[lane] = w_incl - w;
    if (lane == 31) scratch[kAlignWarps] = w_incl;
  }
  __syncthreads();
  int excl = scratch[warp] + incl - value;
  *total = scratch[kAlignWarps];
  __syncthreads();
  return excl;
}

// The slots [begin, end) that warp w owns; slices are multiples of 32 so loads stay coalesced.
__device__ __forceinline__ void warp_slice(const AlignArgs& a, int w, int* begin, int* end) {
  int per_warp = (a.num_slots + a.count_warps - 1) / a.count_warps;
  per_warp = (per_warp + 31) & ~31;
  long long b = static_cast<long long>(w) * per_warp;
  long long e = b + per_warp;
  *begin = static_cast<int>(b < a.num_slots ? b : a.num_slots);
  *end = static_cast<int>(e < a.num_slots ? e : a.num_slots);
}

// Phase 1: table[w][e] = slots of expert e in warp w's slice.
__device__ __forceinline__ void count_slots(const AlignArgs& a, int* table) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (w >= a.count_warps) return;
  int begin, end;
  warp_slice(a, w, &begin, &end);
  int* row = table + static_cast<long long>(w) * a.num_experts;  // [num_experts]
  for (int base = begin; base < end; base += 32) {  // uniform bounds: the whole warp iterates together
    int s = base + lane;
    int e = s < end ? local_expert(a.topk_ids[s], a) : -1;
    unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) row[e] += __popc(peers);
    __syncwarp();
  }
}

// Phase 2: per-warp write cursors and per-expert totals (row count_warps of the table); returns the padded total.
__device__ __forceinline__ int scan_experts(const AlignArgs& a, int* table, int* scratch) {
  int* totals = table + static_cast<long long>(a.count_warps) * a.num_experts;  // [num_experts]
  int carry = 0;
  for (int first = 0; first < a.num_experts; first += kAlignThreads) {
    const int e = first + threadIdx.x;
    int total = 0;
    if (e < a.num_experts) {
      for (int w = 0; w < a.count_warps; ++w) {
        int* cell = table + static_cast<long long>(w) * a.num_experts + e;
        int c = *cell;
        *cell = total;
        total += c;
      }
    }
    const int padded = (total + a.block_m - 1) / a.block_m * a.block_m;
    int round_total;
    const int start = carry + block_exclusive_scan(padded, scratch, &round_total);
    if (e < a.num_experts) {
      for (int w = 0; w < a.count_warps; ++w) table[static_cast<long long>(w) * a.num_experts + e] += start;
      totals[e] = total;
      a.expert_counts[e] = total;
    }
    carry += round_total;
  }
  return carry;
}

// Phase 3: block_expert and padding rows. Warp w takes experts w*32 + lane (+ multiples of 1024); every non-empty
// expert is then filled by the whole warp, so long segments are written with coalesced stores.
__device__ __forceinline__ void fill_blocks_and_padding(const AlignArgs& a, const int* table, int used_rows) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int* starts = table;                                                       // row 0: start row of expert e
  const int* totals = table + static_cast<long long>(a.count_warps) * a.num_experts;  // [num_experts]
  for (int first = w * 32; first < a.num_experts; first += kAlignThreads) {
    const int e = first + lane;
    const int count = e < a.num_experts ? totals[e] : 0;
    const int start = e < a.num_experts ? starts[e] : 0;
    unsigned busy = __ballot_sync(kFullMask, count > 0);
    while (busy) {
      const int src = __ffs(busy) - 1;
      busy &= busy - 1;
      const int c = __shfl_sync(kFullMask, count, src);
      const int s = __shfl_sync(kFullMask, start, src);
      const int padded = (c + a.block_m - 1) / a.block_m * a.block_m;
      for (int b = lane; b < padded / a.block_m; b += 32) a.block_expert[s / a.block_m + b] = first + src;
      for (int r = c + lane; r < padded; r += 32) a.sorted_ids[s + r] = a.num_slots;
    }
  }
  for (int r = used_rows + threadIdx.x; r < a.m_pad_max; r += kAlignThreads) a.sorted_ids[r] = a.num_slots;
  const int num_blocks = a.m_pad_max / a.block_m;
  for (int b = used_rows / a.block_m + threadIdx.x; b < num_blocks; b += kAlignThreads) a.block_expert[b] = -1;
  if (threadIdx.x == 0) *a.num_padded = used_rows;
}

// Phase 4: write every local slot to its row. The group's lowest lane owns the cursor table[w][e].
__device__ __forceinline__ void place_slots(const AlignArgs& a, int* table) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (w >= a.count_warps) return;
  int begin, end;
  warp_slice(a, w, &begin, &end);
  int* row = table + static_cast<long long>(w) * a.num_experts;  // [num_experts] next row per expert
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    int s = base + lane;
    int e = s < end ? local_expert(a.topk_ids[s], a) : -1;
    unsigned peers = __match_any_sync(kFullMask, e);
    int leader = __ffs(peers) - 1;
    int cursor = (e >= 0 && lane == leader) ? row[e] : 0;
    cursor = __shfl_sync(kFullMask, cursor, leader);
    if (e >= 0) {
      a.sorted_ids[cursor + __popc(peers & lanes_below)] = s;
      if (lane == leader) row[e] = cursor + __popc(peers);
    }
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kAlignThreads, 1) moe_align_kernel(AlignArgs a) {
  extern __shared__ int table[];  // [count_warps + 1][num_experts]: per-warp counts -> cursors; last row totals
  __shared__ int scratch[kAlignWarps + 1];
  const int cells = (a.count_warps + 1) * a.num_experts;
  for (int i = threadIdx.x; i < cells; i += kAlignThreads) table[i] = 0;
  __syncthreads();
  count_slots(a, table);
  __syncthreads();
  const int used_rows = scan_experts(a, table, scratch);
  __syncthreads();
  fill_blocks_and_padding(a, table, used_rows);
  __syncthreads();
  place_slots(a, table);
}

}  // namespace jitmoe::permute
