// Warp-level pruning before a top-K: a threshold that at least `need` of the warp's keys reach, and compaction of
// the keys (or of a payload) that reach it into shared memory, so that the sorting network only sees those.
//
// Threshold. Each lane holds V 32-bit order keys (0 = an empty slot, below every real key). The smallest of the
// lane maxima is reached by at least one key of every lane, hence by 32 >= need keys, unless a lane is empty (then
// the threshold starts at 1, every real key, and the bisection at the smallest maximum of a non-empty lane). From
// there STEPS rounds of bisection in value space raise it: the probe is the key of the midpoint of the lowest
// accepted and the highest rejected value, counted over the warp with one redux.sync, and accepted when at least
// `need` keys reach it. Every accepted threshold is counted, so the result
// holds at least `need` keys whatever the values are (NaN and infinities only make the probes useless). Keys
// below the threshold are therefore beaten by at least `need` others: a top-`need` never loses one of its members.
#pragma once
#include <cstdint>

#include "omni_router/warp_bitonic.cuh"

namespace jitmoe {
namespace warp_prune {

template <int V>
__device__ __forceinline__ int count_at_least(const uint32_t (&keys)[V], uint32_t threshold) {
  int mine = 0;
#pragma unroll
  for (int r = 0; r < V; ++r) mine += keys[r] >= threshold ? 1 : 0;
  return static_cast<int>(__reduce_add_sync(warp_bitonic::kFullMask, static_cast<unsigned>(mine)));
}

// value_of(key) -> float and key_of(value) -> key are monotone (key_of(value_of(k)) <= k is not needed: every
// probe is counted). Returns a threshold >= 1 (empty slots never pass) reached by at least `need` (<= 32) keys.
template <int STEPS, int V, class ValueOf, class KeyOf>
__device__ __forceinline__ uint32_t threshold(const uint32_t (&keys)[V], int need, ValueOf&& value_of,
                                              KeyOf&& key_of) {
  uint32_t lane_max = keys[0];
#pragma unroll
  for (int r = 1; r < V; ++r) lane_max = max(lane_max, keys[r]);
  constexpr unsigned kAll = warp_bitonic::kFullMask;
  // The smallest maximum of a non-empty lane: where the bisection starts even when some lanes are empty.
  const uint32_t smallest_max = __reduce_min_sync(kAll, lane_max == 0 ? 0xFFFFFFFFu : lane_max);
  uint32_t accepted = __any_sync(kAll, lane_max == 0) ? 1u : smallest_max;
  float low = value_of(smallest_max);
  float high = value_of(__reduce_max_sync(kAll, lane_max));
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const float mid = 0.5f * low + 0.5f * high;
    const uint32_t probe = key_of(mid);
    if (count_at_least(keys, probe) >= need) {
      accepted = max(accepted, probe);
      low = mid;
    } else {
      high = mid;
    }
  }
  return accepted;
}

// Writes payload[r] of every slot with keep[r] to out[0 .. count) (in an order fixed by the slots) and returns
// count, the same on every lane. The caller orders these writes before any read of out (__syncwarp).
template <int V, class P>
__device__ __forceinline__ int compact(const P (&payload)[V], const bool (&keep)[V],
                                       P* out,  // [32 * V] shared, this warp's
                                       int lane) {
  const unsigned lanes_below = (1u << lane) - 1u;
  int count = 0;
#pragma unroll
  for (int r = 0; r < V; ++r) {
    const unsigned ballot = __ballot_sync(warp_bitonic::kFullMask, keep[r]);
    if (keep[r]) out[count + __popc(ballot & lanes_below)] = payload[r];
    count += __popc(ballot);
  }
  return count;
}

}  // namespace warp_prune
}  // namespace jitmoe
