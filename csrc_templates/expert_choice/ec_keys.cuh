// Expert Choice, key path (normalize_over="experts", T <= kKeyMaxTokens, E <= 32 * kKeyMaxChunks): three launches,
// every score computed once in a row-major pass and kept as a 16-bit key, so that each expert reads one short
// dense column instead of candidate lists built with atomics.
//   1. score_keys_kernel: one warp per token computes the token's softmax statistics and scores (the exact recipe of
//      ec_scores.cuh). A block transposes the keys of kKeyTileTokens tokens in shared memory and writes them
//      expert-major, [E, key_pitch]. key16 = the score's top 16 bits (exponent and 7 mantissa bits), scores below
//      2^-23 sharing the lowest key, plus one: 0 marks padding. key16 order is score order, up to ties.
//   2. select_keys_kernel: one block per expert loads its key column into shared memory and histograms it (a bin
//      per key16); a block scan finds the bin b where the take-th best token falls. One pass over the column (in
//      warp runs, 8 keys a load) counts the keys above b and lists b's tokens, which are resolved exactly: they get
//      their full 64-bit column keys (recomputed scores, ~token) and theta = the take-th best of the whole column.
//      A token is picked when its key16 > b, or key16 == b and its column key >= theta, which is column key >=
//      theta. Token-major, the block then writes its column of pick bits (one word per 32 tokens) and is done;
//      expert-major, a second pass lists the picked tokens in token order (in shared memory when they fit) and
//      scores them in one parallel pass.
//   3. finalize_kernel (token-major): one warp per token of a 32-token tile reads the tile's pick bits, scores only
//      the experts that picked the token and ranks them; the tokens that need a fallback expert (fewer picks than
//      top_k) or picks beyond a warp's 32 lanes are routed from their rows (ec_finalize.cuh) in a block-wide queue.
// The keys take 2 bytes per score, read once from L2 by the selectors, and the picks cross to the finalizers as
// bits: no candidate sampling, no bounds, no scattered pick lists.
#pragma once
#include "common/pdl.cuh"
#include "expert_choice/ec_finalize.cuh"
#include "expert_choice/ec_select.cuh"

namespace jitmoe::ec {

constexpr int kKeyRowWarps = kKeyRowThreads / 32;
constexpr int kKeySelectWarps = kKeySelectThreads / 32;

__device__ __forceinline__ unsigned key16_of(unsigned score_bits) {
  return max(score_bits >> 16, kKeyFloor) - kKeyFloor + 1u;
}

// ---- 1. score keys ------------------------------------------------------------------------------------------------
constexpr int kKeyTokensPerWarp = kKeyTileTokens / kKeyRowWarps;

// Rows a warp loads before scoring them (one memory round trip for its tokens), as registers allow.
template <int NCH>
constexpr int key_rows_in_flight() {
  return NCH <= 8 ? kKeyTokensPerWarp : 1;
}

// Block b scores tokens [32b, 32b + 32), 4 per warp, and writes their keys expert-major. Block 0 also zeroes
// (token-major) the per-expert counts that the finalizers add to. kFull: E == 32 * NCH (no per-expert checks; with
// NCH <= 8 four blocks fit an SM, so a T = 16384 grid is one wave on an H100).
template <int NCH, bool kFull>
constexpr int key_row_min_blocks() {
  return NCH > 8 ? 1 : kFull ? 4 : 3;
}

template <typename In, int NCH, bool kFull>
__global__ void __launch_bounds__(kKeyRowThreads, key_row_min_blocks<NCH, kFull>()) score_keys_kernel(Params<In> p) {
  extern __shared__ __align__(16) unsigned char ec_smem[];
  pdl_start();
  unsigned* tile = reinterpret_cast<unsigned*>(ec_smem);  // [E, kKeyTilePitch] words, 2 keys each
  unsigned short* tile_keys = reinterpret_cast<unsigned short*>(ec_smem);
  constexpr int kRows = key_rows_in_flight<NCH>();
  const int t0 = blockIdx.x * kKeyTileTokens;
  const int lane = lane_id();
  if (blockIdx.x == 0 && !p.expert_major)
    for (int e = threadIdx.x; e < p.E; e += kKeyRowThreads) p.counts[e] = 0;
  // Every warp scores all its rows, padding and rows past T included (the last row stands in for those), so the
  // warp's shuffles never sit in a branch; their keys are 0.
  for (int i0 = 0; i0 < kKeyTokensPerWarp; i0 += kRows) {
    float v[kRows][NCH];
    int ts[kRows];
    bool in_range[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      ts[r] = t0 + warp_id() + kKeyRowWarps * (i0 + r);
      in_range[r] = ts[r] < p.T;
      load_row<In, NCH, kFull>(p, min(ts[r], p.T - 1), v[r]);
    }
    score_loaded_rows<In, NCH, kRows>(p, ts, v, in_range);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = ts[r] - t0;
      const bool real = in_range[r] && token_is_real(p.token_mask, ts[r]);
      unsigned short* keys = tile_keys + i + 2 * kKeyTilePitch * lane;  // expert e's key at keys[2 * kKeyTilePitch * e]
#pragma unroll
      for (int j = 0; j < NCH; ++j) {
        const unsigned key = real ? key16_of(__float_as_uint(v[r][j])) : 0u;
        if (kFull || lane + 32 * j < p.E) keys[2 * kKeyTilePitch * 32 * j] = static_cast<unsigned short>(key);
      }
    }
  }
  __syncthreads();
  constexpr int kWords = kKeyTileTokens / 2;  // words of one expert's run of keys
  unsigned* out = reinterpret_cast<unsigned*>(p.keys) + t0 / 2;  // [E, key_pitch / 2] words
  for (int i = threadIdx.x; i < p.E * kWords; i += kKeyRowThreads) {
    const int e = i / kWords, w = i % kWords;
    out[static_cast<size_t>(e) * (p.key_pitch / 2) + w] = tile[e * kKeyTilePitch + w];
  }
}

// ---- 2. select ----------------------------------------------------------------------------------------------------
struct KeySelectorSmem {
  Scratch* sc;
  unsigned* hist;                 // [kKeyBins] tokens per key16; [256] per digit in the radix passes
  unsigned long long* rank_keys;  // [kRankList] column keys of the boundary bin's tokens
  unsigned* list;                 // [kRankList] the boundary bin's tokens
  unsigned short* column;         // [key_pitch] the expert's keys
};

__device__ __forceinline__ KeySelectorSmem key_selector_smem(unsigned char* smem) {
  unsigned* hist = reinterpret_cast<unsigned*>(smem + kScratchBytes);
  auto* rank_keys = reinterpret_cast<unsigned long long*>(hist + kKeyBins);
  unsigned* list = reinterpret_cast<unsigned*>(rank_keys + kRankList);
  return KeySelectorSmem{reinterpret_cast<Scratch*>(smem), hist, rank_keys, list,
                         reinterpret_cast<unsigned short*>(list + kRankList)};
}

// Warp: the bin of hist[0, n_bins) (n_bins a multiple of 128), counted from the top, that holds the rank-th largest
// item: sc->digit = the bin, sc->rank = the rank within it, sc->count = its size. Needs 1 <= rank <= the total.
__device__ void find_bin_from_top(const unsigned* hist, int n_bins, unsigned rank, Scratch* sc) {
  const int lane = lane_id();
  unsigned above = 0;  // items in the bins above the current rows
  for (int row = 0; row < n_bins / 32; row += 4) {  // four rows of 32 descending bins per step
    unsigned n[4], total[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      n[r] = hist[n_bins - 1 - (row + r) * 32 - lane];
      total[r] = __reduce_add_sync(kFullWarp, n[r]);
    }
    // The first of the four rows where the count from the top reaches rank (selects, not an early exit inside the
    // unrolled loop: that left n[] in local memory).
    int hit = -1;
    unsigned hit_above = 0, hit_n = 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (hit < 0 && above + total[r] >= rank) {  // uniform
        hit = r;
        hit_above = above;
        hit_n = n[r];
      }
      above += total[r];
    }
    if (hit < 0) continue;
    const unsigned incl = warp_inclusive_scan_u32(hit_n);
    const unsigned excl = hit_above + incl - hit_n;
    if (excl < rank && rank <= excl + hit_n) {
      sc->digit = n_bins - 1 - (row + hit) * 32 - lane;
      sc->rank = rank - excl;
      sc->count = hit_n;
    }
    return;
  }
}

// Block: the key16 bin, counted from the top, that holds the rank-th best token, as find_bin_from_top gives it, with
// every thread summing kBinsPerThread bins and one block scan (the single-warp walk was a chain of ~100 steps).
constexpr int kBinsPerThread = kKeyBins / kKeySelectThreads;
static_assert(kBinsPerThread * kKeySelectThreads == kKeyBins, "the key bins split evenly over the selector threads");

__device__ void find_key_bin(const unsigned* hist, unsigned rank, Scratch* sc) {
  const int top = kKeyBins - 1 - threadIdx.x * kBinsPerThread;  // this thread's bins: top, top - 1, ...
  unsigned n[kBinsPerThread], mine = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) mine += n[i] = hist[top - i];
  unsigned total = 0;
  unsigned above = block_inclusive_scan<kKeySelectWarps>(mine, sc, &total) - mine;  // in the bins above this thread's
  if (above < rank && rank <= above + mine) {
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      if (above < rank && rank <= above + n[i]) {
        sc->digit = static_cast<unsigned>(top - i);
        sc->rank = rank - above;
        sc->count = n[i];
      }
      above += n[i];
    }
  }
  converged_syncthreads();
}

// theta of a boundary bin too large to rank pairwise: 8-bit digits of the 64-bit column key from the top, each pass
// recomputing the bin's keys (only inputs with masses of tied or tiny scores get here).
template <typename In>
__device__ unsigned long long radix_in_bin(const Params<In>& p, const KeySelectorSmem& s, const ColumnItems<In>& items,
                                           unsigned bin, unsigned rank) {
  const int tid = threadIdx.x;
  unsigned long long prefix = 0, mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int d = tid; d < 256; d += kKeySelectThreads) s.hist[d] = 0;
    converged_syncthreads();
    for (int base = 0; base < p.key_pitch; base += kKeySelectThreads) {  // uniform trip count (warp helpers)
      const int t = base + tid;
      bool active = false;
      unsigned digit = 0;
      if (t < p.T && s.column[t] == bin) {
        const unsigned long long key = items(t);
        active = (key & mask) == prefix;
        digit = static_cast<unsigned>(key >> shift) & 0xFFu;
      }
      histogram_add(s.hist, active, digit);
    }
    converged_syncthreads();
    if (warp_id() == 0) find_bin_from_top(s.hist, 256, rank, s.sc);
    converged_syncthreads();
    prefix |= static_cast<unsigned long long>(s.sc->digit) << shift;
    mask |= 0xFFull << shift;
    rank = s.sc->rank;
    converged_syncthreads();
  }
  return prefix;
}

// The picked mark: a key above every real key16. Once the boundary bin is resolved its tokens are rewritten to this
// (picked) or 0 (not picked), so that expert e picks token t exactly when column[t] > the boundary key16.
constexpr unsigned short kPickedKey = 0xFFFF;

// The column in runs: warp w owns chunks (8 keys, 16 bytes) [w * per_run, (w + 1) * per_run), a contiguous run of
// tokens, and its lane l reads chunk c0 + l of each 32-chunk step (conflict-free 16-byte shared loads). A pick's
// place in the token-ordered list is then the picks of the runs before its own plus those before it in its run.
__device__ __forceinline__ int chunks_per_run(int key_pitch) {
  constexpr int kRunStep = 32 * kKeySelectWarps;
  return (key_pitch / 8 + kRunStep - 1) / kRunStep * 32;
}

// Key j (token 8c + j) of chunk c.
__device__ __forceinline__ unsigned chunk_key(const uint4& v, int j) {
  const unsigned w = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
  return (j & 1) ? w >> 16 : w & 0xFFFFu;
}

// Per run, the keys above `bin` (s.sc->run_picks[warp]); with `collect`, the tokens whose key is `bin` appended to
// s.list (the caller zeroes s.sc->n_list and guarantees at most kRankList of them).
__device__ void count_runs(const KeySelectorSmem& s, int key_pitch, unsigned bin, bool collect) {
  const int per_run = chunks_per_run(key_pitch);
  const int begin = warp_id() * per_run, end = min(key_pitch / 8, begin + per_run);
  const uint4* chunks = reinterpret_cast<const uint4*>(s.column);
  unsigned above = 0;
  for (int c = begin + lane_id(); c < end; c += 32) {
    const uint4 v = chunks[c];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const unsigned key = chunk_key(v, j);
      above += key > bin ? 1u : 0u;
      if (collect && key == bin) s.list[atomicAdd(&s.sc->n_list, 1u)] = static_cast<unsigned>(8 * c + j);
    }
  }
  above = __reduce_add_sync(kFullWarp, above);
  if (lane_id() == 0) s.sc->run_picks[warp_id()] = above;
}

// theta = the rank-th best column key among the n_bin tokens of key16 `bin` (listed in s.list by count_runs when
// n_bin <= kRankList); marks those tokens picked or not and adds the picked ones to their runs' counts.
template <typename In>
__device__ unsigned long long resolve_bin(const Params<In>& p, const KeySelectorSmem& s, const ColumnItems<In>& items,
                                          unsigned bin, unsigned rank, unsigned n_bin) {
  const int tid = threadIdx.x;
  if (n_bin > static_cast<unsigned>(kRankList)) {
    const unsigned long long theta = radix_in_bin(p, s, items, bin, rank);
    for (int t = tid; t < p.T; t += kKeySelectThreads)
      if (s.column[t] == bin) s.column[t] = items(t) >= theta ? kPickedKey : 0;
    converged_syncthreads();
    count_runs(s, p.key_pitch, bin, false);  // recount: the bin's picked tokens are above it now
    converged_syncthreads();
    return theta;
  }
  const bool mine = tid < static_cast<int>(n_bin);
  const int t = mine ? static_cast<int>(s.list[tid]) : 0;
  const unsigned long long key = mine ? items(t) : 0ull;
  if (mine) s.rank_keys[tid] = key;
  converged_syncthreads();
  if (mine) {  // keys are unique: exactly one has rank - 1 keys above it
    unsigned above = 0;
    for (unsigned j = 0; j < n_bin; ++j) above += s.rank_keys[j] > key ? 1u : 0u;
    if (above == rank - 1) s.sc->key = key;
    const bool picked = above < rank;
    s.column[t] = picked ? kPickedKey : 0;
    if (picked) atomicAdd(&s.sc->run_picks[t / 8 / chunks_per_run(p.key_pitch)], 1u);
  }
  converged_syncthreads();
  const unsigned long long theta = s.sc->key;
  converged_syncthreads();
  return theta;
}

// Writes the tokens with column[t] > above, in increasing order, to row[0, take): each run from its offset, one warp
// scan per 32-chunk step. Shared memory reads and plain stores only; the scores come in a parallel pass after.
__device__ void list_picked_tokens(const KeySelectorSmem& s, int key_pitch, unsigned above, int32_t* row) {
  const int lane = lane_id(), warp = warp_id();
  const int per_run = chunks_per_run(key_pitch);
  const int begin = warp * per_run, end = min(key_pitch / 8, begin + per_run);
  const uint4* chunks = reinterpret_cast<const uint4*>(s.column);
  unsigned pos = 0;
  for (int w = 0; w < warp; ++w) pos += s.sc->run_picks[w];
  for (int c0 = begin; c0 < end; c0 += 32) {  // uniform trip count: warp scans inside
    const int c = c0 + lane;
    const uint4 v = c < end ? chunks[c] : make_uint4(0u, 0u, 0u, 0u);
    unsigned mask = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) mask |= (chunk_key(v, j) > above ? 1u : 0u) << j;
    const unsigned n = __popc(mask);
    const unsigned incl = warp_inclusive_scan_u32(n);
    unsigned at = pos + incl - n;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if ((mask >> j) & 1u) row[at++] = 8 * c + j;
    pos += __shfl_sync(kFullWarp, incl, 31);
  }
  converged_syncthreads();  // the row is read back by other threads of the block
}

// The expert-major row of expert e: its picks row[0, take) (in shared or global memory) with their scores, two per
// thread in flight.
template <typename In>
__device__ void score_picks(const Params<In>& p, const ColumnKeys<In>& col, const int32_t* row, bool row_in_smem,
                            unsigned take) {
  const int e = col.expert;
  int32_t* row_ids = p.ids + static_cast<size_t>(e) * p.capacity;        // [capacity]
  float* row_weights = p.weights + static_cast<size_t>(e) * p.capacity;  // [capacity]
  for (unsigned i0 = threadIdx.x; i0 < take; i0 += 2 * kKeySelectThreads) {
    int t[2];
    unsigned bits[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const unsigned i = i0 + q * kKeySelectThreads;
      // a global row was written by other threads of this block: read it from L2
      t[q] = i >= take ? -1 : (row_in_smem ? row[i] : __ldcg(row + i));
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) bits[q] = t[q] >= 0 ? col(t[q]) : 0u;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (t[q] < 0) continue;
      row_ids[i0 + q * kKeySelectThreads] = t[q];
      row_weights[i0 + q * kKeySelectThreads] = __uint_as_float(bits[q]);
    }
  }
}

// Token-major: expert e's column of pick bits, bit i of word w set when expert e picked token 32 w + i (once the
// boundary bin is resolved, exactly the tokens whose column key exceeds `above`).
template <typename In>
__device__ void write_pick_bits(const Params<In>& p, const KeySelectorSmem& s, int e, unsigned above) {
  const int words = p.key_pitch / kKeyTileTokens;
#pragma unroll 4
  for (int w = warp_id(); w < words; w += kKeySelectWarps) {
    const unsigned bits = __ballot_sync(kFullWarp, s.column[kKeyTileTokens * w + lane_id()] > above);
    if (lane_id() == 0) p.pick_bits[static_cast<size_t>(w) * p.E + e] = bits;
  }
}

// Loads expert e's key column into shared memory and histograms it: four 16-byte chunks of 8 keys in flight per
// thread. Padding (key 0) is counted per warp, since masked batches would pile it onto one shared counter.
template <typename In>
__device__ void load_key_column(const Params<In>& p, const KeySelectorSmem& s, int e) {
  const int tid = threadIdx.x;
  for (int b = tid; b < kKeyBins; b += kKeySelectThreads) s.hist[b] = 0;
  converged_syncthreads();
  const uint4* src = reinterpret_cast<const uint4*>(p.keys + static_cast<size_t>(e) * p.key_pitch);
  uint4* dst = reinterpret_cast<uint4*>(s.column);
  const int chunks = p.key_pitch / 8;
  unsigned zeros = 0;
  auto count_keys = [&](unsigned word) {  // two keys
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const unsigned key = (word >> (16 * half)) & 0xFFFFu;
      if (key != 0) atomicAdd(s.hist + key, 1u);
      zeros += key == 0 ? 1u : 0u;
    }
  };
  for (int i0 = tid; i0 < chunks; i0 += 4 * kKeySelectThreads) {
    uint4 chunk[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + q * kKeySelectThreads;
      chunk[q] = i < chunks ? __ldg(src + i) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // no early exit, and no array of words: both put the chunk in local memory
      const int i = i0 + q * kKeySelectThreads;
      if (i < chunks) {
        dst[i] = chunk[q];
        count_keys(chunk[q].x);
        count_keys(chunk[q].y);
        count_keys(chunk[q].z);
        count_keys(chunk[q].w);
      }
    }
  }
  zeros = warp_sum_u32(zeros);
  if (lane_id() == 0 && zeros != 0) atomicAdd(s.hist, zeros);
  converged_syncthreads();
}

// Block e selects for expert e.
template <typename In>
__global__ void __launch_bounds__(kKeySelectThreads, 2) select_keys_kernel(Params<In> p) {
  extern __shared__ __align__(16) unsigned char ec_smem[];
  pdl_start();
  const KeySelectorSmem s = key_selector_smem(ec_smem);
  const int e = blockIdx.x;
  // Scores recomputed from the logits and the score-keys launch's row statistics (only real tokens are asked for).
  const ColumnKeys<In> col{p.logits, p.token_mask, p.row_max, p.row_rcp, nullptr, p.E, e, false, 0.0f, 0.0f};
  if (threadIdx.x == 0) s.sc->n_list = 0;  // before load_key_column's barriers
  load_key_column(p, s, e);
  const unsigned n_real = static_cast<unsigned>(p.key_pitch) - s.hist[0];
  const unsigned take = min(static_cast<unsigned>(p.capacity), n_real);
  unsigned above = kPickedKey, rank = 0, n_bin = 0;  // take == 0: nothing
  unsigned long long theta = ~0ull;
  if (take == n_real && take > 0) {  // every real token
    above = 0;
    theta = 0;
  } else if (take > 0) {
    find_key_bin(s.hist, take, s.sc);
    above = s.sc->digit;
    rank = s.sc->rank;
    n_bin = s.sc->count;
    converged_syncthreads();
  }
  count_runs(s, p.key_pitch, above, n_bin > 0 && n_bin <= static_cast<unsigned>(kRankList));
  converged_syncthreads();
  if (n_bin > 0) theta = resolve_bin(p, s, ColumnItems<In>{col}, above, rank, n_bin);
  if (threadIdx.x == 0) {
    p.theta_hi[e] = static_cast<unsigned>(theta >> 32);
    p.theta_lo[e] = static_cast<unsigned>(theta);
    if (p.expert_major) p.counts[e] = static_cast<int32_t>(take);
  }
  if (!p.expert_major) return write_pick_bits(p, s, e, above);
  // The picks are listed in the histogram's space (no longer needed) when they fit, else in the output row.
  const bool row_in_smem = take <= static_cast<unsigned>(kKeyBins);
  int32_t* row = row_in_smem ? reinterpret_cast<int32_t*>(s.hist) : p.ids + static_cast<size_t>(e) * p.capacity;
  list_picked_tokens(s, p.key_pitch, above, row);
  score_picks(p, col, row, row_in_smem, take);
  for (int i = take + threadIdx.x; i < p.capacity; i += kKeySelectThreads) {
    p.ids[static_cast<size_t>(e) * p.capacity + i] = -1;
    p.weights[static_cast<size_t>(e) * p.capacity + i] = 0.0f;
  }
}

// ---- 3. finalize --------------------------------------------------------------------------------------------------
// Warp: a 32x32 bit matrix held one row per lane (bit j of lane i's word = entry (i, j)) becomes its transpose, in
// five rounds that swap the off-diagonal blocks of halving size.
__device__ __forceinline__ unsigned transpose_bits32(unsigned x) {
  const int lane = lane_id();
  constexpr unsigned kLow[5] = {0x0000FFFFu, 0x00FF00FFu, 0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
#pragma unroll
  for (int r = 0; r < 5; ++r) {
    const int shift = 16 >> r;
    const unsigned low = kLow[r];  // the bit positions whose bit `shift` is clear
    const unsigned partner = __shfl_xor_sync(kFullWarp, x, shift);
    x = (lane & shift) ? (x & ~low) | ((partner >> shift) & low) : (x & low) | ((partner & low) << shift);
  }
  return x;
}

// Thread 32c + l's pick word of a tile: expert 32c + l's bits (a bit per token), 0 past E. Loaded a tile ahead, so
// that the load is in flight while the block routes the tile before it.
template <typename In>
__device__ __forceinline__ unsigned load_pick_word(const Params<In>& p, int tile) {
  const int e = threadIdx.x;
  return e < p.E ? __ldcg(p.pick_bits + static_cast<size_t>(tile) * p.E + e) : 0u;
}

// Warp c < ceil(E / 32) turns experts [32c, 32c + 32) of the tile's pick words into a word per token:
// token_masks[i * kMaskPitch + c], bit j set when expert 32c + j picked token i of the tile.
__device__ __forceinline__ void store_token_masks(int E, unsigned pick_word, unsigned* token_masks) {
  const int c = warp_id();
  if (32 * c >= E) return;
  token_masks[lane_id() * kMaskPitch + c] = transpose_bits32(pick_word);
}

// Routes token t (token i of the tile) from its mask words: lane c holds experts [32c, 32c + 32); the picks are
// listed in expert order, then lane j scores pick j and ranks it (higher score first, then the lower expert: the
// lower lane). Returns false when the token needs its row: a fallback slot to fill, or more picks than lanes.
template <typename In>
__device__ bool route_token_from_masks(const Params<In>& p, const FinalizerSmem& s, const unsigned* masks,
                                       uint2* picks, int t) {
  const int lane = lane_id();
  const int k = p.top_k;
  int32_t* out_ids = p.ids + static_cast<size_t>(t) * k;        // [k]
  float* out_weights = p.weights + static_cast<size_t>(t) * k;  // [k]
  int n = 0;
  if (token_is_real(p.token_mask, t)) {
    // The row statistics first: their loads are in flight while the picks are listed.
    const float mx = __ldcg(p.row_max + t), rcp = __ldcg(p.row_rcp + t);
    unsigned mask = 32 * lane < p.E ? masks[lane] : 0u;
    const unsigned count = __popc(mask);
    const unsigned incl = warp_inclusive_scan_u32(count);
    n = static_cast<int>(__shfl_sync(kFullWarp, incl, 31));
    if (n > 32 || (p.fallback_topk && n < k)) return false;
    for (unsigned at = incl - count; mask != 0; mask &= mask - 1, ++at)
      picks[at].y = static_cast<unsigned>(32 * lane + __ffs(mask) - 1);
    __syncwarp();
    unsigned score = 0, e = 0;
    if (lane < n) {
      e = picks[lane].y;
      const float logit = to_float(__ldg(p.logits + static_cast<size_t>(t) * p.E + e));
      score = __float_as_uint(score_of(logit, mx, rcp));
    }
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const unsigned other = __shfl_sync(kFullWarp, score, j);
      rank += other > score || (other == score && j < lane) ? 1 : 0;
    }
    if (lane < n && rank < k) {
      out_ids[rank] = static_cast<int>(e);
      out_weights[rank] = __uint_as_float(score);
      atomicAdd(s.counts + e, 1u);
    }
    n = min(n, k);
  }
  clear_slots(out_ids, out_weights, n, k);
  __syncwarp();  // `picks` is reused by the warp's next token
  return true;
}

// Warps below fin_warps route the queued tokens from their rows, then the queue is emptied.
template <typename In>
__device__ void route_queued_rows(const Params<In>& p, unsigned char* smem) {
  Scratch* sc = reinterpret_cast<Scratch*>(smem);
  const FinalizerSmem s = finalizer_smem(p, smem);
  const unsigned queued = sc->n_list;
  if (warp_id() < p.fin_warps) {
    unsigned* stage = s.stage + static_cast<size_t>(warp_id()) * p.E;  // [E]
    for (unsigned j = warp_id(); j < queued; j += p.fin_warps)
      route_token_from_row(p, s, stage, static_cast<int>(s.queue[j]));
  }
  converged_syncthreads();
  if (threadIdx.x == 0) sc->n_list = 0;
  converged_syncthreads();
}

// Blocks walk the tiles of kKeyTileTokens tokens (one token per warp); the tokens that need their rows are queued
// and routed by the whole block when the queue might not take another tile, and at the end. One block per SM: at
// two (32 registers) the row routing spilled; with 39 registers the H100 timing was the same.
template <typename In>
__global__ void __launch_bounds__(kBlock, 1) finalize_kernel(Params<In> p) {
  static_assert(kKeyTileTokens == kWarps && 32 * kWarps >= 32 * kKeyMaxChunks,
                "a tile gives each warp one token, and the warps cover the experts' mask words");
  extern __shared__ __align__(16) unsigned char ec_smem[];
  pdl_start();
  Scratch* sc = reinterpret_cast<Scratch*>(ec_smem);
  if (threadIdx.x == 0) sc->n_list = 0;
  load_finalizer_state(p, ec_smem, nullptr);
  const int tiles = p.key_pitch / kKeyTileTokens;
  unsigned pick_word = static_cast<int>(blockIdx.x) < tiles ? load_pick_word(p, blockIdx.x) : 0u;
  for (int tile = blockIdx.x;; tile += gridDim.x) {  // uniform over the block
    const bool more = tile < tiles;
    if (more) {
      const FinalizerSmem s = finalizer_smem(p, ec_smem);
      unsigned* token_masks = s.queue + kRowQueue;  // [kWarps, kMaskPitch]
      const uintptr_t picks_at = (reinterpret_cast<uintptr_t>(token_masks + kWarps * kMaskPitch) + 7) & ~uintptr_t{7};
      uint2* picks = reinterpret_cast<uint2*>(picks_at) + 32 * warp_id();  // [32] this warp's token
      store_token_masks(p.E, pick_word, token_masks);
      __syncthreads();
      if (tile + static_cast<int>(gridDim.x) < tiles) pick_word = load_pick_word(p, tile + gridDim.x);
      const int t = kKeyTileTokens * tile + warp_id();
      if (t < p.T && !route_token_from_masks(p, s, token_masks + warp_id() * kMaskPitch, picks, t) &&
          lane_id() == 0)
        s.queue[atomicAdd(&sc->n_list, 1u)] = static_cast<unsigned>(t);
      converged_syncthreads();
    }
    if (!more || sc->n_list + kWarps > static_cast<unsigned>(kRowQueue)) route_queued_rows(p, ec_smem);
    if (!more) break;
  }
  flush_counts(finalizer_smem(p, ec_smem), p.E, p.counts);
}

}  // namespace jitmoe::ec
