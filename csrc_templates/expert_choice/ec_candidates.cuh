// Expert Choice, candidate path (normalize_over="experts"): every score is computed once, in a row-major pass, and
// each expert selects among a short candidate list instead of reading its whole column.
//   prepare (first launch): zeroes the counters; one warp per sampled token writes the token's scores.
//   route kernel, phases by ticket (each phase's blocks wait until every block of the previous phase is done):
//   1. bound: per expert, bound[e] = (about) the sample_rank-th best sampled score, so that about 2C tokens of the
//      whole column score at least that much (the planner picks sample_rank).
//   2. rows: one warp per token computes the token's softmax statistics and scores and offers every score >=
//      bound[e] to expert e's candidate list.
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
  unsigned* keys = p.sample_keys + static_cast<size_t>(s) * p.E;  // [E]
  for (int e = lane_id(); e < p.E; e += kExpertLanes)
    keys[e] = real ? __float_as_uint(score_of(to_float(__ldg(row + e)), stats.x, stats.y)) : kInvalidKey;
}

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

// The bound's histogram bin of a score: 16 bins per octave over [2^-63, 1], bin 0 below (score bits 29..19).
constexpr unsigned kBoundBinBase = 64u << 4;  // (exponent 64) << 4
__device__ __forceinline__ unsigned bound_bin(unsigned k32) {
  const unsigned b = k32 >> 19;
  return b <= kBoundBinBase ? 0u : min(b - kBoundBinBase, static_cast<unsigned>(kBins - 1));
}

// bound[e]: the lower edge of the histogram bin holding the sample_rank-th best sampled score, so at least that
// many sampled tokens (and, scaled, about 2C of the column) score >= bound[e]. Approximate on purpose: only the
// candidate count depends on it, never the routing.
template <typename In>
__device__ void run_bound(const Params<In>& p, int block, unsigned char* smem) {
  const SelectorSmem s = selector_smem(smem);
  for (int e = block; e < p.E; e += p.bound_blocks) {
    for (int b = threadIdx.x; b < kBins; b += kBlock) s.hist[b] = 0;
    __syncthreads();
    unsigned n_real = 0;
    for (int base = 0; base < p.sample_count; base += kBlock) {  // uniform trip count: whole warps
      const int i = base + threadIdx.x;
      const unsigned k32 = i < p.sample_count ? p.sample_keys[static_cast<size_t>(i) * p.E + e] : kInvalidKey;
      const bool real = k32 != kInvalidKey;
      n_real += real ? 1u : 0u;
      histogram_add(s.hist, real, real ? bound_bin(k32) : 0u);
    }
    n_real = block_sum_u32(n_real, s.sc);  // also orders the histogram before find_digit
    unsigned rank = static_cast<unsigned>(p.sample_rank), count = 0;
    const unsigned bin = rank > n_real ? 0u : find_digit(s, &rank, &count);
    if (threadIdx.x == 0) p.bound[e] = bin == 0 ? 0u : (bin + kBoundBinBase) << 19;
    converged_syncthreads();  // the next expert reuses the histogram
  }
  signal_done(p.counters + 1);
}

// An offer to expert e reserves a slot of its candidate list, then stores (score bits, token) there unless the list
// is full (the count keeps growing, so the selector sees the overflow).
template <typename In>
__device__ __forceinline__ unsigned reserve_candidate(const Params<In>& p, int e) {
  return atomicAdd(p.cand_count + e * kCountStride, 1u);
}

template <typename In>
__device__ __forceinline__ void store_candidate(const Params<In>& p, int e, unsigned slot, unsigned k32, int t) {
  if (slot < static_cast<unsigned>(p.cand_cap)) p.cand[static_cast<size_t>(e) * p.cand_cap + slot] = make_uint2(k32, t);
}

// Row pass for E <= 32 * NCH: the logits and then the softmax terms stay in registers (lane holds e = lane + 32j).
template <typename In, int NCH>
__device__ void offer_row_in_registers(const Params<In>& p, const unsigned* bound, int t, bool real) {
  const In* row = p.logits + static_cast<size_t>(t) * p.E;  // [E]
  const int lane = lane_id();
  float v[NCH];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < NCH; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < p.E ? to_float(__ldg(row + e)) : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  mx = warp_max_f32(mx);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < NCH; ++j) {
    v[j] = lane + 32 * j < p.E ? softmax_term(v[j], mx) : 0.0f;  // now the term
    sum = __fadd_rn(sum, v[j]);
  }
  const float rcp = __frcp_rn(warp_sum_tree_f32(sum));
  store_row_stats(p, t, mx, rcp);
  if (!real) return;
  // All of the row's slot reservations first, then the stores: one atomic round trip per row, not one per chunk.
  unsigned key[NCH], slot[NCH];
#pragma unroll
  for (int j = 0; j < NCH; ++j) {
    const int e = lane + 32 * j;
    key[j] = __float_as_uint(__fmul_rn(v[j], rcp));
    slot[j] = e < p.E && key[j] >= bound[e] ? reserve_candidate(p, e) : 0xFFFFFFFFu;  // never stored
  }
#pragma unroll
  for (int j = 0; j < NCH; ++j) store_candidate(p, lane + 32 * j, slot[j], key[j], t);
}

// Row pass for any E: the terms are recomputed after the statistics.
template <typename In>
__device__ void offer_row_streaming(const Params<In>& p, const unsigned* bound, int t, bool real) {
  const In* row = p.logits + static_cast<size_t>(t) * p.E;  // [E]
  const float2 stats = row_softmax_stats(row, p.E);
  store_row_stats(p, t, stats.x, stats.y);
  if (!real) return;
  for (int e = lane_id(); e < p.E; e += kExpertLanes) {
    const unsigned k32 = __float_as_uint(score_of(to_float(__ldg(row + e)), stats.x, stats.y));
    if (k32 >= bound[e]) store_candidate(p, e, reserve_candidate(p, e), k32, t);
  }
}

template <typename In, int NCH>
__device__ unsigned offer_rows(const Params<In>& p, const unsigned* bound, int block) {
  unsigned real_rows = 0;  // lane 0's count of the warp's real tokens
  const int stride = p.row_blocks * kWarps;
  for (int t = block * kWarps + warp_id(); t < p.T; t += stride) {
    const bool real = token_is_real(p.token_mask, t);
    real_rows += real && lane_id() == 0 ? 1u : 0u;
    if constexpr (NCH == 0) {
      offer_row_streaming(p, bound, t, real);
    } else {
      offer_row_in_registers<In, NCH>(p, bound, t, real);
    }
  }
  return real_rows;
}

template <typename In>
__device__ void run_rows(const Params<In>& p, int block, unsigned char* smem) {
  Scratch* sc = reinterpret_cast<Scratch*>(smem);
  unsigned* bound = reinterpret_cast<unsigned*>(smem + kScratchBytes);  // [E]
  wait_for(p.counters + 1, p.bound_blocks);
  for (int e = threadIdx.x; e < p.E; e += kBlock) bound[e] = __ldcg(p.bound + e);
  __syncthreads();
  unsigned real_rows;
  switch (p.row_chunks) {
    case 1: real_rows = offer_rows<In, 1>(p, bound, block); break;
    case 2: real_rows = offer_rows<In, 2>(p, bound, block); break;
    case 4: real_rows = offer_rows<In, 4>(p, bound, block); break;
    case 8: real_rows = offer_rows<In, 8>(p, bound, block); break;
    default: real_rows = offer_rows<In, 0>(p, bound, block); break;
  }
  real_rows = block_sum_u32(real_rows, sc);
  if (threadIdx.x == 0) atomicAdd(p.counters + 4, real_rows);
  signal_done(p.counters + 2);  // reconverges warp 0 first
}

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
  const unsigned n_real = __ldcg(p.counters + 4);
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
