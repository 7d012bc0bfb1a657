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
constexpr unsigned kInvalidKey = 0xFFFFFFFFu;  // key of a padding token (a real key is a score >= 0: top bit 0)
constexpr unsigned kPickedBit = 0x80000000u;   // finalizer: marks an expert that picked the token

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
  // workspace (written by the prepare kernel and the selectors)
  unsigned* counters;        // [2] block tickets, selector blocks done
  float* row_max;            // [T] max logit of each token (normalize_over="experts")
  float* row_rcp;            // [T] 1 / softmax denominator of each token
  unsigned* theta_hi;        // [E] selection threshold per expert: high word of the 64-bit key (score bits)
  unsigned* theta_lo;        // [E] low word (~token id)
  float* col_max;            // [E] max logit of each expert over the real tokens (normalize_over="tokens")
  float* col_rcp;            // [E] 1 / softmax denominator of each expert
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
};
constexpr size_t kScratchBytes = 256;
static_assert(sizeof(Scratch) <= kScratchBytes, "Scratch must fit its slot");

// Selector shared memory: [Scratch][hist: kBins u32][list: kListCap u32][cache: group * T u32 when cache_keys]
__host__ __device__ constexpr size_t selector_smem_bytes(int group, bool cache_keys, long long T) {
  return kScratchBytes + 4ull * (kBins + kListCap) + (cache_keys ? 4ull * group * T : 0ull);
}

// Finalizer shared memory: [Scratch][theta_hi, theta_lo, col_max, col_rcp, counts: E each][stage: warps * E]
__host__ __device__ constexpr size_t finalizer_smem_bytes(int E, int warps) {
  return kScratchBytes + 4ull * E * (5ull + warps);
}

// Workspace in 32-bit words: [counters: 4][row_max, row_rcp: T each][theta_hi, theta_lo, col_max, col_rcp: E each]
__host__ __device__ constexpr long long workspace_words(long long T, long long E) { return 4 + 2 * T + 4 * E; }

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
