// Exact top-k of one row under the total order (key descending, expert id ascending), in three steps:
//
//  A. bound: each thread keeps its P largest keys (P = KMAX / 32, so a warp holds >= k entries); the kw-th largest
//     entry of a warp is a key that at least kw distinct experts of that warp reach. With kw = ceil(k / nf), the
//     minimum of that value over nf warps is reached by >= k experts, so every top-k member is >= the bound.
//  B. candidates: the valid experts with key >= bound are appended to a shared-memory list (usually about k of
//     them, at most E).
//  C. selection: one warp runs k rounds of arg-max over the list (redux.sync max of the key, then min of the id
//     among the lanes that hold that key), removing each winner. Every lane learns each winner in order.
//
// Exact for any input, ties included; the bound only decides how much work step C does.
#pragma once
#include <climits>
#include <cstdint>
#include "routing/row_team.cuh"

namespace jitmoe::routing {

// This thread's P largest keys, descending (0 = none). Invalid slots must hold key 0.
template <int P, int S>
__device__ __forceinline__ void thread_top(const uint32_t (&key)[S], uint32_t (&top)[P]) {
  static_assert(P == 1 || P == 2, "top-k buckets are 32 and 64");
  top[0] = 0;
  if constexpr (P == 2) top[1] = 0;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if constexpr (P == 2) top[1] = max(top[1], min(top[0], key[s]));
    top[0] = max(top[0], key[s]);
  }
}

// The kw-th largest entry of the warp's per-thread top lists (0 if the warp holds fewer than kw real entries).
template <int P>
__device__ __forceinline__ uint32_t warp_kth_entry(const uint32_t (&top)[P], int kw) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t head = top[0];
  uint32_t next = P == 2 ? top[P - 1] : 0u;
  uint32_t m = 0;
  for (int r = 0; r < kw; ++r) {
    m = __reduce_max_sync(kFullMask, head);
    const unsigned holders = __ballot_sync(kFullMask, head == m);
    if (lane == __ffs(holders) - 1) {  // pop one entry only, so equal keys count once each
      head = next;
      next = 0;
    }
  }
  return m;
}

// Appends this thread's slots with (valid and key >= bound) to the candidate list; ck/ci: [capacity] shared.
// One warp team: the running count stays in a register (returned, equal in all lanes). Block team: each warp
// reserves its range with one shared atomic per non-empty slot; the total is read from *count after a barrier.
template <bool kBlockTeam, int S, typename ExpertOf>
__device__ __forceinline__ int push_candidates(const uint32_t (&key)[S], uint32_t valid, uint32_t bound,
                                               ExpertOf expert_of, uint32_t* ck, int32_t* ci, int* count) {
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  int base = 0;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const bool is_cand = (valid >> s & 1u) && key[s] >= bound;
    const unsigned ballot = __ballot_sync(kFullMask, is_cand);
    if (ballot == 0u) continue;  // warp-uniform
    int slot_base = base;
    if constexpr (kBlockTeam) {
      const int leader = __ffs(ballot) - 1;
      if (lane == leader) slot_base = atomicAdd(count, __popc(ballot));
      slot_base = __shfl_sync(kFullMask, slot_base, leader);
    } else {
      base += __popc(ballot);
    }
    if (is_cand) {
      const int pos = slot_base + __popc(ballot & lanes_below);
      ck[pos] = key[s];
      ci[pos] = expert_of(s);
    }
  }
  return base;
}

struct LaneBest {
  uint32_t key;
  int32_t id;   // INT_MAX: none
  int pos;      // index in the candidate list, -1: none
};

// A candidate list in shared memory as two arrays: keys ck [n] and ids ci [n] (a removed entry has id -1).
struct SplitList {
  uint32_t* ck;
  int32_t* ci;
  __device__ __forceinline__ uint32_t key(int f) const { return ck[f]; }
  __device__ __forceinline__ int32_t id(int f) const { return ci[f]; }
  __device__ __forceinline__ void remove(int f) const { ci[f] = -1; }
};

// The best remaining candidate among list positions lane, lane + G, ... (removed entries have id -1).
template <int G, typename List>
__device__ __forceinline__ LaneBest lane_best(const List& list, int n, int lane) {
  LaneBest b{0u, INT_MAX, -1};
  for (int f = lane; f < n; f += G) {
    const int32_t id = list.id(f);
    const uint32_t key = list.key(f);
    if (id >= 0 && (key > b.key || (key == b.key && id < b.id))) b = {key, id, f};
  }
  return b;
}

// Step C: k rounds of arg-max over a candidate list of n entries (consumed). On round r every lane calls
// sink(r, key, id) with the r-th best candidate. Needs n >= k (guaranteed by step A). Called by a whole lane
// group of G lanes (a warp by default) that owns the list.
template <int G = kWarpSize, typename List, typename Sink>
__device__ __forceinline__ void warp_select_list(const List& list, int n, int k, Sink&& sink) {
  using Group = LaneGroup<G>;
  const int lane = Group::lane();
  LaneBest b = lane_best<G>(list, n, lane);
  for (int r = 0; r < k; ++r) {
    const uint32_t m = Group::max_u32(b.key);
    const int32_t w = Group::min_i32(b.key == m ? b.id : INT_MAX);
    sink(r, m, w);
    if (b.pos >= 0 && b.id == w) {  // ids are unique: exactly one lane consumed this round
      list.remove(b.pos);
      b = n <= G ? LaneBest{0u, INT_MAX, -1} : lane_best<G>(list, n, lane);
    }
  }
}

template <typename Sink>
__device__ __forceinline__ void warp_select(uint32_t* ck, int32_t* ci, int n, int k, Sink&& sink) {
  warp_select_list(SplitList{ck, ci}, n, k, sink);
}

// Steps A and B for one row: returns the candidate count for warp 0 of the team (call team.sync() first in a
// block team: the count is then *count). nf: warps whose every lane holds a valid first chunk (1 for a warp team).
template <int NW, int P, int S, typename ExpertOf>
__device__ __forceinline__ int gather_candidates(const uint32_t (&key)[S], uint32_t valid, int k, int nf,
                                                 ExpertOf expert_of, const Team<NW>& team, int bound_slot,
                                                 uint32_t* ck, int32_t* ci, int* count) {
  // The warp's index inside its team: a warp team is a single warp, however many rows share the block.
  const int warp = NW == 1 ? 0 : static_cast<int>(threadIdx.x / kWarpSize);
  uint32_t top[P];
  thread_top(key, top);
  const int kw = (k + nf - 1) / nf;
  uint32_t bound = UINT_MAX;
  if (warp < nf) bound = warp_kth_entry(top, kw);  // warp-uniform branch
  bound = team.min_u32(bound, bound_slot);
  return push_candidates<(NW > 1)>(key, valid, bound, expert_of, ck, ci, count);
}

// Number of warps of a block team whose lanes all hold a real expert in their first chunk (at least 1).
template <int NW>
__device__ __forceinline__ int full_warps(int E, int chunk) {
  if constexpr (NW == 1) {
    return 1;
  } else {
    const int chunks = (E + chunk - 1) / chunk;
    return max(1, min(NW, chunks / kWarpSize));
  }
}

}  // namespace jitmoe::routing
