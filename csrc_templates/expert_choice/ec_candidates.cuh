// Expert Choice, candidate path (normalize_over="experts"): every score is computed once, in a row-major pass, and
// each expert selects among a short candidate list instead of reading its whole column.
//   prepare (first launch): zeroes the counters; one warp per sampled token writes the token's scores, expert-major.
//   route kernel, phases by ticket (each phase's blocks wait until every block of the previous phase is done):
//   1. bound: one warp per expert sets bound[e] = (about) the sample_rank-th best sampled score, so that about 2C
//      tokens of the whole column score at least that much (the planner picks sample_rank).
//   2. rows: one warp per token (two tokens in flight) computes the token's softmax statistics and scores and offers
//      every score >= bound[e] to expert e. Offers are staged per expert in shared memory and reach the global
//      candidate lists with one atomic per (block, expert): per-candidate global atomics on 256 counters serialised.
//   3. select: per expert, theta = the take-th best key among the candidates when the list is complete (at least
//      take and at most cand_cap candidates). A misleading sample (too few or too many candidates) only costs
//      time: that expert falls back to the whole-column radix select of ec_select.cuh. The picks go to the
//      expert-major row, or to the pick lists of the picked tokens.
//   4. finalize (token-major, ec_finalize.cuh): a token routes from its pick list when all its picks fit there and
//      it needs no fallback; any other token recomputes its row against the thresholds.
// Workspace: E * cand_cap candidates (about 3C each) and T * pick_slots picks, O(T * top_k), never a [T, E] buffer.
#pragma once
#include "expert_choice/ec_finalize.cuh"
#include "expert_choice/ec_select.cuh"

namespace jitmoe::ec {

__device__ __forceinline__ long long sample_token(int s, long long T, int sample_count) {
  return static_cast<long long>(s) * T / sample_count;
}

// Prepare kernel, candidate path: thread gid zeroes its counters; warp gid / 32 scores sampled token gid / 32.
template <typename In>
__device__ void prepare_candidates(const Params<In>& p, long long gid) {
  if (gid < p.E) p.cand_count[gid * kCountStride] = 0;
  if (gid < p.T && p.pick_count != nullptr) p.pick_count[gid] = 0;
  const long long s = gid / 32;  // uniform within a warp
  if (s >= p.sample_count) return;
  const long long t = sample_token(static_cast<int>(s), p.T, p.sample_count);
  const In* row = p.logits + static_cast<size_t>(t) * p.E;  // [E]
  const float2 stats = row_softmax_stats(row, p.E);
  const bool real = token_is_real(p.token_mask, static_cast<int>(t));
  for (int e = lane_id(); e < p.E; e += kExpertLanes)  // expert-major: the bound phase reads a column coalesced
    p.sample_keys[static_cast<size_t>(e) * p.sample_count + s] =
        real ? __float_as_uint(score_of(to_float(__ldg(row + e)), stats.x, stats.y)) : kInvalidKey;
}

// ---- 1. bound -----------------------------------------------------------------------------------------------------
constexpr int kBoundLowBit = 19;  // the bound keeps score bits 30..19: exponent and 4 mantissa bits (16 per octave)

// The largest value with zero bits below kBoundLowBit that at least `rank` of the expert's sampled keys reach
// (0 when fewer real keys exist), by bisection over the bits. Approximate on purpose: only the candidate count depends
// on it, never the routing. Whole warp.
__device__ unsigned sample_bound(const unsigned* keys, int count, int rank) {
  constexpr int kPerLane = kSampleTokens / 32;
  unsigned k[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int s = lane_id() + 32 * i;
    const unsigned key = s < count ? __ldg(keys + s) : kInvalidKey;  // written by the prepare launch
    k[i] = key == kInvalidKey ? 0u : key;                            // padding never reaches a nonzero bound
  }
  unsigned bound = 0;
  for (int bit = 30; bit >= kBoundLowBit; --bit) {
    const unsigned trial = bound | (1u << bit);
    unsigned n = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) n += k[i] >= trial ? 1u : 0u;
    if (__reduce_add_sync(kFullWarp, n) >= static_cast<unsigned>(rank)) bound = trial;
  }
  return bound;
}

template <typename In>
__device__ void run_bound(const Params<In>& p, int block) {
  // One expert per warp; adjacent experts go to different blocks, so the few busy warps spread over the SMs.
  for (int e = block + p.bound_blocks * warp_id(); e < p.E; e += p.bound_blocks * kWarps) {
    const unsigned bound = sample_bound(p.sample_keys + static_cast<size_t>(e) * p.sample_count, p.sample_count,
                                        p.sample_rank);
    if (lane_id() == 0) p.bound[e] = bound;
  }
  signal_done(p.counters + 1);
}

// ---- 2. rows ------------------------------------------------------------------------------------------------------
// Row-phase shared memory after the scratch: [bound: E][staged: E][items: E * stage_slots uint2].
struct RowStage {
  unsigned* bound;   // [E] copy of the bounds
  unsigned* staged;  // [E] offers to expert e in this block (beyond stage_slots they went straight to global memory)
  uint2* items;      // [E, slots] (score bits, token)
  int slots;
};

__device__ __forceinline__ RowStage row_stage(unsigned char* smem, int E, int slots) {
  unsigned* words = reinterpret_cast<unsigned*>(smem + kScratchBytes);
  return RowStage{words, words + E, reinterpret_cast<uint2*>(words + 2 * E), slots};
}

template <typename In>
__device__ __forceinline__ void store_candidate(const Params<In>& p, int e, unsigned slot, uint2 item) {
  if (slot < static_cast<unsigned>(p.cand_cap)) p.cand[static_cast<size_t>(e) * p.cand_cap + slot] = item;
}

constexpr unsigned kNoSlot = 0xFFFFFFFFu;

// Reserves a stage slot of expert e for an offer (slots at or past st.slots overflow to the global list).
__device__ __forceinline__ unsigned reserve_stage(const RowStage& st, int e) { return atomicAdd(st.staged + e, 1u); }

// Stores an offer to expert e in its reserved stage slot or, once the stage is full, in the global list (whose count
// keeps growing past cand_cap, so the selector sees an overflow).
template <typename In>
__device__ __forceinline__ void place_offer(const Params<In>& p, const RowStage& st, int e, unsigned slot,
                                            unsigned k32, int t) {
  const uint2 item = make_uint2(k32, static_cast<unsigned>(t));
  if (slot < static_cast<unsigned>(st.slots)) {
    st.items[static_cast<size_t>(e) * st.slots + slot] = item;
  } else {
    store_candidate(p, e, atomicAdd(p.cand_count + e * kCountStride, 1u), item);
  }
}

// Softmax statistics and scores of a loaded row; offers the scores that reach their expert's bound.
template <typename In, int NCH>
__device__ __forceinline__ void offer_loaded_row(const Params<In>& p, const RowStage& st, int t, float (&v)[NCH]) {
  score_loaded_row<In, NCH>(p, t, v);
  if (!token_is_real(p.token_mask, t)) return;
  // Every slot reservation of the row first, then the stores: the shared atomics overlap instead of each waiting
  // for the one before.
  const int lane = lane_id();
  unsigned slot[NCH];
#pragma unroll
  for (int j = 0; j < NCH; ++j) {
    const int e = lane + 32 * j;
    slot[j] = e < p.E && __float_as_uint(v[j]) >= st.bound[e] ? reserve_stage(st, e) : kNoSlot;
  }
#pragma unroll
  for (int j = 0; j < NCH; ++j)
    if (slot[j] != kNoSlot) place_offer(p, st, lane + 32 * j, slot[j], __float_as_uint(v[j]), t);
}

// Row pass for any E: the terms are recomputed after the statistics.
template <typename In>
__device__ void offer_row_streaming(const Params<In>& p, const RowStage& st, int t) {
  const In* row = p.logits + static_cast<size_t>(t) * p.E;  // [E]
  const float2 stats = row_softmax_stats(row, p.E);
  store_row_stats(p, t, stats.x, stats.y);
  if (!token_is_real(p.token_mask, t)) return;
  for (int e = lane_id(); e < p.E; e += kExpertLanes) {
    const unsigned k32 = __float_as_uint(score_of(to_float(__ldg(row + e)), stats.x, stats.y));
    if (k32 >= st.bound[e]) place_offer(p, st, e, reserve_stage(st, e), k32, t);
  }
}

// The warp's tokens, two rows in flight: the second row's loads are issued before the first row's math.
template <typename In, int NCH>
__device__ void offer_rows(const Params<In>& p, const RowStage& st, int block) {
  const int stride = p.row_blocks * kWarps;
  for (int t = block * kWarps + warp_id(); t < p.T; t += 2 * stride) {
    if constexpr (NCH == 0) {
      offer_row_streaming(p, st, t);
      if (t + stride < p.T) offer_row_streaming(p, st, t + stride);
    } else {
      float a[NCH], b[NCH];
      const bool second = t + stride < p.T;  // uniform within the warp
      load_row<In, NCH>(p, t, a);
      if (second) load_row<In, NCH>(p, t + stride, b);
      offer_loaded_row<In, NCH>(p, st, t, a);
      if (second) offer_loaded_row<In, NCH>(p, st, t + stride, b);
    }
  }
}

// Moves the block's staged offers to the global lists: one atomic per expert reserves the slots for all of them.
template <typename In>
__device__ void flush_stage(const Params<In>& p, const RowStage& st) {
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += kBlock) {
    const unsigned n = min(st.staged[e], static_cast<unsigned>(st.slots));
    st.staged[e] = n == 0 ? 0u : atomicAdd(p.cand_count + e * kCountStride, n);  // now the global base
    st.bound[e] = n;                                                              // the bounds are done with
  }
  __syncthreads();
  for (int e = warp_id(); e < p.E; e += kWarps) {
    const unsigned n = st.bound[e], base = st.staged[e];
    for (unsigned i = lane_id(); i < n; i += 32)
      store_candidate(p, e, base + i, st.items[static_cast<size_t>(e) * st.slots + i]);
  }
}

template <typename In>
__device__ unsigned count_real_rows(const Params<In>& p, int block) {
  unsigned n = 0;
  const int stride = p.row_blocks * kWarps;
  if (lane_id() == 0)
    for (int t = block * kWarps + warp_id(); t < p.T; t += stride) n += token_is_real(p.token_mask, t) ? 1u : 0u;
  return n;
}

template <typename In>
__device__ void run_rows(const Params<In>& p, int block, unsigned char* smem) {
  Scratch* sc = reinterpret_cast<Scratch*>(smem);
  const RowStage st = row_stage(smem, p.E, p.stage_slots);
  wait_for(p.counters + 1, p.bound_blocks);
  for (int e = threadIdx.x; e < p.E; e += kBlock) {
    st.bound[e] = __ldcg(p.bound + e);
    st.staged[e] = 0;
  }
  __syncthreads();
  switch (p.row_chunks) {
    case 1: offer_rows<In, 1>(p, st, block); break;
    case 2: offer_rows<In, 2>(p, st, block); break;
    case 4: offer_rows<In, 4>(p, st, block); break;
    case 8: offer_rows<In, 8>(p, st, block); break;
    default: offer_rows<In, 0>(p, st, block); break;
  }
  flush_stage(p, st);
  const unsigned real_rows = p.token_mask == nullptr ? 0u : block_sum_u32(count_real_rows(p, block), sc);
  if (threadIdx.x == 0 && real_rows != 0) atomicAdd(p.counters + 4, real_rows);
  signal_done(p.counters + 2);  // reconverges warp 0 first
}

// ---- 3. select ----------------------------------------------------------------------------------------------------
// The candidate list of one expert: item i is (score bits, token).
struct CandidateItems {
  const uint2* cand;  // [n]
  __device__ __forceinline__ unsigned long long operator()(int i) const {
    const uint2 c = __ldcg(cand + i);  // written by other blocks of this launch: read from L2
    return column_key(c.x, static_cast<int>(c.y));
  }
};

// Items copied to shared memory (radix passes then read no global memory).
struct SmemItems {
  const unsigned long long* keys;  // [n]
  __device__ __forceinline__ unsigned long long operator()(int i) const { return keys[i]; }
};

// Copies n <= kCachedItems items to keys (shared memory) and returns them as SmemItems.
template <typename Items>
__device__ SmemItems cache_items(const Items& items, int n, unsigned long long* keys) {
  for (int i = threadIdx.x; i < n; i += kBlock) keys[i] = items(i);
  __syncthreads();
  return SmemItems{keys};
}

__device__ __forceinline__ bool is_real_key(unsigned long long key) { return key < (1ull << 63); }

// Token-major: appends expert e to the pick list of every item picked (key >= theta).
template <typename Items>
__device__ void record_picks(const Items& items, int n, unsigned long long theta, int e, unsigned* pick_count,
                             uint2* picks, int pick_slots) {
  for (int i = threadIdx.x; i < n; i += kBlock) {
    const unsigned long long key = items(i);
    if (!is_real_key(key) || key < theta) continue;
    const int t = static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(key));
    const unsigned slot = atomicAdd(pick_count + t, 1u);
    if (slot < static_cast<unsigned>(pick_slots))
      picks[static_cast<size_t>(t) * pick_slots + slot] = make_uint2(static_cast<unsigned>(key >> 32), e);
  }
}

// Expert-major row of expert e from its (unordered) candidates: a token bitmap ranks the picks by token id.
template <typename In, typename Items>
__device__ void write_expert_row_from(const Params<In>& p, const Items& items, int n, int e,
                                      unsigned long long theta, unsigned take, const SelectorSmem& s) {
  const int words = (p.T + 31) / 32;
  unsigned* bitmap = token_bitmap(s);  // [words]
  unsigned* before = bitmap + words;   // [words] picks in the words before
  for (int w = threadIdx.x; w < words; w += kBlock) bitmap[w] = 0;
  __syncthreads();
  auto picked_token = [&](int i, int* t) {
    const unsigned long long key = items(i);
    *t = static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(key));
    return key >= theta;  // candidates are real tokens
  };
  for (int i = threadIdx.x; i < n; i += kBlock) {
    int t;
    if (picked_token(i, &t)) atomicOr(bitmap + (t >> 5), 1u << (t & 31));
  }
  __syncthreads();
  const int per_thread = (words + kBlock - 1) / kBlock;  // contiguous words per thread
  const int w0 = min(words, threadIdx.x * per_thread), w1 = min(words, w0 + per_thread);
  unsigned ones = 0;
  for (int w = w0; w < w1; ++w) ones += __popc(bitmap[w]);
  unsigned total;
  unsigned run = block_inclusive_scan(ones, s.sc, &total) - ones;
  for (int w = w0; w < w1; ++w) {
    before[w] = run;
    run += __popc(bitmap[w]);
  }
  __syncthreads();
  int32_t* row_ids = p.ids + static_cast<size_t>(e) * p.capacity;      // [capacity]
  float* row_weights = p.weights + static_cast<size_t>(e) * p.capacity;  // [capacity]
  for (int i = threadIdx.x; i < n; i += kBlock) {
    int t;
    if (picked_token(i, &t)) {
      const unsigned pos = before[t >> 5] + __popc(bitmap[t >> 5] & ((1u << (t & 31)) - 1u));
      row_ids[pos] = t;
      row_weights[pos] = __uint_as_float(static_cast<unsigned>(items(i) >> 32));
    }
  }
  for (int i = take + threadIdx.x; i < p.capacity; i += kBlock) {
    row_ids[i] = -1;
    row_weights[i] = 0.0f;
  }
  __syncthreads();  // the next expert reuses the bitmap
}

// theta and the picks of expert e from its n complete candidates (any Items source).
template <typename In, typename Items>
__device__ unsigned long long select_from_candidates(const Params<In>& p, const Items& items, int n, int e,
                                                     unsigned take, const SelectorSmem& s) {
  const unsigned long long theta =
      take == static_cast<unsigned>(n) ? 0ull : radix_select(items, n, p.T, take, static_cast<unsigned>(n), s);
  if (p.expert_major) {
    write_expert_row_from(p, items, n, e, theta, take, s);
  } else {
    record_picks(items, n, theta, e, p.pick_count, p.picks, p.pick_slots);
  }
  return theta;
}

template <typename In>
__device__ void run_candidate_selector(const Params<In>& p, int block, unsigned char* smem) {
  const SelectorSmem s = selector_smem(smem);
  wait_for(p.counters + 2, p.row_blocks);
  const unsigned n_real = p.token_mask == nullptr ? static_cast<unsigned>(p.T) : __ldcg(p.counters + 4);
  const unsigned take = min(static_cast<unsigned>(p.capacity), n_real);
  for (int e = block; e < p.E; e += p.sel_blocks) {
    const unsigned n = __ldcg(p.cand_count + e * kCountStride);
    const CandidateItems items{p.cand + static_cast<size_t>(e) * p.cand_cap};
    unsigned long long theta;
    if (take <= n && n <= static_cast<unsigned>(p.cand_cap)) {  // the list holds every pick
      theta = n <= static_cast<unsigned>(kCachedItems)
                  ? select_from_candidates(p, cache_items(items, static_cast<int>(n), cached_items(s)),
                                           static_cast<int>(n), e, take, s)
                  : select_from_candidates(p, items, static_cast<int>(n), e, take, s);
    } else {  // a misleading sample: the whole column
      const ColumnKeys<In> col{p.logits, p.token_mask, p.row_max, p.row_rcp, nullptr, p.E, e, false, 0.0f, 0.0f};
      const ColumnItems<In> column{col};
      theta = take == n_real ? 0ull : radix_select(column, p.T, p.T, take, n_real, s);
      if (p.expert_major) {
        write_expert_row(p, col, e, theta, take, s);
      } else {
        record_picks(column, p.T, theta, e, p.pick_count, p.picks, p.pick_slots);
      }
    }
    if (threadIdx.x == 0) {
      p.theta_hi[e] = static_cast<unsigned>(theta >> 32);
      p.theta_lo[e] = static_cast<unsigned>(theta);
      if (p.expert_major) p.counts[e] = static_cast<int32_t>(take);
    }
    converged_syncthreads();  // the next expert reuses the scratch, histogram, list and cached items
  }
  signal_done(p.counters + 3);
}

}  // namespace jitmoe::ec
