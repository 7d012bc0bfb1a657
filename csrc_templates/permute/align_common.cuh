// Building blocks shared by the two moe_align kernels (single CTA: moe_align.cuh; many CTAs: moe_align_multi.cuh).
//
// Both kernels order slots the same way: a range of slots is cut into contiguous, 32-aligned slices, one per warp.
// A warp walks its slice 32 slots at a time; __match_any_sync groups the lanes by expert, so the group's lowest
// lane can update the warp's per-expert counter once per step, and a lane's rank inside its group is the number
// of same-expert lanes below it. Counting a slice and later placing it with the same walk therefore writes every
// expert's slots in ascending slot order.
#pragma once
#include <cstdint>

#include "common/pdl.cuh"

namespace jitmoe::permute {

constexpr unsigned kFullMask = 0xffffffffu;

// What both kernels read and write.
struct AlignArgs {
  const int32_t* topk_ids;  // [num_slots] global expert id of every slot
  int32_t* sorted_ids;      // [m_pad_max] slot per row of the expert-sorted order; num_slots marks padding
  int32_t* block_expert;    // [m_pad_max / block_m] local expert of every block_m rows, -1 when unused
  int32_t* num_padded;      // [1] rows in use (a multiple of block_m)
  int32_t* expert_counts;   // [num_experts] slots per local expert
  int32_t* slot_rows;       // [num_slots] the row of every slot (-1: not local), the inverse that GEMM1's gather
                            // needs; nullptr: not wanted
  int num_slots;            // T * topk
  int num_experts;          // local experts
  int expert_offset;        // global id of local expert 0
  int block_m;              // GEMM tile rows
  int m_pad_max;            // static bound on the padded length (a multiple of block_m)
  int count_warps;          // warps that own a slice of a CTA's slots (each needs num_experts ints of shared memory)
  int32_t* block_done;      // [m_pad_max / block_m] zeroed here (the sm90ws GEMMs' per-block completion counters:
                            // GEMM1 counts up, GEMM2 waits), or nullptr
};

// Local expert of a global id, or -1 (unsigned wrap-around keeps the subtraction defined for any id).
__device__ __forceinline__ int local_expert(int32_t id, const AlignArgs& a) {
  uint32_t d = static_cast<uint32_t>(id) - static_cast<uint32_t>(a.expert_offset);
  return d < static_cast<uint32_t>(a.num_experts) ? static_cast<int>(d) : -1;
}

__device__ __forceinline__ int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Exclusive scan of one int per thread over a block of kWarps full warps; *total gets the block sum.
// scratch: [kWarps + 1] shared ints. Ends with a barrier so scratch can be reused at once.
template <int kWarps>
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch, int* total) {
  static_assert(kWarps >= 1 && kWarps <= 32, "the second level is one warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = value;
  for (int o = 1; o < 32; o <<= 1) {
    int up = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? scratch[lane] : 0, w_incl = w;
    for (int o = 1; o < 32; o <<= 1) {
      int up = __shfl_up_sync(kFullMask, w_incl, o);
      if (lane >= o) w_incl += up;
    }
    if (lane < kWarps) scratch[lane] = w_incl - w;
    if (lane == 31) scratch[kWarps] = w_incl;
  }
  __syncthreads();
  int excl = scratch[warp] + incl - value;
  *total = scratch[kWarps];
  __syncthreads();
  return excl;
}

// The part of [begin, end) that warp w of `warps` owns; parts are multiples of 32 so loads stay coalesced.
__device__ __forceinline__ void warp_slice(int begin, int end, int warps, int w, int* slice_begin, int* slice_end) {
  int per_warp = (end - begin + warps - 1) / warps;
  per_warp = (per_warp + 31) & ~31;
  long long b = begin + static_cast<long long>(w) * per_warp;
  long long e = b + per_warp;
  *slice_begin = static_cast<int>(b < end ? b : end);
  *slice_end = static_cast<int>(e < end ? e : end);
}

// counts[e] += slots of expert e in [begin, end), walked by one warp. kShared: other warps add to the same
// counts, so the group leader adds atomically; otherwise the warp owns counts and a plain add is exact.
template <bool kShared>
__device__ __forceinline__ void count_slice(const AlignArgs& a, int begin, int end, int* counts /* [E] */) {
  const int lane = threadIdx.x & 31;
  for (int base = begin; base < end; base += 32) {  // uniform bounds: the whole warp iterates together
    int s = base + lane;
    int e = s < end ? local_expert(a.topk_ids[s], a) : -1;
    unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) {
      if (kShared) {
        atomicAdd(counts + e, __popc(peers));
      } else {
        counts[e] += __popc(peers);
      }
    }
    __syncwarp();
  }
}

// Writes every local slot of [begin, end) to its row, walked by one warp that owns cursor[e] (the next row of
// expert e); the group's lowest lane reads and advances the cursor. With slot_rows, also every slot's row.
__device__ __forceinline__ void place_slice(const AlignArgs& a, int begin, int end, int* cursor /* [E] */) {
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    int s = base + lane;
    int e = s < end ? local_expert(a.topk_ids[s], a) : -1;
    unsigned peers = __match_any_sync(kFullMask, e);
    int leader = __ffs(peers) - 1;
    int row = (e >= 0 && lane == leader) ? cursor[e] : 0;
    row = __shfl_sync(kFullMask, row, leader);
    if (e >= 0) {
      a.sorted_ids[row + __popc(peers & lanes_below)] = s;
      if (lane == leader) cursor[e] = row + __popc(peers);
    }
    if (a.slot_rows != nullptr && s < end) a.slot_rows[s] = e >= 0 ? row + __popc(peers & lanes_below) : -1;
    __syncwarp();
  }
}

// Turns column e of table [warps][E] into exclusive prefixes over the warps; returns the column total.
__device__ __forceinline__ int warp_column_prefix(int* table, int warps, int num_experts, int e) {
  int running = 0;
  for (int w = 0; w < warps; ++w) {
    int* cell = table + static_cast<long long>(w) * num_experts + e;
    const int c = *cell;
    *cell = running;
    running += c;
  }
  return running;
}

// Block_expert and padding rows of expert e (count slots from row start), written by the whole warp. The kernels
// give each warp every n-th expert, so all warps share the work (a warp walking 32 experts one after the other
// was most of the launch's time: 6.6 us at E = 8 against 14.7 at E = 64 for 128 slots on the H100).
__device__ __forceinline__ void fill_expert(const AlignArgs& a, int e, int count, int start) {
  const int lane = threadIdx.x & 31;
  if (count <= 0) return;  // uniform: one expert per warp
  const int padded = round_up(count, a.block_m);
  for (int b = lane; b < padded / a.block_m; b += 32) a.block_expert[start / a.block_m + b] = e;
  for (int r = count + lane; r < padded; r += 32) a.sorted_ids[start + r] = a.num_slots;
}

// The unused tail: padding rows from used_rows on and -1 blocks; thread `index` of `stride` threads. Also every
// block's completion counter, when there are counters.
__device__ __forceinline__ void fill_tail(const AlignArgs& a, int used_rows, int index, int stride) {
  for (long long r = used_rows + index; r < a.m_pad_max; r += stride) a.sorted_ids[r] = a.num_slots;
  const int num_blocks = a.m_pad_max / a.block_m;
  for (long long b = used_rows / a.block_m + index; b < num_blocks; b += stride) a.block_expert[b] = -1;
  if (a.block_done != nullptr)
    for (int b = index; b < num_blocks; b += stride) a.block_done[b] = 0;
}

}  // namespace jitmoe::permute
