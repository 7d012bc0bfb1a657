// Warp and block primitives of the Expert Choice kernels (blocks of kBlock threads; Scratch holds the broadcasts).
// Every block-wide helper ends with a barrier after the last read of its scratch slots, so calls can follow each
// other without extra synchronisation. All of them must be reached by every thread of the block.
#pragma once
#include "expert_choice/ec_params.cuh"

namespace jitmoe::ec {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Max of a 64-bit value over the warp in two redux.sync (sm_80+): the high words, then the low words of the lanes
// holding the top high word.
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
  const unsigned v_hi = static_cast<unsigned>(v >> 32);
  const unsigned hi = __reduce_max_sync(kFullWarp, v_hi);
  const unsigned lo = __reduce_max_sync(kFullWarp, v_hi == hi ? static_cast<unsigned>(v) : 0u);
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Butterfly max of R values at once (each its own warp max), so that independent shuffle chains overlap.
template <int R>
__device__ __forceinline__ void warp_max_f32_rows(float (&v)[R]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = fmaxf(v[r], __shfl_xor_sync(kFullWarp, v[r], offset));
}

// Sums over the warp of R values at once, rounded per add, as a halving tree over the lanes would (the butterfly's
// adds are the tree's, and fp32 addition is commutative, so every lane ends with the tree's bits).
template <int R>
__device__ __forceinline__ void warp_sum_tree_f32_rows(float (&v)[R]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = __fadd_rn(v[r], __shfl_xor_sync(kFullWarp, v[r], offset));
}

__device__ __forceinline__ float warp_max_f32(float v) {
  float rows[1] = {v};
  warp_max_f32_rows<1>(rows);
  return rows[0];
}

__device__ __forceinline__ float warp_sum_tree_f32(float v) {
  float rows[1] = {v};
  warp_sum_tree_f32_rows<1>(rows);
  return rows[0];
}

__device__ __forceinline__ unsigned warp_sum_u32(unsigned v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

__device__ __forceinline__ unsigned block_sum_u32(unsigned v, Scratch* sc) {
  v = warp_sum_u32(v);
  if (lane_id() == 0) sc->warp_total[warp_id()] = v;
  __syncthreads();
  if (warp_id() == 0) {
    const unsigned total = warp_sum_u32(sc->warp_total[lane_id()]);
    if (lane_id() == 0) sc->uvalue = total;
  }
  __syncthreads();
  const unsigned total = sc->uvalue;
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_max_f32(float v, Scratch* sc) {
  v = warp_max_f32(v);
  if (lane_id() == 0) sc->warp_total[warp_id()] = __float_as_uint(v);
  __syncthreads();
  if (warp_id() == 0) {
    const float m = warp_max_f32(__uint_as_float(sc->warp_total[lane_id()]));
    if (lane_id() == 0) sc->fvalue = m;
  }
  __syncthreads();
  const float m = sc->fvalue;
  __syncthreads();
  return m;
}

// Inclusive prefix sum over the warp's lanes in lane order.
__device__ __forceinline__ unsigned warp_inclusive_scan_u32(unsigned v) {
  const int lane = lane_id();
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned up = __shfl_up_sync(kFullWarp, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Inclusive prefix sum over a block of NW warps in thread order; *total receives the block's sum.
template <int NW = kWarps>
__device__ __forceinline__ unsigned block_inclusive_scan(unsigned v, Scratch* sc, unsigned* total) {
  static_assert(NW >= 1 && NW <= 32, "one warp scans the warp totals");
  const int lane = lane_id();
  v = warp_inclusive_scan_u32(v);
  if (lane == 31) sc->warp_total[warp_id()] = v;
  __syncthreads();
  if (warp_id() == 0) {
    const unsigned w = warp_inclusive_scan_u32(lane < NW ? sc->warp_total[lane] : 0u);
    if (lane < NW) sc->warp_total[lane] = w;  // now inclusive over warps
  }
  __syncthreads();
  if (warp_id() > 0) v += sc->warp_total[warp_id() - 1];
  *total = sc->warp_total[NW - 1];
  __syncthreads();
  return v;
}

// Phases of one launch hand over through counters: a block's writes are released before it counts itself done,
// and a waiting block sees every write of the blocks it waited for. Waiters hold later tickets than the blocks they
// wait on, which are therefore already running: no deadlock, however many blocks are resident.
// __syncthreads() is an aligned barrier: a warp split by a one-thread branch must reconverge before it, or its
// halves count towards different barriers (compute-sanitizer synccheck caught this after `if (tid == 0)` blocks).
__device__ __forceinline__ void converged_syncthreads() {
  __syncwarp();
  __syncthreads();
}

__device__ __forceinline__ void signal_done(unsigned* counter) {
  __threadfence();
  converged_syncthreads();
  if (threadIdx.x == 0) atomicAdd(counter, 1u);
}

__device__ __forceinline__ void wait_for(unsigned* counter, int blocks) {
  if (threadIdx.x == 0) {
    while (atomicAdd(counter, 0u) < static_cast<unsigned>(blocks)) __nanosleep(256);
    __threadfence();
  }
  converged_syncthreads();
}

// hist[digit] += 1 for every active lane, one shared atomic per distinct digit in the warp (equal digits are common:
// most scores share their exponent). Must be reached by the whole warp.
__device__ __forceinline__ void histogram_add(unsigned* hist, bool active, unsigned digit) {
  if (__ballot_sync(kFullWarp, active) == 0) return;  // common once the prefix is narrow
  const unsigned value = active ? digit : 0xFFFFFFFFu;  // digits are < kBins, so inactive lanes group apart
  const unsigned peers = __match_any_sync(kFullWarp, value);
  if (active && lane_id() == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
}

// list[*size ...] = item for every active lane (order within the list is unspecified). Whole warp.
__device__ __forceinline__ void list_append(unsigned* list, unsigned* size, bool active, unsigned item) {
  const unsigned ballot = __ballot_sync(kFullWarp, active);
  if (ballot == 0) return;
  const int leader = __ffs(ballot) - 1;
  unsigned base = 0;
  if (lane_id() == leader) base = atomicAdd(size, static_cast<unsigned>(__popc(ballot)));
  base = __shfl_sync(kFullWarp, base, leader);
  if (active) list[base + __popc(ballot & ((1u << lane_id()) - 1u))] = item;
}

}  // namespace jitmoe::ec
