// Launch plan of the Expert Choice kernels (host code): which path, the workspace layout, grid sizes, experts per
// selector block, shared memory. The path and the workspace depend on the problem only, never on the device.
#pragma once
#include <algorithm>
#include <cstddef>

#include "expert_choice/ec_params.cuh"

namespace jitmoe::ec {

constexpr size_t kCacheBudget = 128 * 1024;     // key cache of one selector block
constexpr size_t kFinalizerBudget = 64 * 1024;  // finalizers may use this much even when selectors need less

enum Path : int { kPathAuto = 0, kPathColumns = 1, kPathCandidates = 2, kPathKeys = 3 };

// Below this many tokens the column path is as fast (its selectors then read short columns) and needs no sample.
constexpr long long kCandidateMinTokens = 2048;
// Expert-major candidate rows are ordered through a [T] bitmap and its prefix counts in shared memory.
constexpr long long kCandidateMaxBitmapTokens = 1ll << 18;
// Key path: a selector holds its expert's column of 16-bit keys in shared memory. Auto takes it from 1024 to 32768
// tokens (H100, 2026-11-23, bf16, E = 64..1024: 1.1-2.3x faster than the candidate path there, as fast at E = 512,
// k = 32 token-major, 1.5x faster than the column path at T = 1024; at T = 65536, E = 256 the candidate path was
// 13% faster, below 1024 tokens the column path).
constexpr long long kKeyMaxTokens = 1ll << 16;
constexpr long long kKeyAutoMinTokens = 1024;
constexpr long long kKeyAutoMaxTokens = 1ll << 15;

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// The chosen path and its sizes (candidate path: ec_candidates.cuh; key path: ec_keys.cuh).
struct PathShape {
  bool candidates, keys;
  int sample_count, sample_rank, cand_cap;  // candidate path
  int pick_slots;                           // candidate path: recorded picks per token (token-major)
  int row_chunks;                           // both: 32-expert chunks of a row held in registers (0: recompute)
  int key_pitch;                            // key path: T rounded up to a tile of tokens
  int pick_words;                           // key path, token-major: pick-bit words per expert (0 expert-major)
};

// The smallest power-of-two count of 32-expert chunks covering E, up to max_chunks (0 when E needs more).
inline int row_chunks_for(int E, int max_chunks) {
  for (int chunks = 1; chunks <= max_chunks; chunks *= 2)
    if (E <= 32 * chunks) return chunks;
  return 0;
}

// Returns nullptr, or why the requested path cannot run.
inline const char* choose_path(PathShape& ps, long long T, int E, long long capacity, int top_k,
                               bool tokens_softmax, bool expert_major, int path) {
  ps = PathShape{};
  const bool candidates_possible = !tokens_softmax && (!expert_major || T <= kCandidateMaxBitmapTokens);
  const bool keys_possible = !tokens_softmax && T <= kKeyMaxTokens && E <= 32 * kKeyMaxChunks;
  if (path == kPathCandidates && !candidates_possible)
    return "the candidate path needs normalize_over=\"experts\" (and T <= 2^18 when expert-major)";
  if (path == kPathKeys && !keys_possible)
    return "the key path needs normalize_over=\"experts\", T <= 2^16 and E <= 1024";
  ps.keys = path == kPathKeys ||
            (path == kPathAuto && keys_possible && kKeyAutoMinTokens <= T && T <= kKeyAutoMaxTokens);
  // Auto: where the candidate lists stay short next to the columns they replace and the row pass keeps its scores
  // in registers (H100, 2026-11-22: 1.4-2.3x faster there; E = 1024 at T = 4096 was 16% slower, 143 vs 123 us).
  ps.candidates = !ps.keys && (path == kPathCandidates ||
                               (path == kPathAuto && candidates_possible && T >= kCandidateMinTokens &&
                                2 * capacity <= T && E <= 32 * kMaxRowChunks));
  if (!ps.keys && !ps.candidates) return nullptr;
  if (ps.keys) {
    ps.row_chunks = row_chunks_for(E, kKeyMaxChunks);
    ps.key_pitch = static_cast<int>(ceil_div(T, kKeyTileTokens) * kKeyTileTokens);
    ps.pick_words = expert_major ? 0 : ps.key_pitch / kKeyTileTokens;  // expert-major lists its picks instead
    return nullptr;
  }
  ps.pick_slots = expert_major ? 0 : (top_k <= 8 ? 16 : kMaxPickSlots);
  ps.sample_count = static_cast<int>(std::min<long long>(T, kSampleTokens));
  // Rank kSampleMargin + twice the sampled share of C: the bound's expected candidates are ~2C (never fewer than C
  // unless the sample is far off), and the slots hold 1.5x that.
  ps.sample_rank = static_cast<int>(
      std::min<long long>(ps.sample_count, ceil_div(2 * capacity * ps.sample_count, T) + kSampleMargin));
  const long long expected = ceil_div(static_cast<long long>(ps.sample_rank) * T, ps.sample_count);
  ps.cand_cap = static_cast<int>(std::min<long long>(T, expected + expected / 2 + 1024));
  ps.row_chunks = row_chunks_for(E, kMaxRowChunks);
  return nullptr;
}

// Workspace offsets in 32-bit words: [counters][row_max, row_rcp: T][theta_hi, theta_lo, col_max, col_rcp: E]
// then, on the candidate path, [pick_count: T][picks: T * pick_slots uint2][bound: E][cand_count: E * kCountStride]
// [sample_keys: E * S][cand: E * cap uint2], on the key path [keys: E * key_pitch u16] (16-byte aligned rows)
// [pick_bits: pick_words * E] (token-major only).
struct Workspace {
  long long row_max, row_rcp, theta_hi, theta_lo, col_max, col_rcp;
  long long pick_count, picks;
  long long bound, cand_count, sample_keys, cand;
  long long keys, pick_bits;
  long long words;
};

inline Workspace workspace_layout(const PathShape& ps, long long T, long long E) {
  Workspace w{};
  long long at = kCounters;
  auto take = [&at](long long words, long long align = 1) {
    at = ceil_div(at, align) * align;
    const long long offset = at;
    at += words;
    return offset;
  };
  w.row_max = take(T);
  w.row_rcp = take(T);
  w.theta_hi = take(E);
  w.theta_lo = take(E);
  w.col_max = take(E);
  w.col_rcp = take(E);
  if (ps.candidates) {
    w.pick_count = take(ps.pick_slots > 0 ? T : 0);
    w.picks = take(2 * T * ps.pick_slots, 2);  // uint2
    w.bound = take(E);
    w.cand_count = take(E * kCountStride);
    w.sample_keys = take(static_cast<long long>(ps.sample_count) * E);
    w.cand = take(2 * E * ps.cand_cap, 2);
  }
  if (ps.keys) {
    w.keys = take(E * ps.key_pitch / 2, 4);  // uint4 loads
    w.pick_bits = take(static_cast<long long>(ps.pick_words) * E);
  }
  w.words = at;
  return w;
}

struct Plan {
  const char* error;     // nullptr when the plan can run
  PathShape ps;
  int group;             // experts per selector block
  bool cache_keys;
  int bound_blocks, row_blocks, sel_blocks, fin_blocks, fin_warps;
  int stage_slots;  // candidate path: row-phase offers staged per expert
  long long prep_blocks;
  size_t smem_bytes;     // dynamic shared memory of the route kernel (key path: of the finalize kernel)
  size_t key_tile_smem, key_select_smem;  // key path: of the score-keys and select kernels
};

// Selector blocks: cache the keys when a column fits the budget, and take up to 32 bytes of each row (adjacent
// experts share the sectors they read) while at least half the SMs still get a selector block.
inline void plan_selectors(Plan& plan, long long T, int E, int elem_bytes, int num_sms, size_t smem_optin) {
  const size_t cache_limit = std::min(smem_optin, selector_smem_bytes(1, false, 0) + kCacheBudget);
  plan.cache_keys = selector_smem_bytes(1, true, T) <= cache_limit;
  plan.group = 1;
  const int max_group = std::min(kMaxGroup, std::max(1, 32 / elem_bytes));
  while (plan.cache_keys && 2 * plan.group <= max_group &&
         selector_smem_bytes(2 * plan.group, true, T) <= cache_limit &&
         2 * ceil_div(E, 2 * plan.group) >= num_sms)
    plan.group *= 2;
  plan.sel_blocks = static_cast<int>(ceil_div(E, plan.group));
  plan.smem_bytes = selector_smem_bytes(plan.group, plan.cache_keys, T);
}

// Finalizer blocks: as many token warps as the shared memory left by the selectors (or the budget) can stage, and
// up to two blocks per SM (the route kernel's launch bounds allow two resident blocks). The key path's finalizer
// walks tiles of kKeyTileTokens tokens, one per warp, and stages rows only for the tokens that need them.
inline void plan_finalizers(Plan& plan, long long T, int E, int num_sms, size_t smem_optin) {
  // The key path's finalizer runs one block per SM (its launch bounds): it may take all the shared memory, so that
  // large E still gets many row warps (E = 1024 got 7 of them under the budget and took 1.8x as long).
  const size_t room = plan.ps.keys ? smem_optin : std::min(smem_optin, std::max(plan.smem_bytes, kFinalizerBudget));
  const size_t extra = plan.ps.keys ? kKeyFinalizerExtraBytes : 0;
  const size_t fixed = finalizer_smem_bytes(E, 0) + extra;
  const long long fit = room > fixed ? static_cast<long long>((room - fixed) / (4ull * E)) : 0;
  plan.fin_warps = static_cast<int>(std::clamp<long long>(fit, 1, kMaxFinalizerWarps));
  plan.smem_bytes = std::max(plan.smem_bytes, finalizer_smem_bytes(E, plan.fin_warps) + extra);
  const long long resident = 2ll * std::max(num_sms, 1);
  const long long units = plan.ps.keys ? ceil_div(T, kKeyTileTokens) : ceil_div(T, plan.fin_warps);
  plan.fin_blocks = static_cast<int>(std::clamp<long long>(units, 1, resident));
}

// Finalizers in a single wave: no more blocks than fit on the GPU at once with the route kernel's shared memory
// (a second wave would only repeat each block's setup and leave a tail).
inline void fit_finalizers_in_one_wave(Plan& plan, int blocks_per_sm, int num_sms) {
  plan.fin_blocks = std::max(1, std::min(plan.fin_blocks, std::max(blocks_per_sm, 1) * std::max(num_sms, 1)));
}

// Candidate path: shared memory the row phase may stage offers in.
constexpr size_t kCandidateSmemBudget = 160 * 1024;

// Candidate path: the row phase's stage slots, and the selectors' cached items (plus the expert-major token bitmap
// and its prefix counts), whichever needs more shared memory.
inline void plan_candidate_phases(Plan& plan, long long T, int E, bool expert_major, size_t smem_optin) {
  plan.group = 1;
  plan.cache_keys = false;
  const size_t budget = std::min(smem_optin, kCandidateSmemBudget);
  const size_t row_fixed = candidate_rows_smem_bytes(E, 0);
  plan.stage_slots = budget > row_fixed
                         ? static_cast<int>(std::min<size_t>(kMaxStageSlots, (budget - row_fixed) / (8ull * E)))
                         : 0;
  const size_t bitmap = expert_major ? 8ull * ceil_div(T, 32) : 0ull;
  plan.smem_bytes = std::max<size_t>(selector_smem_bytes(1, false, 0) + 8ull * kCachedItems + bitmap,
                                     candidate_rows_smem_bytes(E, plan.stage_slots));
}

// Candidate path: every phase gets at most one wave of blocks (blocks_per_sm from the occupancy query).
inline void fit_candidate_phases(Plan& plan, long long T, int E, int blocks_per_sm, int num_sms) {
  const long long resident = static_cast<long long>(std::max(blocks_per_sm, 1)) * std::max(num_sms, 1);
  plan.bound_blocks = static_cast<int>(std::min<long long>(E, resident));
  plan.row_blocks = static_cast<int>(std::clamp<long long>(ceil_div(T, kWarps), 1, resident));
  plan.sel_blocks = plan.bound_blocks;
}

// Key path: the score-keys tile and the selector's column; finalizers as on the other paths.
inline void plan_key_phases(Plan& plan, int E, size_t smem_optin) {
  plan.key_tile_smem = key_tile_smem_bytes(E);
  plan.key_select_smem = key_selector_smem_bytes(plan.ps.key_pitch);
  plan.smem_bytes = 0;
  if (std::max(plan.key_tile_smem, plan.key_select_smem) > smem_optin)
    plan.error = "too many tokens or experts for this GPU's shared memory per block";
}

inline Plan make_plan(long long T, int E, long long capacity, int top_k, int elem_bytes, bool expert_major,
                      bool tokens_softmax, int path, int num_sms, size_t smem_optin) {
  Plan plan{};
  plan.error = choose_path(plan.ps, T, E, capacity, top_k, tokens_softmax, expert_major, path);
  if (plan.error != nullptr) return plan;
  if (plan.ps.keys) {
    plan_key_phases(plan, E, smem_optin);
  } else if (plan.ps.candidates) {
    plan_candidate_phases(plan, T, E, expert_major, smem_optin);
  } else {
    plan_selectors(plan, T, E, elem_bytes, num_sms, smem_optin);
  }
  if (!expert_major) plan_finalizers(plan, T, E, num_sms, smem_optin);
  const long long row_threads =
      plan.ps.candidates ? 32ll * plan.ps.sample_count : (tokens_softmax || plan.ps.keys ? 0 : 32 * T);
  const long long prep_threads = std::max<long long>({row_threads, plan.ps.candidates ? T : 0, E, kCounters});
  plan.prep_blocks = ceil_div(prep_threads, kPrepBlock);
  if (plan.error == nullptr && plan.smem_bytes > smem_optin)
    plan.error = "too many experts for this GPU's shared memory per block";
  return plan;
}

}  // namespace jitmoe::ec
