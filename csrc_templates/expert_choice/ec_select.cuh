// Expert Choice selectors: one block per group of `group` adjacent experts (they share the 32-byte sectors of each
// logits row they read). For each expert the block
//   1. computes the expert's key for every token: the fp32 bits of its score (>= 0, so unsigned order is score
//      order), extended to 64 bits with ~token so that equal scores rank the lower token id first; padding tokens
//      have no key. With cache_keys the keys (or, for normalize_over="tokens", first the logits) live in shared
//      memory; otherwise every pass recomputes them from the logits;
//   2. finds theta = the take-th largest key, take = min(capacity, real tokens), by a radix select: 11-bit digits
//      from the top (skipping the constant bits), a shared histogram per digit, and, as soon as at most kListCap
//      tokens still match the prefix, a candidate list in shared memory so later passes only visit those;
//   3. publishes theta (token-major: finalizers treat key >= theta as "picked") or writes the expert's row of the
//      expert-major output: the picked tokens in increasing token order, then -1 / 0 up to capacity.
// Since keys are unique, exactly `take` tokens have key >= theta.
#pragma once
#include "expert_choice/ec_block.cuh"
#include "expert_choice/ec_scores.cuh"

namespace jitmoe::ec {

struct SelectorSmem {
  Scratch* sc;
  unsigned* hist;   // [kBins] digit histogram; also the kTokenLanes partial sums of a column softmax
  unsigned* list;   // [kListCap] items still matching the radix prefix
  unsigned* cache;  // [group, T] keys (or logits, briefly) of the block's experts, when cache_keys; the candidate
                    // path's token bitmap
};

// Candidate path: the region after the list holds [cached items: kCachedItems u64][token bitmap, prefix counts].
__device__ __forceinline__ unsigned long long* cached_items(const SelectorSmem& s) {
  return reinterpret_cast<unsigned long long*>(s.cache);
}
__device__ __forceinline__ unsigned* token_bitmap(const SelectorSmem& s) { return s.cache + 2 * kCachedItems; }

__device__ __forceinline__ SelectorSmem selector_smem(unsigned char* smem) {
  unsigned* words = reinterpret_cast<unsigned*>(smem + kScratchBytes);
  return SelectorSmem{reinterpret_cast<Scratch*>(smem), words, words + kBins, words + kBins + kListCap};
}

// The keys of one expert's column, from shared memory or recomputed from the logits.
template <typename In>
struct ColumnKeys {
  const In* logits;          // [T, E]
  const bool* token_mask;    // [T] or nullptr
  const float* row_max;      // [T] (read from L2: the candidate path writes it earlier in the same launch)
  const float* row_rcp;      // [T]
  const unsigned* cached;    // [T] this expert's keys in shared memory, or nullptr
  int E, expert;
  bool tokens_softmax;
  float col_max, col_rcp;    // this expert's softmax statistics (normalize_over="tokens")

  __device__ __forceinline__ float logit(int t) const {
    return to_float(logits[static_cast<size_t>(t) * E + expert]);
  }
  __device__ __forceinline__ unsigned operator()(int t) const {
    if (cached != nullptr) return cached[t];
    if (!token_is_real(token_mask, t)) return kInvalidKey;
    const float s = tokens_softmax ? score_of(logit(t), col_max, col_rcp)
                                   : score_of(logit(t), __ldcg(row_max + t), __ldcg(row_rcp + t));
    return __float_as_uint(s);
  }
};

// A column as radix-select items: item t is token t.
template <typename In>
struct ColumnItems {
  const ColumnKeys<In>& col;
  __device__ __forceinline__ unsigned long long operator()(int t) const { return column_key(col(t), t); }
};

template <typename In>
__device__ unsigned count_real_tokens(const Params<In>& p, Scratch* sc) {
  if (p.token_mask == nullptr) return static_cast<unsigned>(p.T);
  unsigned n = 0;
  for (int t = threadIdx.x; t < p.T; t += kBlock) n += p.token_mask[t] ? 1u : 0u;
  return block_sum_u32(n, sc);
}

// cache[g, t] = key of expert e0 + g (normalize_over="tokens": the logit's bits, turned into keys by
// column_softmax once the column's statistics are known); kInvalidKey for padding tokens.
// Adjacent threads take the `group` experts of one row, so a warp's loads of a row fall in one 32-byte sector and
// cost one L1 wavefront per row, not one per (row, expert): the strided column reads are the selectors' main cost.
template <typename In>
__device__ void fill_cache(const Params<In>& p, int e0, int group, unsigned* cache) {
  const int pairs = p.T * group;  // <= kCacheBudget / 4: cached columns fit in shared memory
#pragma unroll 4
  for (int i = threadIdx.x; i < pairs; i += kBlock) {
    const int t = i / group;
    const int g = i - t * group;
    unsigned value = kInvalidKey;
    if (token_is_real(p.token_mask, t)) {
      // __ldg: read-only during the launch, so the unrolled iterations' loads may pass the cache stores.
      const float x = to_float(__ldg(p.logits + static_cast<size_t>(t) * p.E + e0 + g));
      value = p.tokens_softmax ? __float_as_uint(x)
                               : __float_as_uint(score_of(x, __ldg(p.row_max + t), __ldg(p.row_rcp + t)));
    }
    cache[static_cast<size_t>(g) * p.T + t] = value;
  }
  __syncthreads();
}

// normalize_over="tokens": max and canonical sum over the column's real tokens (needs >= 1 real token); with a
// cache (holding logits), rewrites it into keys.
template <typename In>
__device__ void column_softmax(ColumnKeys<In>& col, unsigned* cache, int T, const SelectorSmem& s) {
  const int tid = threadIdx.x;
  auto logit = [&](int t) { return cache != nullptr ? __uint_as_float(cache[t]) : col.logit(t); };
  float mx = -INFINITY;
  for (int t = tid; t < T; t += kBlock)
    if (token_is_real(col.token_mask, t)) mx = fmaxf(mx, logit(t));
  mx = block_max_f32(mx, s.sc);

  float partial = 0.0f;  // lane tid of kTokenLanes: tokens tid, tid + 1024, ... in order
  for (int t = tid; t < T; t += kBlock)
    if (token_is_real(col.token_mask, t)) partial = __fadd_rn(partial, softmax_term(logit(t), mx));
  float* lanes = reinterpret_cast<float*>(s.hist);
  lanes[tid] = partial;
  __syncthreads();
  for (int half = kTokenLanes / 2; half > 0; half >>= 1) {
    if (tid < half) lanes[tid] = __fadd_rn(lanes[tid], lanes[tid + half]);
    __syncthreads();
  }
  const float rcp = __frcp_rn(lanes[0]);
  __syncthreads();  // lanes alias the histogram

  col.col_max = mx;
  col.col_rcp = rcp;
  if (cache != nullptr) {
    for (int t = tid; t < T; t += kBlock)
      cache[t] = token_is_real(col.token_mask, t) ? __float_as_uint(score_of(__uint_as_float(cache[t]), mx, rcp))
                                                  : kInvalidKey;
    __syncthreads();
  }
}

// Block-wide: the bin (from the top) holding the rank-th largest element; rank and count are updated to that bin.
__device__ __forceinline__ unsigned find_digit(const SelectorSmem& s, unsigned* rank, unsigned* count) {
  const int tid = threadIdx.x;
  const unsigned bin_hi = kBins - 1 - 2 * tid, bin_lo = bin_hi - 1;  // thread order = descending bins
  const unsigned c_hi = s.hist[bin_hi], c_lo = s.hist[bin_lo];
  unsigned total;
  const unsigned incl = block_inclusive_scan(c_hi + c_lo, s.sc, &total);
  const unsigned excl = incl - c_hi - c_lo;
  if (excl < *rank && *rank <= incl) {  // exactly one thread: incl grows to total >= rank
    const bool in_hi = *rank <= excl + c_hi;
    s.sc->digit = in_hi ? bin_hi : bin_lo;
    s.sc->rank = in_hi ? *rank - excl : *rank - excl - c_hi;
    s.sc->count = in_hi ? c_hi : c_lo;
  }
  __syncthreads();
  const unsigned digit = s.sc->digit;
  *rank = s.sc->rank;
  *count = s.sc->count;
  __syncthreads();
  return digit;
}

// The unique key matching (prefix, mask) among the domain's items.
template <typename Items>
__device__ unsigned long long find_unique(const Items& items, int n, bool use_list, unsigned long long prefix,
                                          unsigned long long mask, const SelectorSmem& s) {
  for (int i = threadIdx.x; i < n; i += kBlock) {
    const unsigned long long key = items(use_list ? static_cast<int>(s.list[i]) : i);
    if ((key & mask) == prefix) s.sc->key = key;
  }
  __syncthreads();
  const unsigned long long key = s.sc->key;
  __syncthreads();
  return key;
}

// The rank-th largest (1 <= rank <= n_real) of the real keys among n_items items. items(i) is a column_key of a
// token below T, or has bit 63 set (a padding token: never matches, since bit 63 is in every mask).
template <typename Items>
__device__ unsigned long long radix_select(const Items& items, int n_items, int T, unsigned rank, unsigned n_real,
                                           const SelectorSmem& s) {
  const int tid = threadIdx.x;
  const int token_bits = T > 1 ? 32 - __clz(T - 1) : 0;             // ~t has ones above bit token_bits - 1
  const unsigned long long low_ones = static_cast<unsigned>(0xFFFFFFFFull << token_bits);
  unsigned long long prefix = low_ones;                             // bit 63 (the score's sign) is 0
  unsigned long long mask = (1ull << 63) | low_ones;
  unsigned matching = n_real;                                       // real items matching the prefix
  bool use_list = false;
  int n_list = 0;
  for (int hi = 62; hi >= 0;) {
    const int width = min(kDigitBits, hi - (hi >= 32 ? 32 : 0) + 1);
    const int shift = hi - width + 1;
    const bool build = !use_list && matching <= kListCap;
    for (int b = tid; b < kBins; b += kBlock) s.hist[b] = 0;
    if (tid == 0) s.sc->n_list = 0;
    __syncthreads();
    const int n = use_list ? n_list : n_items;
    for (int base = 0; base < n; base += kBlock) {  // uniform trip count: whole warps reach the warp helpers
      const int i = base + tid;
      int item = 0;
      bool active = false;
      unsigned digit = 0;
      if (i < n) {
        item = use_list ? static_cast<int>(s.list[i]) : i;
        const unsigned long long key = items(item);
        active = (key & mask) == prefix;
        digit = static_cast<unsigned>(key >> shift) & ((1u << width) - 1u);
      }
      histogram_add(s.hist, active, digit);
      if (build) list_append(s.list, &s.sc->n_list, active, static_cast<unsigned>(item));
    }
    __syncthreads();
    if (build) {
      use_list = true;
      n_list = static_cast<int>(s.sc->n_list);
    }
    const unsigned digit = find_digit(s, &rank, &matching);
    prefix |= static_cast<unsigned long long>(digit) << shift;
    mask |= static_cast<unsigned long long>((1u << width) - 1u) << shift;
    if (matching == 1) return find_unique(items, use_list ? n_list : n_items, use_list, prefix, mask, s);
    hi = shift - 1;
    if (hi == 31) hi = token_bits - 1;
  }
  return prefix;
}

// Expert-major row of expert e: picked tokens in increasing order, then -1 / 0 up to capacity.
template <typename In>
__device__ void write_expert_row(const Params<In>& p, const ColumnKeys<In>& col, int e, unsigned long long theta,
                                 unsigned take, const SelectorSmem& s) {
  int32_t* row_ids = p.ids + static_cast<size_t>(e) * p.capacity;      // [capacity]
  float* row_weights = p.weights + static_cast<size_t>(e) * p.capacity;  // [capacity]
  unsigned written = 0;
  for (int base = 0; base < p.T; base += kBlock) {
    const int t = base + threadIdx.x;
    const unsigned k32 = t < p.T ? col(t) : kInvalidKey;
    const bool picked = k32 != kInvalidKey && column_key(k32, t) >= theta;
    unsigned total;
    const unsigned incl = block_inclusive_scan(picked ? 1u : 0u, s.sc, &total);
    const unsigned pos = written + incl - 1;
    if (picked && pos < static_cast<unsigned>(p.capacity)) {
      row_ids[pos] = t;
      row_weights[pos] = __uint_as_float(k32);
    }
    written += total;
  }
  for (int i = take + threadIdx.x; i < p.capacity; i += kBlock) {
    row_ids[i] = -1;
    row_weights[i] = 0.0f;
  }
}

template <typename In>
__device__ void run_selector(const Params<In>& p, int block, unsigned char* smem) {
  const SelectorSmem s = selector_smem(smem);
  const int e0 = block * p.group;
  const int group = min(p.group, p.E - e0);
  const unsigned n_real = count_real_tokens(p, s.sc);
  const unsigned take = min(static_cast<unsigned>(p.capacity), n_real);
  if (p.cache_keys) fill_cache(p, e0, group, s.cache);
  for (int g = 0; g < group; ++g) {
    const int e = e0 + g;
    unsigned* cache = p.cache_keys ? s.cache + static_cast<size_t>(g) * p.T : nullptr;  // [T]
    ColumnKeys<In> col{p.logits, p.token_mask, p.row_max, p.row_rcp, cache, p.E, e, p.tokens_softmax, 0.0f, 0.0f};
    if (p.tokens_softmax && n_real > 0) column_softmax(col, cache, p.T, s);
    const unsigned long long theta =
        take == n_real ? 0ull : radix_select(ColumnItems<In>{col}, p.T, p.T, take, n_real, s);
    if (threadIdx.x == 0) {
      if (p.expert_major) {
        p.counts[e] = static_cast<int32_t>(take);
      } else {
        p.theta_hi[e] = static_cast<unsigned>(theta >> 32);
        p.theta_lo[e] = static_cast<unsigned>(theta);
        p.col_max[e] = col.col_max;
        p.col_rcp[e] = col.col_rcp;
      }
    }
    __syncwarp();  // reconverge warp 0 before the barriers that follow
    if (p.expert_major) write_expert_row(p, col, e, theta, take, s);
    __syncthreads();  // the next expert reuses the scratch, histogram and list
  }
  if (!p.expert_major) signal_done(p.counters + 1);  // release the thresholds to the finalizers
}

}  // namespace jitmoe::ec
