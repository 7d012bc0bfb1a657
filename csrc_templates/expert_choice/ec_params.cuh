// Expert Choice routing: kernel parameters, constants and the shared/global memory layouts.
// The host plan (expert_choice_plan.h) and the kernels both size memory with the functions below, so the layout has
// exactly one definition.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/dtypes.cuh"

namespace jitmoe::ec {

constexpr int kBlock = 1024;               // threads per block of the route kernel (selectors and finalizers)
constexpr int kWarps = kBlock / 32;
constexpr int kPrepBlock = 256;            // threads per block of the prepare kernel (one warp per token)
constexpr int kExpertLanes = 32;           // partial sums of a token's softmax over the experts (one warp)
constexpr int kTokenLanes = 1024;          // partial sums of an expert's softmax over the tokens (one block)
constexpr int kDigitBits = 11;             // radix-select digit
constexpr int kBins = 1 << kDigitBits;
constexpr int kListCap = 4096;             // candidate tokens kept in shared memory once the radix prefix is narrow
constexpr int kMaxGroup = 8;               // experts per selector block
constexpr int kMaxFinalizerWarps = kWarps;
constexpr int kRowQueue = 8 * kMaxFinalizerWarps;  // key path's finalizer: tokens queued to route from their rows
constexpr unsigned kInvalidKey = 0xFFFFFFFFu;  // key of a padding token (a real key is a score >= 0: top bit 0)
constexpr unsigned kPickedBit = 0x80000000u;   // finalizer: marks an expert that picked the token
// Candidate path (ec_candidates.cuh)
constexpr int kSampleTokens = 1024;        // tokens whose scores set each expert's candidate bound
constexpr int kSampleMargin = 8;           // extra sample ranks below the expected threshold rank
constexpr int kMaxPickSlots = 32;          // a token's recorded picks: one per lane of its finalizer warp
constexpr int kMaxRowChunks = 8;           // row pass: scores held in registers up to 32 * 8 experts
constexpr int kMaxStageSlots = 64;         // row pass: offers staged per (block, expert) before going to global memory
constexpr int kCachedItems = 4096;         // candidate lists up to this long are selected from shared memory
constexpr int kCountStride = 32;           // words between two experts' candidate counters: one 128-byte L2 line each
                                           // (packed counters serialise the row pass's atomics on a few lines)
// Key path (ec_keys.cuh)
constexpr int kKeyTileTokens = 32;         // tokens per score-keys block: one 64-byte run per expert row of keys
constexpr int kKeyTilePitch = kKeyTileTokens / 2 + 1;  // words per expert in the block's transpose tile (odd: no bank
                                                       // conflicts when a warp stores 32 experts of one token)
constexpr int kKeyRowThreads = 256;        // score-keys block: 8 warps, 4 tokens each
constexpr int kKeyMaxChunks = 32;          // score-keys warps hold a row in registers: E <= 32 * 32
constexpr int kKeySelectThreads = 512;     // key selector block (one expert)
constexpr unsigned kKeyFloor = 0x3400u;    // score bits >> 16 of 2^-23: smaller scores share the lowest key
constexpr int kKeyBins = 3072;             // keys 0 (padding) .. 0x3F80 - kKeyFloor + 1 (a score of 1)
constexpr int kRankList = kKeySelectThreads;  // boundary bins up to this size are ranked by pairwise counts
constexpr int kCounters = 8;               // [0] tickets, [1..3] phases done, [4] real tokens (with a mask)

static_assert(kTokenLanes == kBlock, "the per-expert sum gives each selector thread exactly one lane");
static_assert(kBins == 2 * kBlock, "the digit search gives each thread two bins");
static_assert(kWarps == 32, "block scans finish in a single warp");

template <typename In>
struct Params {
  const In* logits;          // [T, E] gating logits
  const bool* token_mask;    // [T] false = padding token, or nullptr (every token is real)
  int T, E;
  int capacity;              // C: tokens each expert picks (when that many real tokens exist)
  int top_k;
  bool tokens_softmax;       // normalize_over="tokens": softmax over the tokens of each expert
  bool fallback_topk;        // fill a token's empty slots from its top-k over the experts that did not pick it
  bool expert_major;         // write [E, C] token ids instead of [T, k] expert ids
  int group;                 // experts per selector block
  bool cache_keys;           // selectors keep their columns' keys in shared memory
  int sel_blocks, fin_blocks, fin_warps;
  // candidate path (ec_candidates.cuh); candidates == false runs the selectors of ec_select.cuh over whole columns
  bool candidates;
  int bound_blocks, row_blocks;  // blocks of the bound and row phases (sel_blocks / fin_blocks: the later phases)
  int row_chunks;            // row pass: 32-expert chunks held in registers (0: E > 32 * kMaxRowChunks, recompute)
  int sample_count;          // S sampled tokens: token floor(s * T / S) for s < S
  int sample_rank;           // each expert's candidate bound: at most the sample_rank-th best sampled score
  int cand_cap;              // candidate slots per expert
  int stage_slots;           // row pass: offers staged per expert in shared memory
  int pick_slots;            // recorded picks per token (token-major)
  int key_pitch;             // key path (ec_keys.cuh): tokens per expert row of keys (T rounded up to a tile)
  // workspace (written by the prepare kernel and the earlier phases)
  unsigned* counters;        // [kCounters] block tickets, phases done, real tokens
  float* row_max;            // [T] max logit of each token (normalize_over="experts")
  float* row_rcp;            // [T] 1 / softmax denominator of each token
  unsigned* theta_hi;        // [E] selection threshold per expert: high word of the 64-bit key (score bits)
  unsigned* theta_lo;        // [E] low word (~token id)
  float* col_max;            // [E] max logit of each expert over the real tokens (normalize_over="tokens")
  float* col_rcp;            // [E] 1 / softmax denominator of each expert
  unsigned* sample_keys;     // [E, S] score bits of the sampled tokens (kInvalidKey: padding)
  unsigned* bound;           // [E] score bits: tokens scoring >= bound[e] become candidates of expert e
  unsigned* cand_count;      // [E * kCountStride] candidates offered to expert e at [e * kCountStride] (may exceed cand_cap)
  uint2* cand;               // [E, cand_cap] (score bits, token)
  unsigned* pick_count;      // [T] experts that picked each token (may exceed pick_slots)
  uint2* picks;              // [T, pick_slots] (score bits, expert)
  unsigned short* keys;      // [E, key_pitch] key path: 16-bit keys of every score (key16), 0 for padding
  unsigned* pick_bits;       // [key_pitch / 32, E] key path, token-major: bit i of word (w, e) set when expert e
                             // picked token 32 w + i
  // outputs
  float* weights;            // [T, top_k] token-major, or [E, capacity] expert-major
  int32_t* ids;              // [T, top_k] expert ids, or [E, capacity] token ids
  int32_t* counts;           // [E] tokens routed to each expert
};

// Block-wide broadcast slots; the first bytes of every route block's dynamic shared memory.
struct Scratch {
  unsigned ticket;
  unsigned digit, rank, count, n_list;
  unsigned uvalue;
  float fvalue;
  unsigned long long key;
  unsigned warp_total[kWarps];
  unsigned run_picks[kKeySelectThreads / 32];  // key path: picks per warp's run of the column (ec_keys.cuh)
};
constexpr size_t kScratchBytes = 256;
static_assert(sizeof(Scratch) <= kScratchBytes, "Scratch must fit its slot");

// Selector shared memory: [Scratch][hist: kBins u32][list: kListCap u32][cache: group * T u32 when cache_keys]
// (the candidate path's phases put their cached items and token bitmap in the cache region)
__host__ __device__ constexpr size_t selector_smem_bytes(int group, bool cache_keys, long long T) {
  return kScratchBytes + 4ull * (kBins + kListCap) + (cache_keys ? 4ull * group * T : 0ull);
}

// Finalizer shared memory: [Scratch][theta_hi, theta_lo, col_max, col_rcp, counts: E each][stage: warps * E]
// [row queue: kRowQueue]
__host__ __device__ constexpr size_t finalizer_smem_bytes(int E, int warps) {
  return kScratchBytes + 4ull * E * (5ull + warps) + 4ull * kRowQueue;
}


// Key path's finalizer: the finalizer's layout, then [token masks: kWarps * kMaskPitch][pad to 8 bytes][picks:
// kWarps * 32 uint2] (each warp's token's picks, compacted), ec_keys.cuh.
constexpr int kMaskPitch = 33;  // words per token of the masks (odd: the transposing warps' stores hit distinct banks)
constexpr size_t kKeyFinalizerExtraBytes = 4ull * (kWarps * kMaskPitch + 1) + 8ull * kWarps * 32;

// Candidate path, row phase: [Scratch][bound, staged: E each][staged items: E * slots uint2]
__host__ __device__ constexpr size_t candidate_rows_smem_bytes(int E, int slots) {
  return kScratchBytes + 8ull * E + 8ull * E * slots;
}

// Key path: [Scratch][hist: kKeyBins u32][rank keys: kRankList u64][list: kRankList u32][column: key_pitch u16]
__host__ __device__ constexpr size_t key_selector_smem_bytes(long long key_pitch) {
  return kScratchBytes + 4ull * kKeyBins + 12ull * kRankList + 2ull * key_pitch;
}

// Key path: the score-keys block's transpose tile.
__host__ __device__ constexpr size_t key_tile_smem_bytes(int E) { return 4ull * E * kKeyTilePitch; }

__device__ __forceinline__ bool token_is_real(const bool* token_mask, int t) {
  return token_mask == nullptr || token_mask[t];
}

// The 64-bit key an expert ranks tokens by: score bits, then the lower token id first on equal scores.
__device__ __forceinline__ unsigned long long column_key(unsigned score_bits, int t) {
  return (static_cast<unsigned long long>(score_bits) << 32) | (0xFFFFFFFFu - static_cast<unsigned>(t));
}

// The 64-bit key a token ranks experts by: (picked bit | score bits), then the lower expert id first.
__device__ __forceinline__ unsigned long long row_key(unsigned flagged_score_bits, int e) {
  return (static_cast<unsigned long long>(flagged_score_bits) << 32) | (0xFFFFFFFFu - static_cast<unsigned>(e));
}

}  // namespace jitmoe::ec
