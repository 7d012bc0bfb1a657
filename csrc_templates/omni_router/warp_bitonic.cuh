// Warp-level bitonic top-K over unsigned keys (the larger key wins).
//
// A warp holds a tile of 32*V keys, V registers per lane; slot s = lane*V + r ("lane-major": a lane's registers
// are consecutive slots, so the low log2(V) bits of a slot never leave the lane). Each chunk of KB consecutive
// slots is sorted descending by the "flip" form of the bitonic network: at level S = 2, 4, .., KB the slots
// (s, s ^ (S-1)) are ordered (flip), then (s, s ^ d) for d = S/4, .., 1 (half-cleaners); in every pair the lower
// slot keeps the larger key. A partner inside the lane is a register compare-exchange; a partner in another lane
// arrives by __shfl_xor_sync. The chunks of a tile are then folded pairwise: every slot keeps the larger of itself
// and its mirror in the partner chunk (s ^ (S-1) at S = 2KB, 4KB, ..), which leaves in each chunk a bitonic
// sequence holding the best KB of both, and half-cleaners sort it again. After the folds every chunk holds the
// sorted best KB of the tile; tiles fold into a running list the same way. Work per lane and tile is
// O(V log^2 KB) compare-exchanges, with no shared memory and no block barrier: all lanes of the warp must call
// these functions together (warp-uniform control flow). Keys may also be KeyPair<K>: two lists sorted side by side.
#pragma once
#include <cstdint>

namespace jitmoe {
namespace warp_bitonic {

constexpr unsigned kFullMask = 0xffffffffu;

// A key wider than 64 bits: compared as the 96-bit number hi:mid:lo.
struct Key96 {
  uint32_t hi, mid, lo;
};

__device__ __forceinline__ bool key_greater(uint32_t a, uint32_t b) { return a > b; }
__device__ __forceinline__ bool key_greater(uint64_t a, uint64_t b) { return a > b; }
__device__ __forceinline__ bool key_greater(const Key96& a, const Key96& b) {
  const uint64_t a_top = (uint64_t(a.hi) << 32) | a.mid;
  const uint64_t b_top = (uint64_t(b.hi) << 32) | b.mid;
  return a_top != b_top ? a_top > b_top : a.lo > b.lo;
}

__device__ __forceinline__ uint32_t key_shfl_xor(uint32_t v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}
__device__ __forceinline__ uint64_t key_shfl_xor(uint64_t v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(v), lane_mask);
}
__device__ __forceinline__ Key96 key_shfl_xor(const Key96& v, int lane_mask) {
  return Key96{__shfl_xor_sync(kFullMask, v.hi, lane_mask), __shfl_xor_sync(kFullMask, v.mid, lane_mask),
               __shfl_xor_sync(kFullMask, v.lo, lane_mask)};
}

template <class K>
__device__ __forceinline__ K key_max(const K& a, const K& b) {
  return key_greater(b, a) ? b : a;
}

constexpr int highest_bit(int x) { return x <= 1 ? x : 2 * highest_bit(x / 2); }

// Leaves the larger key in `lower`, the smaller in `upper`.
template <class K>
__device__ __forceinline__ void order_pair(K& lower, K& upper) {
  const bool swap = key_greater(upper, lower);
  const K keep = lower;
  lower = swap ? upper : lower;
  upper = swap ? keep : upper;
}

// What a slot keeps in a cross-lane sorting stage: the larger key in the lower slot of the pair, else the smaller.
template <class K>
__device__ __forceinline__ K keep_for_slot(const K& mine, const K& partner, bool lower) {
  return (key_greater(partner, mine) == lower) ? partner : mine;
}

// Two keys of two unrelated lists riding through the network together, each ordered on its own: two lists are
// sorted in one pass, which gives every stage twice the independent compare-exchanges and shuffles (the network
// is latency-bound with one list).
template <class K>
struct KeyPair {
  K first, second;
};

template <class K>
__device__ __forceinline__ KeyPair<K> key_shfl_xor(const KeyPair<K>& v, int lane_mask) {
  return KeyPair<K>{key_shfl_xor(v.first, lane_mask), key_shfl_xor(v.second, lane_mask)};
}
template <class K>
__device__ __forceinline__ KeyPair<K> key_max(const KeyPair<K>& a, const KeyPair<K>& b) {
  return KeyPair<K>{key_max(a.first, b.first), key_max(a.second, b.second)};
}
template <class K>
__device__ __forceinline__ void order_pair(KeyPair<K>& lower, KeyPair<K>& upper) {
  order_pair(lower.first, upper.first);
  order_pair(lower.second, upper.second);
}
template <class K>
__device__ __forceinline__ KeyPair<K> keep_for_slot(const KeyPair<K>& mine, const KeyPair<K>& partner, bool lower) {
  return KeyPair<K>{keep_for_slot(mine.first, partner.first, lower), keep_for_slot(mine.second, partner.second, lower)};
}

// One network stage: slot s meets slot s ^ PMASK. Sorting stages (FOLD = false) leave the larger key in the lower
// slot of each pair; folding stages (FOLD = true) leave the larger key in both. Within a stage PMASK is either
// a power of two (half-cleaner) or 2^m - 1 (flip/mirror), so for PMASK >= V its low log2(V) bits are all zero or
// all one and its highest bit, which tells the lower slot of a pair, is a lane bit.
template <int V, int PMASK, bool FOLD, class K>
__device__ __forceinline__ void stage(K (&v)[V], int lane) {
  static_assert(V >= 1 && (V & (V - 1)) == 0, "V must be a power of two");
  if constexpr (PMASK < V) {
    static_assert(!FOLD, "folds always pair different chunks, hence different lanes");
#pragma unroll
    for (int r = 0; r < V; ++r) {
      if (r < (r ^ PMASK)) order_pair(v[r], v[r ^ PMASK]);
    }
  } else {
    constexpr int kLaneMask = PMASK / V;
    constexpr int kRegMask = PMASK % V;
    constexpr int kTopBit = highest_bit(PMASK);
    static_assert(kRegMask == 0 || kRegMask == V - 1, "partner mask must be a power of two or 2^m - 1");
    static_assert(kTopBit >= V && (kTopBit & (kTopBit - 1)) == 0, "lower slot must be told by a lane bit");
    K partner[V];
#pragma unroll
    for (int r = 0; r < V; ++r) partner[r] = key_shfl_xor(v[r ^ kRegMask], kLaneMask);
    const bool lower = (lane & (kTopBit / V)) == 0;
#pragma unroll
    for (int r = 0; r < V; ++r) {
      if constexpr (FOLD) {
        v[r] = key_max(v[r], partner[r]);
      } else {
        v[r] = keep_for_slot(v[r], partner[r], lower);
      }
    }
  }
}

// Half-cleaners with strides D, D/2, .., 1: sort every bitonic run of 2D slots descending.
template <int V, int D, class K>
__device__ __forceinline__ void half_cleaners(K (&v)[V], int lane) {
  if constexpr (D >= 1) {
    stage<V, D, false>(v, lane);
    half_cleaners<V, D / 2>(v, lane);
  }
}

// Bitonic levels S, 2S, .., KB: sorts every chunk of KB slots descending (start with S = 2).
template <int V, int S, int KB, class K>
__device__ __forceinline__ void sort_levels(K (&v)[V], int lane) {
  if constexpr (S <= KB) {
    stage<V, S - 1, false>(v, lane);
    half_cleaners<V, S / 4>(v, lane);
    sort_levels<V, 2 * S, KB>(v, lane);
  }
}

// Folds of sorted KB-chunks at S = 2KB, 4KB, .., 32V: afterwards every chunk holds the sorted best KB of the tile.
template <int V, int S, int KB, class K>
__device__ __forceinline__ void fold_levels(K (&v)[V], int lane) {
  if constexpr (S <= 32 * V) {
    stage<V, S - 1, true>(v, lane);
    half_cleaners<V, KB / 2>(v, lane);
    fold_levels<V, 2 * S, KB>(v, lane);
  }
}

// best := sorted best KB of (best ∪ tile), both sorted descending in every chunk. Slot s meets the mirror
// s ^ (KB-1) of the other list: lane ^ (KB/V - 1), register V-1-r.
template <int V, int KB, class K>
__device__ __forceinline__ void merge_sorted(K (&best)[V], const K (&tile)[V], int lane) {
#pragma unroll
  for (int r = 0; r < V; ++r) best[r] = key_max(best[r], key_shfl_xor(tile[V - 1 - r], KB / V - 1));
  half_cleaners<V, KB / 2>(best, lane);
}

// The KB largest keys of `count` keys, sorted descending: position p ends in lane p / V, register p % V (and again
// in every other chunk of KB/V lanes). load(base, tile) fills slot (lane, r) with key number base + lane*V + r, or a
// key below every real key when that number is >= count. Positions past `count` hold such filler keys.
template <int V, int KB, class K, class LoadTile>
__device__ __forceinline__ void top_keys(int count, LoadTile&& load, K (&best)[V], int lane) {
  static_assert((KB & (KB - 1)) == 0 && KB >= V && KB <= 32 * V, "a chunk of KB slots must fit in one tile");
  for (int base = 0; base < count; base += 32 * V) {
    K tile[V];
    load(base, tile);
    sort_levels<V, 2, KB>(tile, lane);
    fold_levels<V, 2 * KB, KB>(tile, lane);
    if (base == 0) {
#pragma unroll
      for (int r = 0; r < V; ++r) best[r] = tile[r];
    } else {
      merge_sorted<V, KB>(best, tile, lane);
    }
  }
}

}  // namespace warp_bitonic
}  // namespace jitmoe
