// Fused top-k routing (softmax or sigmoid scores, optional selection bias): one launch, logits read once.
//
// Each row is handled by a team (row_team.cuh): one warp per row for E <= 128 * CH (CH = 16 / sizeof(T); four rows
// per 128-thread block), a 256-thread block per row above. The team loads the row into registers with 16-byte
// loads, computes the softmax statistics in fp32 (max-subtracted), and builds one uint32 selection key per expert:
// without a bias the key orders like the logit itself (softmax and sigmoid are increasing, so this ranks exactly
// like the scores and is immune to their rounding); with a bias it orders like the fp32 score + bias. select.cuh
// then picks the k best experts under (key desc, id asc) exactly. The weights are the unbiased scores of the
// winners (recomputed with the same fp32 expression), divided by their sum when renormalising.
//
// Rows of k <= 32 on a one-warp team take the leaner kernel of warp_topk.cuh instead (same results up to the
// weights' last bits: it uses a fast exp2, see there).
//
// Compile-time: dtype T, KMAX (32 or 64: result slots per lane = KMAX / 32), the chunks per thread NCH and the
// team size; everything else (T, E, k, scoring, bias, renormalize) is a run-time argument.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "routing/row_team.cuh"
#include "routing/select.cuh"
#include "routing/warp_topk.cuh"

namespace jitmoe::routing {

struct TopkParams {
  const void* logits;    // [T, E] of T (the spec's dtype), contiguous
  const float* bias;     // [E] or nullptr
  float* weights;        // [T, k]
  int32_t* ids;          // [T, k]
  int32_t* token_expert_indices;  // [T, k] (j * T + t) or nullptr
  int64_t num_tokens;    // T
  int num_experts;       // E
  int k;
  int scoring;           // kScoringSoftmax / kScoringSigmoid
  bool renormalize;
  bool vec16;            // logits 16-byte aligned and E % CH == 0
};

constexpr int kWarpTeamRowsPerBlock = 4;
constexpr int kBlockTeamWarps = 8;

// Lane j (+ 32 p) of warp 0 holds the j-th winner: computes its weight, renormalises over the k winners and stores.
template <typename T, int P>
__device__ __forceinline__ void store_winners(const T* row /* [E] */, const uint32_t (&win_key)[P],
                                              const int32_t (&win_id)[P], bool biased, const Scorer& sc,
                                              bool renormalize, float scale, int64_t t, int64_t num_tokens, int k,
                                              float* weights /* [T, k] */, int32_t* ids /* [T, k] */,
                                              int32_t* tei /* [T, k] or null */) {
  const int lane = threadIdx.x % kWarpSize;
  float w[P];
  float local = 0.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int j = p * kWarpSize + lane;
    w[p] = 0.f;
    if (j < k) {
      // Without a bias the key is the logit itself; with one, re-read the logit (this row is still in L1).
      const float x = biased ? to_float(row[win_id[p]]) : key_to_float(win_key[p]);
      w[p] = sc(x);
    }
    local += w[p];
  }
  const float total = renormalize ? warp_sum(local) : 1.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int j = p * kWarpSize + lane;
    if (j >= k) continue;
    const int64_t out = t * k + j;
    weights[out] = (renormalize ? w[p] / total : w[p]) * scale;
    ids[out] = win_id[p];
    if (tei != nullptr) tei[out] = static_cast<int32_t>(j * num_tokens + t);
  }
}

template <typename T, int NCH, int NW, int KMAX>
__global__ void __launch_bounds__(NW == 1 ? kWarpTeamRowsPerBlock * kWarpSize : NW * kWarpSize)
topk_route_kernel(const TopkParams p) {
  constexpr int G = NW * kWarpSize;
  constexpr int P = KMAX / kWarpSize;
  using L = RowLayout<T, NCH, G>;
  constexpr int S = L::kSlots;
  extern __shared__ uint32_t dyn_smem[];  // per row: keys [E] then ids [E] of the candidate list
  __shared__ uint32_t scratch[Team<NW>::kSlots * NW];
  __shared__ int cand_count;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int E = p.num_experts;
  const int64_t t = NW == 1 ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp : blockIdx.x;
  if (t >= p.num_tokens) return;  // only whole warps of a warp team leave here; they share no barrier
  const int tt = NW == 1 ? lane : static_cast<int>(threadIdx.x);  // thread index inside the team
  uint32_t* ck = dyn_smem + (NW == 1 ? warp * 2 * E : 0);
  int32_t* ci = reinterpret_cast<int32_t*>(ck + E);
  if (NW > 1 && threadIdx.x == 0) cand_count = 0;  // ordered before use by the barriers below
  const Team<NW> team{scratch};
  const T* row = static_cast<const T*>(p.logits) + t * E;

  float x[S];
  const uint32_t valid = load_row<T, NCH, G>(row, E, tt, p.vec16, x);
  const Scorer sc = make_scorer(p.scoring, x, valid, team, 0, 1);
  const bool biased = p.bias != nullptr;
  uint32_t key[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const bool v = valid >> s & 1u;
    const float choice = biased && v ? sc(x[s]) + __ldg(p.bias + L::expert(tt, s)) : x[s];
    key[s] = v ? order_key(choice) : 0u;
  }

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
#pragma unroll
    for (int q = 0; q < P; ++q) {
      if (r == q * kWarpSize + lane) {
        win_key[q] = m;
        win_id[q] = w;
      }
    }
  });
  store_winners<T, P>(row, win_key, win_id, biased, sc, p.renormalize, 1.f, t, p.num_tokens, p.k, p.weights, p.ids,
                      p.token_expert_indices);
}

template <typename T, int NCH, int NW, int KMAX>
inline void launch_topk_team(const TopkParams& p, cudaStream_t stream) {
  const int rows = NW == 1 ? kWarpTeamRowsPerBlock : 1;
  const int64_t blocks = (p.num_tokens + rows - 1) / rows;
  const size_t smem = static_cast<size_t>(rows) * 2 * p.num_experts * sizeof(uint32_t);
  topk_route_kernel<T, NCH, NW, KMAX><<<static_cast<unsigned>(blocks), rows * NW * kWarpSize, smem, stream>>>(p);
}

// Output slot pick.pos of row t: the weight from the winner's logit, renormalised over the row's winners if asked.
template <int G, typename T>
__device__ __forceinline__ void store_pick(const Pick& pick, const T* row /* [E] */, bool biased,
                                           const FastScorer& sc, const TopkParams& p, int64_t t, bool row_valid) {
  const float logit = biased && pick.have ? to_float(row[pick.id]) : pick.value;
  float w = pick.have ? sc(logit) : 0.f;
  if (p.renormalize) w = __fdividef(w, LaneGroup<G>::sum_f32(w));
  if (!pick.have || !row_valid) return;
  const int64_t out = t * p.k + pick.pos;
  p.weights[out] = w;
  p.ids[out] = pick.id;
  if (p.token_expert_indices != nullptr)
    p.token_expert_indices[out] = static_cast<int32_t>(pick.pos * p.num_tokens + t);
}

// What a launch of the fast path knows at compile time. kGeneric: everything from TopkParams. The lean modes hold
// for the common router call (16-byte aligned rows that fill every lane's slots, E = NCH * G * CH, no bias), with
// the scoring fixed: the row length folds into the addressing, and the padding, bias and scoring branches vanish.
// This kernel is issue-bound at large T; measured on the H100 (fp32 E = 256, k = 8, T = 65536, graph replay):
// 34.7 -> 29.0 us.
enum WarpMode : int { kGeneric = 0, kLeanSoftmax = 1, kLeanSigmoid = 2 };

// The fast path of warp_topk.cuh, k <= G: one row per group of G lanes, 32 / G rows per warp.
template <typename T, int NCH, int G, int kMode>
__global__ void __launch_bounds__(kWarpTeamRowsPerBlock * kWarpSize) topk_warp_kernel(const TopkParams p) {
  using L = RowLayout<T, NCH, G>;
  using Group = LaneGroup<G>;
  constexpr int S = L::kSlots;
  constexpr int kGroups = kWarpSize / G;
  constexpr bool kLean = kMode != kGeneric;
  __shared__ __align__(16) uint2 cand_smem[kWarpTeamRowsPerBlock * kGroups][S * G];  // per group: (value bits, id)
  __shared__ int cand_count[kWarpTeamRowsPerBlock * kGroups];
  const int group = threadIdx.x / G;
  const int lane = Group::lane();
  const int E = kLean ? S * G : p.num_experts;
  const int scoring = kMode == kGeneric ? p.scoring : (kMode == kLeanSoftmax ? kScoringSoftmax : kScoringSigmoid);
  const bool biased = !kLean && p.bias != nullptr;
  const bool vec16 = kLean || p.vec16;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpTeamRowsPerBlock * kGroups;
  if (first + (threadIdx.x / kWarpSize) * kGroups >= p.num_tokens) return;  // whole warps leave here
  // A group past the last row (the second half of the last warp) routes the last row again and stores nothing,
  // so that both halves of a warp always run the same path.
  const int64_t t_raw = first + group;
  const bool row_valid = t_raw < p.num_tokens;
  const int64_t t = row_valid ? t_raw : p.num_tokens - 1;
  const T* row = static_cast<const T*>(p.logits) + t * E;

  if (lane == 0) cand_count[group] = 0;
  __syncwarp(Group::mask());  // the zero is seen by the group's atomics in compact_candidates
  float x[S];
  load_row_padded<T, NCH, G>(row, E, lane, vec16, x);
  float lane_max = x[0];
#pragma unroll
  for (int s = 1; s < S; ++s) lane_max = fmaxf(lane_max, x[s]);
  uint32_t lane_key = order_key(lane_max);
  uint32_t max_key = Group::max_u32(lane_key);
  const float row_max = key_to_float(max_key);
  const FastScorer sc = make_fast_scorer<G>(scoring, x, row_max, biased || !p.renormalize);
  if (biased) {  // select by fp32 score + bias; padding slots stay -inf
    lane_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int e = L::expert(lane, s);
      x[s] = e < E ? sc(x[s]) + __ldg(p.bias + e) : -INFINITY;
      lane_max = fmaxf(lane_max, x[s]);
    }
    lane_key = order_key(lane_max);
    max_key = Group::max_u32(lane_key);
  }
  // Short rows (one chunk per lane) may leave lanes without a real expert; when k exceeds half of the lanes that
  // hold one, bound with the lanes' two largest slots. Measured on the H100 (k = 8, bf16 E = 64, T = 65536):
  // 55.0 -> 24.2 us. Longer rows fill every lane and keep the one-slot bound.
  const int real_lanes = NCH == 1 ? min(G, (E + L::kChunk - 1) / L::kChunk) : G;
  uint32_t bound_key;
  if (NCH == 1 && 2 * p.k > real_lanes) {  // uniform: E and k are per launch
    float first = -INFINITY, second = -INFINITY;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      second = fmaxf(second, fminf(first, x[s]));
      first = fmaxf(first, x[s]);
    }
    bound_key = kth_largest_top2_key<G>(lane_key, order_key(second), max_key, p.k);
  } else {
    bound_key = kth_largest_lane_key<G>(lane_key, max_key, p.k);
  }
  const float bound = key_to_float(bound_key);
  uint2* cand = cand_smem[group];
  const int n = compact_candidates<G, S, L::kChunk>(x, bound, lane, cand, &cand_count[group]);
  const Pick pick = n <= G ? rank_candidates<G>(cand, n, p.k, lane) : select_many<G>(cand, n, p.k, lane);
  store_pick<G>(pick, row, biased, sc, p, t, row_valid);
}

template <typename T, int NCH, int G, int kMode>
inline void launch_topk_warp_mode(const TopkParams& p, cudaStream_t stream) {
  const int64_t rows_per_block = kWarpTeamRowsPerBlock * (kWarpSize / G);
  const int64_t blocks = (p.num_tokens + rows_per_block - 1) / rows_per_block;
  const int threads = kWarpTeamRowsPerBlock * kWarpSize;
  topk_warp_kernel<T, NCH, G, kMode><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
}

template <typename T, int NCH, int G>
inline void launch_topk_warp(const TopkParams& p, cudaStream_t stream) {
  constexpr int kFullRow = RowLayout<T, NCH, G>::kSlots * G;
  if (p.vec16 && p.bias == nullptr && p.num_experts == kFullRow) {
    if (p.scoring == kScoringSoftmax) return launch_topk_warp_mode<T, NCH, G, kLeanSoftmax>(p, stream);
    return launch_topk_warp_mode<T, NCH, G, kLeanSigmoid>(p, stream);
  }
  launch_topk_warp_mode<T, NCH, G, kGeneric>(p, stream);
}

// Picks the smallest team shape whose registers cover E (E <= 512 * CH is required: 4096 fp32 experts).
template <typename T, int KMAX>
inline void launch_topk_route(const TopkParams& p, cudaStream_t stream) {
  constexpr int CH = 16 / static_cast<int>(sizeof(T));
  const int E = p.num_experts;
  if (p.num_tokens <= 0) return;
  if constexpr (KMAX == kWarpSize) {
    // Rows that fill only half a warp's first chunk (E <= 16 * CH) go two per warp. Measured on the H100 (fp32,
    // k = 6..8): E = 64 25.0 -> 17.4 us at T = 65536; at E = 256 (four chunks per half warp) the half-warp kernel
    // was slower (37 -> 45 us: twice the registers, shuffle reductions), and so was k = 16 (16 shuffle rounds).
    if (E <= 16 * CH && p.k <= 8) return launch_topk_warp<T, 1, 16>(p, stream);
    if (E <= 32 * CH) return launch_topk_warp<T, 1, kWarpSize>(p, stream);
    if (E <= 64 * CH) return launch_topk_warp<T, 2, kWarpSize>(p, stream);
    if (E <= 128 * CH) return launch_topk_warp<T, 4, kWarpSize>(p, stream);
  }
  if (E <= 32 * CH) return launch_topk_team<T, 1, 1, KMAX>(p, stream);
  if (E <= 64 * CH) return launch_topk_team<T, 2, 1, KMAX>(p, stream);
  if (E <= 128 * CH) return launch_topk_team<T, 4, 1, KMAX>(p, stream);
  if (E <= 256 * CH) return launch_topk_team<T, 1, kBlockTeamWarps, KMAX>(p, stream);
  if (E <= 512 * CH) return launch_topk_team<T, 2, kBlockTeamWarps, KMAX>(p, stream);
  return launch_topk_team<T, 4, kBlockTeamWarps, KMAX>(p, stream);
}

}  // namespace jitmoe::routing
