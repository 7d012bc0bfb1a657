// Fused grouped top-k routing with DeepSeek-V3 semantics ("noaux_tc"), one launch, logits read once.
//
// Per row (a warp for E <= 128 * CH, else a 256-thread block; see row_team.cuh):
//  1. scores s = softmax(x) or sigmoid(x) in fp32; selection keys order like s + bias when a bias is given, else
//     like the logit x (same ranking as s, exact).
//  2. the keys are staged in shared memory and each group of gs = E / n_group consecutive experts gets a score:
//     with a bias the fp32 sum of its two largest biased scores (the single one when gs == 1), else its max key.
//     Teams of up to 32 lanes share a group and merge their top-2 with shuffles, so any group size works.
//  3. one warp keeps the topk_group best groups (ties: lower group id) with the same arg-max rounds as step 5.
//  4. experts of the other groups are masked out; 5. select.cuh picks the k best remaining experts exactly.
//  6. weights = unbiased scores of the winners, divided by their sum when renormalising, times
//     routed_scaling_factor.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>
#include "routing/row_team.cuh"
#include "routing/select.cuh"
#include "routing/topk_route.cuh"

namespace jitmoe::routing {

struct GroupedParams {
  const void* logits;    // [T, E] of T (the spec's dtype), contiguous
  const float* bias;     // [E] e_score_correction_bias or nullptr
  float* weights;        // [T, k]
  int32_t* ids;          // [T, k]
  int64_t num_tokens;    // T
  int num_experts;       // E, a multiple of n_group
  int k;                 // <= 32 and <= topk_group * E / n_group
  int n_group;
  int topk_group;        // <= n_group
  int scoring;           // kScoringSoftmax / kScoringSigmoid
  bool renormalize;
  bool vec16;            // logits 16-byte aligned and E % CH == 0
  float routed_scaling_factor;
};

constexpr int kGroupedKmax = 32;
constexpr int kMaxDynamicSmem = 48 * 1024;

// 32-bit words of shared memory per row: candidate keys [E], candidate ids [E], group keys, ids and kept flags.
__host__ __device__ inline int grouped_row_words(int E, int n_group) { return 2 * E + 3 * n_group; }

// Step 2. keys: [E] staged selection keys (shared); writes gk/gi: [n_group]. t: thread in the team of G threads.
// The loop over groups runs the same number of times in every thread so that team shuffles stay converged.
__device__ __forceinline__ void group_scores(const uint32_t* keys, int gs, int n_group, bool top2_sum, uint32_t* gk,
                                             int32_t* gi, int t, int G) {
  int tpg = 1;  // threads per group: a power of two <= 32, so teams never straddle a warp
  while (tpg < kWarpSize && tpg * 2 * n_group <= G && tpg < gs) tpg *= 2;
  const int teams = G / tpg;
  const int member = t % tpg;
  for (int base = 0; base < n_group; base += teams) {
    const int g = base + t / tpg;
    uint32_t a1 = 0, a2 = 0;  // this thread's two largest keys of group g
    if (g < n_group) {
#pragma unroll 1  // unrolling this latency-bound scan only costs registers (it spilled on sm_80)
      for (int j = member; j < gs; j += tpg) {
        const uint32_t v = keys[g * gs + j];
        a2 = max(a2, min(a1, v));
        a1 = max(a1, v);
      }
    }
    for (int off = tpg / 2; off > 0; off /= 2) {
      const uint32_t b1 = __shfl_xor_sync(kFullMask, a1, off);
      const uint32_t b2 = __shfl_xor_sync(kFullMask, a2, off);
      a2 = max(min(a1, b1), max(a2, b2));
      a1 = max(a1, b1);
    }
    if (g < n_group && member == 0) {
      gk[g] = (top2_sum && gs > 1) ? order_key(key_to_float(a1) + key_to_float(a2)) : a1;
      gi[g] = g;
    }
  }
}

// Steps 2-3 on the staged keys ([E] shared, written by the team before the call): sets kept[g] ([n_group]) to 1
// for the topk_group best groups and 0 for the others. Called by the whole team; ends with a team barrier, after
// which the staged keys may be overwritten.
template <int NW>
__device__ __forceinline__ void keep_best_groups(const uint32_t* keys, int gs, int n_group, int topk_group,
                                                 bool top2_sum, int t, int G, const Team<NW>& team, uint32_t* gk,
                                                 int32_t* gi, int32_t* kept) {
  for (int g = t; g < n_group; g += G) kept[g] = 0;
  team.sync();
  group_scores(keys, gs, n_group, top2_sum, gk, gi, t, G);
  team.sync();
  if (NW == 1 || threadIdx.x < kWarpSize) {
    const int lane = threadIdx.x % kWarpSize;
    warp_select(gk, gi, n_group, topk_group, [&](int, uint32_t, int32_t w) {
      if (lane == 0) kept[w] = 1;
    });
  }
  team.sync();
}

// Step 4: clears the validity bits of experts whose group is not kept (kept: [n_group] shared). The group index is
// stepped per element, so there is one division per chunk.
template <typename T, int NCH, int G>
__device__ __forceinline__ uint32_t mask_dropped_groups(uint32_t valid, int t, int E, int gs, const int32_t* kept) {
  using L = RowLayout<T, NCH, G>;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int e0 = (c * G + t) * L::kChunk;
    if (e0 >= E) continue;
    int g = static_cast<int>(static_cast<unsigned>(e0) / static_cast<unsigned>(gs));
    int next_start = (g + 1) * gs;
#pragma unroll
    for (int j = 0; j < L::kChunk; ++j) {
      const int e = e0 + j;
      if (e >= next_start) {  // gs >= 1: one step never crosses two group boundaries
        ++g;
        next_start += gs;
      }
      if (e < E && kept[g] == 0) valid &= ~(1u << (c * L::kChunk + j));
    }
  }
  return valid;
}

template <typename T, int NCH, int NW>
__global__ void __launch_bounds__(NW == 1 ? kWarpTeamRowsPerBlock * kWarpSize : NW * kWarpSize)
grouped_topk_kernel(const GroupedParams p) {
  constexpr int G = NW * kWarpSize;
  constexpr int P = kGroupedKmax / kWarpSize;
  using L = RowLayout<T, NCH, G>;
  constexpr int S = L::kSlots;
  extern __shared__ uint32_t dyn_smem[];  // per row: grouped_row_words(E, n_group) words
  __shared__ uint32_t scratch[Team<NW>::kSlots * NW];
  __shared__ int cand_count;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int E = p.num_experts;
  const int ng = p.n_group;
  const int gs = E / ng;
  const int64_t t = NW == 1 ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp : blockIdx.x;
  if (t >= p.num_tokens) return;  // only whole warps of a warp team leave here; they share no barrier
  const int tt = NW == 1 ? lane : static_cast<int>(threadIdx.x);
  uint32_t* ck = dyn_smem + (NW == 1 ? warp * grouped_row_words(E, ng) : 0);  // [E] staged keys, then candidates
  int32_t* ci = reinterpret_cast<int32_t*>(ck + E);                             // [E]
  uint32_t* gk = ck + 2 * E;                                                     // [n_group]
  int32_t* gi = reinterpret_cast<int32_t*>(gk + ng);                             // [n_group]
  int32_t* kept = gi + ng;                                                       // [n_group]
  const Team<NW> team{scratch};
  const T* row = static_cast<const T*>(p.logits) + t * E;

  float x[S];
  uint32_t valid = load_row<T, NCH, G>(row, E, tt, p.vec16, x);
  const Scorer sc = make_scorer(p.scoring, x, valid, team, 0, 1);
  const bool biased = p.bias != nullptr;
  uint32_t key[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const bool v = valid >> s & 1u;
    const float choice = biased && v ? sc(x[s]) + __ldg(p.bias + L::expert(tt, s)) : x[s];
    key[s] = v ? order_key(choice) : 0u;
    if (v) ck[L::expert(tt, s)] = key[s];
  }
  if (NW > 1 && threadIdx.x == 0) cand_count = 0;  // ordered before use by the barriers below
  keep_best_groups(ck, gs, ng, p.topk_group, biased, tt, G, team, gk, gi, kept);
  valid = mask_dropped_groups<T, NCH, G>(valid, tt, E, gs, kept);
#pragma unroll
  for (int s = 0; s < S; ++s) key[s] = (valid >> s & 1u) ? key[s] : 0u;

  const auto expert_of = [tt](int s) { return L::expert(tt, s); };
  int n = gather_candidates<NW, P>(key, valid, p.k, full_warps<NW>(E, L::kChunk), expert_of, team, 2, ck, ci,
                                   &cand_count);
  team.sync();
  if (NW > 1) {
    if (warp != 0) return;
    n = cand_count;
  }
  uint32_t win_key[P];
  int32_t win_id[P];
  warp_select(ck, ci, n, p.k, [&](int r, uint32_t m, int32_t w) {
    if (r == lane) {
      win_key[0] = m;
      win_id[0] = w;
    }
  });
  store_winners<T, P>(row, win_key, win_id, biased, sc, p.renormalize, p.routed_scaling_factor, t, p.num_tokens,
                      p.k, p.weights, p.ids, nullptr);
}

template <typename T, int NCH, int NW>
inline void launch_grouped_team(const GroupedParams& p, cudaStream_t stream) {
  const size_t row_bytes = static_cast<size_t>(grouped_row_words(p.num_experts, p.n_group)) * sizeof(uint32_t);
  const size_t fit = kMaxDynamicSmem / row_bytes;  // rows whose lists fit the default dynamic smem (>= 1)
  const int rows = NW == 1 ? static_cast<int>(std::clamp<size_t>(fit, 1, kWarpTeamRowsPerBlock)) : 1;
  const int64_t blocks = (p.num_tokens + rows - 1) / rows;
  grouped_topk_kernel<T, NCH, NW><<<static_cast<unsigned>(blocks), rows * NW * kWarpSize, rows * row_bytes,
                                    stream>>>(p);
}

// E <= 1024: a warp team up to 128 * CH experts, else (fp32 only) one 256-thread block per row.
template <typename T>
inline void launch_grouped_topk(const GroupedParams& p, cudaStream_t stream) {
  constexpr int CH = 16 / static_cast<int>(sizeof(T));
  const int E = p.num_experts;
  if (p.num_tokens <= 0) return;
  if (E <= 32 * CH) return launch_grouped_team<T, 1, 1>(p, stream);
  if (E <= 64 * CH) return launch_grouped_team<T, 2, 1>(p, stream);
  if (E <= 128 * CH) return launch_grouped_team<T, 4, 1>(p, stream);
  return launch_grouped_team<T, 1, kBlockTeamWarps>(p, stream);
}

}  // namespace jitmoe::routing
