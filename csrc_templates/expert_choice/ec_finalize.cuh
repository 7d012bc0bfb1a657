// Expert Choice finalizers (token-major output): after every selector has published its threshold, one warp per
// token recomputes the token's scores (the same bits the selectors ranked), marks expert e as "picked" when the
// token's key in column e is >= theta[e], and stages (picked bit | score bits) for its experts in shared memory.
// Its output is then its top_k experts by (picked, score, lower id first): the experts that picked it, best first,
// then (fallback="topk") the best of the others; with fallback="none" the slots after the last picked expert are
// -1 / 0. Selection: top_k rounds of a warp argmax over the lanes' current bests. Each lane keeps its best two
// keys; the lane whose expert won promotes its second, and rescans its own strided experts for a new best two only
// when it wins again before that. Padding tokens get -1 / 0 throughout.
// On the candidate path a token whose picks all fit its pick list, and that needs no fallback, skips the row and
// routes from the list alone; the key path's finalizer (ec_keys.cuh) routes from the selectors' pick bits.
// Per-expert counts of the written ids go to shared counters, then once per block to global memory.
#pragma once
#include "expert_choice/ec_block.cuh"
#include "expert_choice/ec_scores.cuh"

namespace jitmoe::ec {

struct FinalizerSmem {
  unsigned* theta_hi;  // [E]
  unsigned* theta_lo;  // [E]
  float* col_max;      // [E]
  float* col_rcp;      // [E]
  unsigned* counts;    // [E]
  unsigned* stage;     // [fin_warps, E] (picked bit | score bits) of the warp's current token
  unsigned* queue;     // [kRowQueue] tokens waiting to be routed from their rows
};

// The best two keys (0 = none) of a lane's experts; `second` is unknown after the best was taken.
struct LaneBest {
  unsigned long long best, second;
  bool second_known;
};

__device__ __forceinline__ void keep_top_two(LaneBest& lb, unsigned long long key) {
  if (key > lb.best) {
    lb.second = lb.best;
    lb.best = key;
  } else if (key > lb.second) {
    lb.second = key;
  }
}

constexpr int kStageBatch = 4;  // logits a lane loads at once: one round trip per 128 experts (8 spilled)

// Stages the token's flagged scores and returns this lane's best two row keys.
template <typename In>
__device__ LaneBest stage_token(const Params<In>& p, const FinalizerSmem& s, unsigned* stage, int t) {
  const In* logits = p.logits + static_cast<size_t>(t) * p.E;  // [E] row of token t
  // Row statistics from L2: the candidate path writes them earlier in the same launch.
  const float mx = p.tokens_softmax ? 0.0f : __ldcg(p.row_max + t);
  const float rcp = p.tokens_softmax ? 0.0f : __ldcg(p.row_rcp + t);
  LaneBest lb{0, 0, true};
  for (int e0 = lane_id(); e0 < p.E; e0 += 32 * kStageBatch) {
    float x[kStageBatch];
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {  // read-only: the loads need not wait for the stage stores
      const int e = e0 + 32 * j;
      x[j] = e < p.E ? to_float(__ldg(logits + e)) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int e = e0 + 32 * j;
      if (e >= p.E) break;
      const unsigned k32 = __float_as_uint(p.tokens_softmax ? score_of(x[j], s.col_max[e], s.col_rcp[e])
                                                            : score_of(x[j], mx, rcp));
      const unsigned long long theta = (static_cast<unsigned long long>(s.theta_hi[e]) << 32) | s.theta_lo[e];
      const unsigned flagged = column_key(k32, t) >= theta ? (k32 | kPickedBit) : k32;
      stage[e] = flagged;
      keep_top_two(lb, row_key(flagged, e));
    }
  }
  return lb;
}

// The lane's expert `taken` was output: move on to its next best.
__device__ __forceinline__ void advance(LaneBest& lb, const unsigned* stage, int E, unsigned long long taken) {
  if (lb.second_known) {
    lb.best = lb.second;
    lb.second_known = false;
    return;
  }
  LaneBest next{0, 0, true};
  for (int e = lane_id(); e < E; e += 32) {  // every key of this lane above `taken` was output already
    const unsigned long long key = row_key(stage[e], e);
    if (key < taken) keep_top_two(next, key);
  }
  lb = next;
}

// Output slot j of a token: expert e with its score, counted for expert e.
__device__ __forceinline__ void write_slot(const FinalizerSmem& s, int32_t* out_ids, float* out_weights, int j, int e,
                                           unsigned score_bits) {
  if (lane_id() == 0) {
    out_ids[j] = e;
    out_weights[j] = __uint_as_float(score_bits);
    atomicAdd(s.counts + e, 1u);
  }
}

// Candidate path: routes token t from its pick list when that list holds all its picks and no slot needs a fallback
// expert; returns the slots filled, or -1 when the token must recompute its row instead. Lane i holds pick i and
// ranks it against the others (keys are unique: distinct experts), so every slot is written at once.
template <typename In>
__device__ int route_from_picks(const Params<In>& p, const FinalizerSmem& s, int t, int32_t* out_ids,
                                float* out_weights) {
  const int lane = lane_id();
  // Both loads in flight at once: the lane's slot is read before the count says whether it holds a pick.
  const uint2 pick = lane < p.pick_slots ? __ldcg(p.picks + static_cast<size_t>(t) * p.pick_slots + lane)
                                         : make_uint2(0u, 0u);  // (score bits, expert)
  const unsigned n = __ldcg(p.pick_count + t);
  if (n > static_cast<unsigned>(p.pick_slots) || (p.fallback_topk && n < static_cast<unsigned>(p.top_k))) return -1;
  const unsigned long long key = lane < static_cast<int>(n) ? row_key(pick.x, static_cast<int>(pick.y)) : 0ull;
  int rank = 0;
  for (int j = 0; j < static_cast<int>(n); ++j) rank += __shfl_sync(kFullWarp, key, j) > key ? 1 : 0;
  if (lane < static_cast<int>(n) && rank < p.top_k) {
    out_ids[rank] = static_cast<int>(pick.y);
    out_weights[rank] = __uint_as_float(pick.x);
    atomicAdd(s.counts + pick.y, 1u);
  }
  return min(static_cast<int>(n), p.top_k);
}

__device__ __forceinline__ void clear_slots(int32_t* out_ids, float* out_weights, int filled, int k) {
  for (int j = filled + lane_id(); j < k; j += 32) {
    out_ids[j] = -1;
    out_weights[j] = 0.0f;
  }
}

// Routes token t without its row (a padding token, or from its pick list); false when the row is needed.
template <typename In>
__device__ bool route_token_without_row(const Params<In>& p, const FinalizerSmem& s, int t) {
  const int k = p.top_k;
  int32_t* out_ids = p.ids + static_cast<size_t>(t) * k;          // [k]
  float* out_weights = p.weights + static_cast<size_t>(t) * k;    // [k]
  const int filled = token_is_real(p.token_mask, t)
                         ? (p.candidates ? route_from_picks(p, s, t, out_ids, out_weights) : -1)
                         : 0;
  if (filled < 0) return false;
  clear_slots(out_ids, out_weights, filled, k);
  return true;
}

// Routes real token t from its whole row against the thresholds.
template <typename In>
__device__ void route_token_from_row(const Params<In>& p, const FinalizerSmem& s, unsigned* stage, int t) {
  const int k = p.top_k;
  int32_t* out_ids = p.ids + static_cast<size_t>(t) * k;          // [k]
  float* out_weights = p.weights + static_cast<size_t>(t) * k;    // [k]
  int filled = 0;
  // Each lane reads back only the stage entries it wrote itself, so no warp barrier is needed.
  LaneBest lb = stage_token(p, s, stage, t);
  for (; filled < k; ++filled) {
    const unsigned long long top = warp_max_u64(lb.best);  // the same on every lane: the loop stays uniform
    const unsigned flagged = static_cast<unsigned>(top >> 32);
    if (top == 0 || (!p.fallback_topk && !(flagged & kPickedBit))) break;
    const int e = static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(top));
    write_slot(s, out_ids, out_weights, filled, e, flagged & ~kPickedBit);
    if (lb.best == top) advance(lb, stage, p.E, top);
  }
  clear_slots(out_ids, out_weights, filled, k);
}

// The finalizer's shared memory (ec_params.cuh's finalizer_smem_bytes).
template <typename In>
__device__ __forceinline__ FinalizerSmem finalizer_smem(const Params<In>& p, unsigned char* smem) {
  unsigned* base = reinterpret_cast<unsigned*>(smem + kScratchBytes);
  return FinalizerSmem{base,
                       base + p.E,
                       reinterpret_cast<float*>(base + 2 * p.E),
                       reinterpret_cast<float*>(base + 3 * p.E),
                       base + 4 * p.E,
                       base + 5 * p.E,
                       base + static_cast<size_t>(5 + p.fin_warps) * p.E};
}

// The same with the thresholds, softmax statistics and zeroed counts loaded, once the sel_blocks blocks that publish
// the thresholds have counted themselves in `selectors_done` (nullptr: they ran in an earlier launch).
template <typename In>
__device__ FinalizerSmem load_finalizer_state(const Params<In>& p, unsigned char* smem, unsigned* selectors_done) {
  const FinalizerSmem s = finalizer_smem(p, smem);
  if (selectors_done != nullptr) wait_for(selectors_done, p.sel_blocks);
  for (int e = threadIdx.x; e < p.E; e += kBlock) {
    s.theta_hi[e] = __ldcg(p.theta_hi + e);  // written by other blocks of this launch: read from L2
    s.theta_lo[e] = __ldcg(p.theta_lo + e);
    if (p.tokens_softmax) {
      s.col_max[e] = __ldcg(p.col_max + e);
      s.col_rcp[e] = __ldcg(p.col_rcp + e);
    }
    s.counts[e] = 0;
  }
  __syncthreads();
  return s;
}

// The block's per-expert counts of written ids, added once to the global counts.
__device__ __forceinline__ void flush_counts(const FinalizerSmem& s, int E, int32_t* counts) {
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kBlock)
    if (s.counts[e] != 0) atomicAdd(counts + e, static_cast<int32_t>(s.counts[e]));
}

// Column and candidate paths: warp w of the block routes tokens block * fin_warps + w + i * stride, each in turn
// (from its pick list when it can, else from its row).
template <typename In>
__device__ void run_finalizer(const Params<In>& p, int block, unsigned char* smem, unsigned* selectors_done) {
  const FinalizerSmem s = load_finalizer_state(p, smem, selectors_done);
  const int warp = warp_id();
  if (warp < p.fin_warps) {
    unsigned* stage = s.stage + static_cast<size_t>(warp) * p.E;  // [E]
    const int stride = p.fin_blocks * p.fin_warps;
    for (int t = block * p.fin_warps + warp; t < p.T; t += stride)
      if (!route_token_without_row(p, s, t)) route_token_from_row(p, s, stage, t);
  }
  flush_counts(s, p.E, p.counts);
}

}  // namespace jitmoe::ec
