// Top-k routing of one row per lane group for k <= G (E <= 4 * G * CH, CH = 16 / sizeof(T)): the common router
// shapes. A group is a whole warp (G = 32) or, for rows too short to give every lane of a warp a 16-byte chunk, a
// half warp (G = 16: two rows per warp instruction, no idle lanes).
//
// Built to issue few instructions per row: every step is one group-wide pass over the lane's S = NCH * CH register
// slots (RowLayout with a G-thread team), and no step rescans a lane per selected expert.
//  1. load: 16-byte loads (scalar ones for unaligned rows); slots past E hold -inf and an id >= E, so they lose
//     every comparison with a real expert (equal values go to the lower id) and add exp(-inf) = 0 to the softmax sum.
//  2. row maximum: the lanes' maxima reduced on order keys (redux.sync for a warp, shuffles for a half warp);
//     softmax sum of exp2 terms.
//  3. bound B: the k-th largest lane maximum (k - 1 rounds of a group max, each popping every lane that holds the
//     current maximum). At least k lanes hold an element >= B, so every top-k member is >= B.
//  4. candidates: the slots >= B (k plus a few on random rows) are appended to a list in shared memory, each lane
//     at the offset one shared atomic gives it (the list's order does not matter to step 5).
//  5. rank: with at most G candidates, lane i ranks candidate i against all of them under (value desc, id asc) and
//     writes output slot `rank` when rank < k; more candidates (heavy ties) take k rounds of group arg-max.
// Selection values are the logits themselves without a bias (softmax and sigmoid are increasing, so the order is
// exact and immune to rounding), else the fp32 score + bias. Weights are recomputed from the winners' logits.
//
// Exp: ex2.approx.ftz of fma(x, log2e, -max * log2e). Error of a softmax weight w_i = e_i / sum (e_j), y_i = the
// exponent <= 0: the rounded shift -max * log2e is common to every term and cancels in the ratio; the fma rounds
// once (absolute 2^-24 |y_i|, i.e. relative ln2 * 2^-24 * |y_i| on e_i, and w_i <= 2^y_i so that w_i * |y_i| <=
// 1 / (e ln2): <= 2.2e-8 absolute on w_i); fp32(log2e) is off by 2^-25 relative (scales y_i alike, same bound);
// ex2.approx is within 2 ulp (2.4e-7 relative) on e_i and on the sum. With the fp32 sum (the old expf path had the
// same) and 1 / sum by rcp.approx (1 ulp), the weight stays well inside the tests' 1e-6 (atol) + 1e-6 (rtol) of the
// float64 softmax. Sigmoid 1 / (1 + 2^(-x log2e)): ds = s (1 - s) de / e, s (1 - s) <= 1/4 and s (1 - s) |x| <=
// 0.23, so <= 1e-7 absolute; 2^(...) overflowing to inf gives 0, the limit (true value < 2^-126).
#pragma once
#include <climits>
#include <cstdint>
#include <cuda_runtime.h>
#include "routing/row_team.cuh"
#include "routing/select.cuh"

namespace jitmoe::routing {

constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x with rcp.approx.ftz (1 ulp).
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Scores with the fast exp (error analysis above).
struct FastScorer {
  int scoring;
  float neg_max_log2e;  // softmax: -(row max) * log2e
  float rcp_sum;        // softmax: 1 / sum of the exp2 terms (1 when the winners' weights are renormalised anyway)

  __device__ __forceinline__ float operator()(float x) const {
    if (scoring == kScoringSoftmax) return fast_exp2(fmaf(x, kLog2e, neg_max_log2e)) * rcp_sum;
    return __fdividef(1.0f, 1.0f + fast_exp2(x * -kLog2e));
  }
};

// Four bytes of -inf in T (16-bit types: two of them), the value of a padding slot.
template <typename T>
__device__ __forceinline__ uint32_t neg_inf_word() {
  if constexpr (sizeof(T) == 4) return 0xff800000u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 0xff80ff80u;
  return 0xfc00fc00u;  // fp16
}

// Lane `lane`'s slots of one row (layout RowLayout<T, NCH, G> over a group of G lanes); slots past E read -inf.
template <typename T, int NCH, int G>
__device__ __forceinline__ void load_row_padded(const T* __restrict__ row /* [E] */, int E, int lane, bool vec16,
                                                float (&x)[RowLayout<T, NCH, G>::kSlots]) {
  constexpr int CH = RowLayout<T, NCH, G>::kChunk;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int e0 = (c * G + lane) * CH;
    if (vec16) {  // every chunk is whole or entirely past E; a chunk past E re-reads the last one (no branch)
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + min(e0, E - CH)));
      const uint32_t pad = neg_inf_word<T>();
      const bool real = e0 < E;
      unpack16<T>(real ? v : make_uint4(pad, pad, pad, pad), x + c * CH);
    } else {
#pragma unroll
      for (int j = 0; j < CH; ++j) x[c * CH + j] = e0 + j < E ? to_float(row[e0 + j]) : -INFINITY;
    }
  }
}

// Softmax: the shift and 1 / sum over the row held by a group of G lanes (padding slots add 0); sigmoid: nothing.
template <int G, int S>
__device__ __forceinline__ FastScorer make_fast_scorer(int scoring, const float (&x)[S], float row_max,
                                                       bool need_sum) {
  FastScorer sc{scoring, -row_max * kLog2e, 1.0f};
  if (scoring != kScoringSoftmax || !need_sum) return sc;
  float acc = 0.f;
#pragma unroll
  for (int s = 0; s < S; ++s) acc += fast_exp2(fmaf(x[s], kLog2e, sc.neg_max_log2e));
  sc.rcp_sum = fast_rcp(LaneGroup<G>::sum_f32(acc));
  return sc;
}

// A key >= the k-th largest of the keys of a group's G lanes (k <= G; keys > 0), given their maximum: k - 1
// rounds that each remove every lane holding the current maximum. Exact when the lanes' keys are distinct; with
// ties the rounds go past the k-th largest, which only loosens the bound. Once every lane is removed the rounds
// yield 0, and the bound falls to the key of -inf (every slot is a candidate): rare, loose, still exact. Four
// instructions a round.
template <int G>
__device__ __forceinline__ uint32_t kth_largest_lane_key(uint32_t v, uint32_t max_key, int k) {
  constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf): no slot's key is below it
  uint32_t m = max_key;
  const auto round = [&] {
    v = v == m ? 0u : v;
    m = LaneGroup<G>::max_u32(v);
  };
  // k - 1 rounds: the remainder of 4 first, straight-line, then whole groups of 4. The plain loop compiled to
  // unrolled copies behind a chain of trip-count tests plus a rolled remainder with a branch per round.
  const int rounds = k - 1;
  switch (rounds & 3) {
    case 3: round();  // fall through
    case 2: round();  // fall through
    case 1: round();  // fall through
    default: break;
  }
#pragma unroll 1
  for (int g = rounds >> 2; g > 0; --g) {
    round();
    round();
    round();
    round();
  }
  return max(m, kNegInfKey);
}

// Like kth_largest_lane_key over each lane's two largest slots (head >= next, as keys; a round pops one entry of
// every lane holding the current maximum). Rows that give few lanes real experts (k close to that number of
// lanes) need it: the k-th largest lane maximum is then nearly the row's minimum, and the candidate list long.
template <int G>
__device__ __forceinline__ uint32_t kth_largest_top2_key(uint32_t head, uint32_t next, uint32_t max_key, int k) {
  uint32_t m = max_key;
  for (int r = 1; r < k; ++r) {
    if (head == m) {
      head = next;
      next = 0u;
    }
    const uint32_t top = LaneGroup<G>::max_u32(head);
    m = top != 0u ? top : m;
  }
  return m;
}

// Appends this lane's slots with value >= bound to the group's list cand and returns the list's length. A lane
// reserves its range with one shared atomic on *count (zero on entry; the group's lanes only), so the list's order
// varies from run to run: its users rank by (value, id), which does not depend on it. The predicated adds and
// stores are written in PTX because the compiler's version took about twice the instructions per slot, and this
// kernel is issue-bound at large T.
template <int G, int S, int CH>
__device__ __forceinline__ int compact_candidates(const float (&x)[S], float bound, int lane,
                                                  uint2* cand /* [G * S] (value bits, expert id) */, int* count) {
  uint32_t mine = 0;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    asm("{\n .reg .pred p;\n setp.ge.f32 p, %1, %2;\n @p add.u32 %0, %0, 1;\n}\n"
        : "+r"(mine) : "f"(x[s]), "f"(bound));
  }
  uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(cand));
  if (mine > 0) dst += 8u * atomicAdd(reinterpret_cast<unsigned*>(count), mine);
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const uint32_t expert = ((s / CH) * G + lane) * CH + s % CH;  // RowLayout<T, S / CH, G>::expert
    asm volatile(
        "{\n .reg .pred p;\n setp.ge.f32 p, %1, %2;\n @p st.shared.v2.u32 [%0], {%3, %4};\n"
        " @p add.u32 %0, %0, 8;\n}\n"
        : "+r"(dst) : "f"(x[s]), "f"(bound), "r"(__float_as_uint(x[s])), "r"(expert) : "memory");
  }
  __syncwarp(LaneGroup<G>::mask());
  return *count;
}

// A lane's result: output slot `pos` of the row gets expert `id` whose selection value is `value`.
struct Pick {
  bool have;
  int pos;
  float value;
  int32_t id;
};

// rank += 1 when (value, id) = (ov, oid) comes before (v, id) in the order (value desc, id asc). In PTX: the
// compiler's version spent a select and a move on the increment.
__device__ __forceinline__ void count_if_before(int& rank, uint32_t ov, uint32_t oid, float v, uint32_t id) {
  asm("{\n .reg .pred p;\n setp.eq.f32 p, %1, %3;\n setp.lt.and.u32 p, %2, %4, p;\n"
      " setp.gt.or.f32 p, %1, %3, p;\n @p add.s32 %0, %0, 1;\n}\n"
      : "+r"(rank) : "f"(__uint_as_float(ov)), "r"(oid), "f"(v), "r"(id));
}

// n <= G candidates (the lanes of the group): lane i ranks candidate i against all of them. The list is first
// padded to a multiple of 4 with entries that come after every candidate (-inf, id 0xffffffff), so the loop reads
// four entries per step with two 16-byte loads and has no remainder. cand: 16-byte aligned, room for G entries.
template <int G>
__device__ __forceinline__ Pick rank_candidates(uint2* cand, int n, int k, int lane) {
  const int padded = (n + 3) & ~3;
  if (lane >= n && lane < padded) cand[lane] = make_uint2(__float_as_uint(-INFINITY), 0xffffffffu);
  __syncwarp(LaneGroup<G>::mask());
  const uint2 mine = cand[min(lane, n - 1)];  // lanes >= n hold a copy and are masked out below
  const float v = __uint_as_float(mine.x);
  int rank = 0;
#pragma unroll 1
  for (int j = 0; j < padded; j += 4) {
    const uint4 ab = *reinterpret_cast<const uint4*>(cand + j);
    const uint4 cd = *reinterpret_cast<const uint4*>(cand + j + 2);
    count_if_before(rank, ab.x, ab.y, v, mine.y);
    count_if_before(rank, ab.z, ab.w, v, mine.y);
    count_if_before(rank, cd.x, cd.y, v, mine.y);
    count_if_before(rank, cd.z, cd.w, v, mine.y);
  }
  return {lane < n && rank < k, rank, v, static_cast<int32_t>(mine.y)};
}

// The candidate list of step 5 for warp_select_list: float values read as order keys, removal marks the id -1.
struct PairList {
  uint2* cand;  // [n]
  __device__ __forceinline__ uint32_t key(int f) const { return order_key(__uint_as_float(cand[f].x)); }
  __device__ __forceinline__ int32_t id(int f) const { return static_cast<int32_t>(cand[f].y); }
  __device__ __forceinline__ void remove(int f) const { cand[f].y = 0xffffffffu; }
};

// More than G candidates (ties at the bound): k rounds of arg-max over the group; lane r keeps the r-th winner.
template <int G>
__device__ __forceinline__ Pick select_many(uint2* cand /* [n] */, int n, int k, int lane) {
  Pick pick{lane < k, lane, 0.f, 0};
  warp_select_list<G>(PairList{cand}, n, k, [&](int r, uint32_t key, int32_t id) {
    if (r == lane) {
      pick.value = key_to_float(key);
      pick.id = id;
    }
  });
  return pick;
}

}  // namespace jitmoe::routing
