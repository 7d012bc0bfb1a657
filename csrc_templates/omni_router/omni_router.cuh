// Omni (Cartesian-product) router: for every token t, the k best of the N*N experts (i, j) scored by
// x[t, i] + y[t, j], ranked by the exact sum descending and then by the flat index i*N + j ascending; the returned
// score is the sum rounded to fp32 and then to the logit type.
//
// Forward, one warp per token (a grid-stride loop over tokens; the grid is as large as fits on the device):
//   1. the best min(k, N) of x and of y, sorted by (value desc, index asc), by the warp bitonic top-K of
//      warp_bitonic.cuh over each row (for short 16-bit rows over both rows at once as key pairs: two
//      independent chains per network stage; for 16-bit rows of 129..256 and k <= 32 over the elements that pass
//      a pruning threshold, warp_prune.cuh), each row read once with 16-byte loads where it allows;
//   2. the candidate pairs of ranks (a, b) (0-based) with (a+1)(b+1) <= k, from a per-block table of
//      sum_{a=1..k} floor(k/a) ~ k ln k entries (119 for k = 32, 1466 for k = 256);
//   3. the exact top-k of the candidates by the same warp bitonic top-K on candidate keys (omni_keys.cuh), written
//      straight to the outputs. With packed keys and KB = 32 the network runs on half tiles (64 slots): all the
//      candidates when they fit (k <= 19, or small N), else those whose fp32 sum passes a pruning threshold
//      (warp_prune.cuh; about 40 of the 119 pairs of k = 32). Nothing goes through global scratch.
//
// Why the candidates hold the answer, ties included. Write i' >=x i when x[i'] > x[i], or x[i'] == x[i] and
// i' <= i (the axis order), likewise >=y, and let a, b be the 0-based axis ranks of i and j. Take any i' >=x i
// and j' >=y j. Then x[i'] + y[j'] >= x[i] + y[j] exactly. If the sums differ, (i', j') ranks above (i, j). If they
// are equal, both x[i'] == x[i] and y[j'] == y[j] (two inequalities summing to an equality), so i' <= i and
// j' <= j by the axis tie rule and i'*N + j' <= i*N + j, with equality only for (i', j') = (i, j): again (i', j')
// ranks above (i, j). So the (a+1)(b+1) pairs of that rectangle all rank at or above (i, j), and a pair among the
// best k has (a+1)(b+1) <= k; in particular a, b < k, so the axis top-k lists suffice. The argument needs the
// exact sum: with rounded sums, x[i'] > x[i] can give fl(x[i'] + y[j]) == fl(x[i] + y[j]) with i' > i, the pair
// (i', j) then ranks below (i, j), and no per-axis preselection can be exact for that order in general (with
// y[0] = 1e30 and |x| < 1e20, every fl sum of column 0 ties, so that order puts (0, 0) first however small x[0] is
// among the x). The exact order and (fp32 sum, index) agree whenever no two different sums round to the same fp32
// value (always, for instance, when all sums are exact in fp32). The argument also needs finite logits whose sums
// stay finite: an infinite or NaN logit absorbs its partner (inf + y is the same for every y), and pairs that tie
// only that way may come in another order, or another of them may take the k-th place, than in the brute force.
//
// Backward, one warp per token: dx[t, i] = sum over slots p with indices[t, p] / N == i of dscores[t, p], and
// dy likewise with indices % N. The warp stages the k (i, j, dscore) triples in shared memory, zero-fills both
// gradient rows, and every slot sums the dscores of all slots with its i (and its j) in slot order; the first slot
// of each i (and of each j) writes the sum. Fixed order, no atomics, every element written on every call.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/dtypes.cuh"
#include "omni_router/omni_keys.cuh"
#include "omni_router/warp_bitonic.cuh"
#include "omni_router/warp_prune.cuh"

namespace jitmoe {
namespace omni {

constexpr int kWarps = 4;  // warps (= tokens in flight) per block
constexpr int kThreads = 32 * kWarps;

// Number of rank pairs (a, b) with (a+1)(b+1) <= kb: the candidate table's capacity for any k <= kb.
constexpr int candidate_capacity(int kb) {
  int count = 0;
  for (int a = 1; a <= kb; ++a) count += kb / a;
  return count;
}

// Candidate keys per lane: at least KB/32, so that a tile holds a whole chunk of KB. Packed (64-bit) keys take at
// least 4, so that each network stage of the candidate selection has 4 independent compare-exchanges in flight
// (with 1 key per lane the stages form one long chain of shuffle latencies); 96-bit keys would need too many
// registers for that. Candidate sets of at most half such a tile run on half the registers instead (the filler of
// a mostly empty tile costs more than the lost overlap).
constexpr int candidate_regs(int kb, int key_bytes) { return key_bytes <= 8 && kb / 32 < 4 ? 4 : kb / 32; }

// Blocks per SM the forward kernel is compiled for. It is latency-bound, so for 16-bit logits and KB <= 128 ptxas
// gets a register cap that keeps 8 blocks (64 registers) or, with the lighter axis tiles, 10 blocks (48) resident;
// these caps need no spills (-Xptxas -v, sm_80 and sm_90a). fp32 logits and KB = 256 carry wider or more keys
// and would spill under them, so they keep ptxas' own choice.
constexpr int forward_min_blocks(int elem_bytes, int kb, int va) {
  return elem_bytes == 2 && kb <= 128 ? (va >= 8 ? 8 : 10) : 1;
}

// Whether the x and y rows go through one axis network as key pairs (select_axes) rather than one after the other.
// The pairs double the live axis keys: for 16-bit logits and VA = 2 that stays within the 10-block cap (48
// registers, no spills); with VA = 4 or 8 it spills under the 48/64 caps, and with fp32 keys it costs occupancy
// (40 -> 60+ registers), so those keep the sequential form.
constexpr bool interleave_axes(int elem_bytes, int va) { return elem_bytes == 2 && va == 2; }

// Pruning (warp_prune.cuh) for the top-k bucket 32 with packed keys (16-bit logits, N <= 256, so a row fits one
// axis tile). Axis rows of a 256-slot tile (VA = 8) keep the elements at or above a threshold that at least
// min(k, N) of them reach (about 40 of 256 random logits) and sort those in 64-slot tiles; for 128-slot tiles the
// threshold and compaction cost about what they save (SASS counts), so those keep the plain network. Candidate
// sets of more than 64 pairs (k >= 20) keep the pairs whose fp32 sum reaches a threshold that k of them reach
// (about 40 of the 119 pairs of k = 32) and rank those in 64-slot tiles. Three bisection steps: on random logits
// more than 64 survivors (a second tile) are then rarer than 1 in 300 rows, and a fourth step costs more than
// the second tiles it saves.
constexpr int kAxisSteps = 3;
constexpr int kCandidateSteps = 3;
constexpr int kPrunedRegs = 2;  // keys per lane of a pruned network tile (64 slots)

template <class T, int KB, int VA, class Candidate>
constexpr bool prune_axes() {
  return std::is_same_v<Candidate, PackedCandidate<T>> && KB == 32 && VA == 8;
}

template <class T>
struct ForwardArgs {
  const T* x;          // [T, N]
  const T* y;          // [T, N]
  T* scores;           // [T, k]
  int32_t* indices;    // [T, k]
  long long num_tokens;
  int n;
  int top_k;
  bool vec_x, vec_y;   // rows of x / y may be read with vector loads
};

template <class T>
struct BackwardArgs {
  const T* grad_scores;    // [T, k]
  const int32_t* indices;  // [T, k]
  T* grad_x;               // [T, N]
  T* grad_y;               // [T, N]
  long long num_tokens;
  int n;
  int top_k;
};

// Fills table[c] = (a << 8) | b for the candidate rank pairs, row-major in a; returns their count. Warp 0 scans the
// row lengths min(floor(k/(a+1)), N) for a < min(k, N); then all warps write the rows. Block-wide (two barriers).
template <int KB>
__device__ int build_candidate_table(uint16_t* table,    // [candidate_capacity(KB)] shared
                                     int* row_start,     // [KB + 1] shared
                                     int top_k, int n) {
  constexpr int kRowsPerLane = KB / 32;
  const int rows = min(top_k, n);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (warp == 0) {
    int len[kRowsPerLane];
    int lane_total = 0;
#pragma unroll
    for (int q = 0; q < kRowsPerLane; ++q) {
      const int a = lane * kRowsPerLane + q;
      len[q] = a < rows ? min(top_k / (a + 1), n) : 0;
      lane_total += len[q];
    }
    int inclusive = lane_total;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int other = __shfl_up_sync(warp_bitonic::kFullMask, inclusive, d);
      if (lane >= d) inclusive += other;
    }
    int start = inclusive - lane_total;
#pragma unroll
    for (int q = 0; q < kRowsPerLane; ++q) {
      row_start[lane * kRowsPerLane + q] = start;
      start += len[q];
    }
    if (lane == 31) row_start[KB] = inclusive;
  }
  __syncthreads();
  for (int a = warp; a < rows; a += kWarps) {
    const int first = row_start[a];
    const int len = row_start[a + 1] - first;
    for (int b = lane; b < len; b += 32) table[first + b] = static_cast<uint16_t>((a << 8) | b);
  }
  __syncthreads();
  return row_start[KB];
}

// 4, 8 or 16 bytes from a BYTES-aligned address, as 32-bit words.
template <int BYTES>
__device__ __forceinline__ void load_words(const void* p /* [BYTES] */, uint32_t (&w)[BYTES / 4]) {
  if constexpr (BYTES == 16) {
    const uint4 u = __ldg(static_cast<const uint4*>(p));
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  } else if constexpr (BYTES == 8) {
    const uint2 u = __ldg(static_cast<const uint2*>(p));
    w[0] = u.x, w[1] = u.y;
  } else {
    static_assert(BYTES == 4, "4, 8 or 16 bytes");
    w[0] = __ldg(static_cast<const unsigned int*>(p));
  }
}

template <class T>
__device__ __forceinline__ uint32_t load_bits(const T* row /* [N] */, int e) {
  if constexpr (sizeof(T) == 2) return __ldg(reinterpret_cast<const unsigned short*>(row) + e);
  else return __ldg(reinterpret_cast<const unsigned int*>(row) + e);
}

// Axis keys of row[first .. first+V) (one lane's slots); elements at or past n become the zero key, which is
// below every real key. With vec_ok (row 16-byte-aligned-enough and n a multiple of the piece), pieces of up to
// 16 bytes are either wholly inside the row or wholly outside it.
template <class T, int V>
__device__ __forceinline__ void load_axis_keys(const T* row /* [N] */, int n, int first, bool vec_ok,
                                               AxisKeyOf<T> (&keys)[V]) {
  constexpr int kPieceBytes = V * sizeof(T) < 16 ? V * sizeof(T) : 16;
  constexpr int kPieceElems = kPieceBytes / sizeof(T);
  if constexpr (kPieceBytes >= 4) {
    if (vec_ok) {
#pragma unroll
      for (int q = 0; q < V / kPieceElems; ++q) {
        const int e0 = first + q * kPieceElems;
        uint32_t w[kPieceBytes / 4] = {};
        if (e0 < n) load_words<kPieceBytes>(row + e0, w);
#pragma unroll
        for (int j = 0; j < kPieceElems; ++j) {
          uint32_t bits;
          if constexpr (sizeof(T) == 2) bits = (w[j / 2] >> (16 * (j % 2))) & 0xFFFFu;  // little-endian halves
          else bits = w[j];
          keys[q * kPieceElems + j] = e0 < n ? axis_key<T>(bits, e0 + j) : AxisKeyOf<T>(0);
        }
      }
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < V; ++r) {
    const int e = first + r;
    keys[r] = e < n ? axis_key<T>(load_bits(row, e), e) : AxisKeyOf<T>(0);
  }
}

// The best KB axis keys of one row, sorted, into out[0 .. KB) (shared memory of this warp).
template <class T, int KB, int VA>
__device__ __forceinline__ void select_axis(const T* row,        // [N]
                                            int n, bool vec_ok,
                                            AxisKeyOf<T>* out,   // [KB] shared, this warp's
                                            int lane) {
  AxisKeyOf<T> best[VA];
  warp_bitonic::top_keys<VA, KB>(
      n, [&](int base, AxisKeyOf<T>(&tile)[VA]) { load_axis_keys<T, VA>(row, n, base + lane * VA, vec_ok, tile); },
      best, lane);
  if (lane < KB / VA) {
#pragma unroll
    for (int r = 0; r < VA; ++r) out[lane * VA + r] = best[r];
  }
}

// The best KB axis keys of the x row and of the y row, each sorted, into x_out[0 .. KB) and y_out[0 .. KB)
// (shared memory of this warp). Both rows go through one network as key pairs: twice the independent work per
// stage, and the loads of both rows are in flight together.
template <class T, int KB, int VA>
__device__ __forceinline__ void select_axes(const T* x_row,          // [N]
                                            const T* y_row,          // [N]
                                            int n, bool vec_x, bool vec_y,
                                            AxisKeyOf<T>* x_out,     // [KB] shared, this warp's
                                            AxisKeyOf<T>* y_out,     // [KB] shared, this warp's
                                            int lane) {
  using AxisKey = AxisKeyOf<T>;
  using Pair = warp_bitonic::KeyPair<AxisKey>;
  Pair best[VA];
  warp_bitonic::top_keys<VA, KB>(
      n,
      [&](int base, Pair(&tile)[VA]) {
        AxisKey x_keys[VA], y_keys[VA];
        load_axis_keys<T, VA>(x_row, n, base + lane * VA, vec_x, x_keys);
        load_axis_keys<T, VA>(y_row, n, base + lane * VA, vec_y, y_keys);
#pragma unroll
        for (int r = 0; r < VA; ++r) tile[r] = Pair{x_keys[r], y_keys[r]};
      },
      best, lane);
  if (lane < KB / VA) {
#pragma unroll
    for (int r = 0; r < VA; ++r) x_out[lane * VA + r] = best[r].first, y_out[lane * VA + r] = best[r].second;
  }
}

// The best KB (= 32) axis keys of one row of n <= 32*VA elements (one tile), sorted, into out[0 .. KB): the
// elements at or above a pruning threshold that at least `need` = min(k, n) of them reach go through shared
// memory into 64-slot network tiles (one tile unless more than 64 pass). Positions past the survivors hold filler
// keys (zero); only positions below `need` are used.
template <class T, int KB, int VA>
__device__ __forceinline__ void select_axis_pruned(const T* row,          // [N]
                                                   int n, bool vec_ok, int need,
                                                   AxisKeyOf<T>* scratch,  // [32 * VA] shared, this warp's
                                                   AxisKeyOf<T>* out,      // [KB] shared, this warp's
                                                   int lane) {
  using AxisKey = AxisKeyOf<T>;
  static_assert(KB == 32 && sizeof(AxisKey) == 4, "pruned axes: top-k bucket 32, 16-bit logits");
  AxisKey keys[VA];
  load_axis_keys<T, VA>(row, n, lane * VA, vec_ok, keys);
  const uint32_t tau = warp_prune::threshold<kAxisSteps>(
      keys, need, [](uint32_t key) { return axis_value<T>(key); },
      [](float value) { return uint32_t(ordered<T>(float_to_bits<T>(value))) << ElemTraits<T>::kBits; });
  bool keep[VA];
#pragma unroll
  for (int r = 0; r < VA; ++r) keep[r] = keys[r] >= tau;
  const int kept = warp_prune::compact(keys, keep, scratch, lane);
  __syncwarp();  // the compacted keys are visible to every lane
  AxisKey best[kPrunedRegs];
  warp_bitonic::top_keys<kPrunedRegs, KB>(
      kept,
      [&](int base, AxisKey(&tile)[kPrunedRegs]) {
#pragma unroll
        for (int r = 0; r < kPrunedRegs; ++r) {
          const int c = base + lane * kPrunedRegs + r;
          tile[r] = c < kept ? scratch[c] : AxisKey(0);
        }
      },
      best, lane);
  if (lane < KB / kPrunedRegs) {
#pragma unroll
    for (int r = 0; r < kPrunedRegs; ++r) out[lane * kPrunedRegs + r] = best[r];
  }
  __syncwarp();  // every lane has read the scratch before the next row overwrites it
}

// The sorted best KB keys of the x row and of the y row of token t into lists[0] and lists[1].
template <class T, int KB, int VA, class Candidate>
__device__ __forceinline__ void select_axis_lists(const ForwardArgs<T>& args, long long t,
                                                  AxisKeyOf<T> (*lists)[KB],  // [2][KB] shared, this warp's
                                                  uint32_t* scratch,          // [32 * VA] shared, this warp's
                                                  int lane) {
  const T* x_row = args.x + t * args.n;
  const T* y_row = args.y + t * args.n;
  if constexpr (prune_axes<T, KB, VA, Candidate>()) {
    const int need = min(args.top_k, args.n);
    select_axis_pruned<T, KB, VA>(x_row, args.n, args.vec_x, need, scratch, lists[0], lane);
    select_axis_pruned<T, KB, VA>(y_row, args.n, args.vec_y, need, scratch, lists[1], lane);
  } else if constexpr (interleave_axes(sizeof(T), VA)) {
    select_axes<T, KB, VA>(x_row, y_row, args.n, args.vec_x, args.vec_y, lists[0], lists[1], lane);
  } else {
    select_axis<T, KB, VA>(x_row, args.n, args.vec_x, lists[0], lane);
    select_axis<T, KB, VA>(y_row, args.n, args.vec_y, lists[1], lane);
  }
}

// Keeps the candidate pairs (table entries, count of them) whose fp32 sum reaches a threshold that top_k of them
// reach: the sum is the high half of the candidate key, so every dropped pair ranks below top_k others. Writes the
// kept table entries to kept[0 .. returned count). Slot c = r*32 + lane: every lane holds a pair when count >= 32.
template <class T, int KB>
__device__ __forceinline__ int prune_candidates(const uint16_t* table,          // [count] shared
                                                int count, int top_k,
                                                const AxisKeyOf<T>* x_best,    // [KB] shared
                                                const AxisKeyOf<T>* y_best,    // [KB] shared
                                                uint16_t* kept,                // [32 * R] shared, this warp's
                                                int lane) {
  constexpr int R = (candidate_capacity(KB) + 31) / 32;
  static_assert(KB == 32 && R == 4, "pruned candidates: top-k bucket 32 (at most 119 pairs)");
  uint16_t pair[R];
  uint32_t key[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int c = r * 32 + lane;
    pair[r] = c < count ? table[c] : uint16_t(0);
    const float s = __fadd_rn(axis_value<T>(x_best[pair[r] >> 8]), axis_value<T>(y_best[pair[r] & 0xFF]));
    key[r] = c < count ? ordered<float>(__float_as_uint(s)) : 0u;
  }
  const uint32_t tau = warp_prune::threshold<kCandidateSteps>(
      key, top_k, [](uint32_t k) { return __uint_as_float(unordered<float>(k)); },
      [](float value) { return ordered<float>(__float_as_uint(value)); });
  bool keep[R];
#pragma unroll
  for (int r = 0; r < R; ++r) keep[r] = key[r] >= tau;
  return warp_prune::compact(pair, keep, kept, lane);
}

// The best KB candidate keys of the token, sorted, in best (position p in lane p / VC, register p % VC). With
// PRUNE the pairs first go through prune_candidates (VC is then the pruned tile's kPrunedRegs).
template <class T, int KB, class Candidate, int VC, bool PRUNE>
__device__ __forceinline__ void select_candidates(const uint16_t* table,        // [count] shared
                                                  int count, int top_k, int n,
                                                  const AxisKeyOf<T>* x_best,  // [KB] shared, this warp's
                                                  const AxisKeyOf<T>* y_best,  // [KB] shared, this warp's
                                                  uint16_t* kept,              // [32 * 4] shared, this warp's
                                                  typename Candidate::Key (&best)[VC], int lane) {
  using CandKey = typename Candidate::Key;
  const uint16_t* pairs = table;
  int num_pairs = count;
  if constexpr (PRUNE) {
    num_pairs = prune_candidates<T, KB>(table, count, top_k, x_best, y_best, kept, lane);
    pairs = kept;
    __syncwarp();  // the kept pairs are visible to every lane
  }
  warp_bitonic::top_keys<VC, KB>(
      num_pairs,
      [&](int base, CandKey(&tile)[VC]) {
#pragma unroll
        for (int r = 0; r < VC; ++r) {
          const int c = base + lane * VC + r;
          if (c < num_pairs) {
            const int pair = pairs[c];
            tile[r] = candidate_key<T, Candidate>(x_best[pair >> 8], y_best[pair & 0xFF], n);
          } else {
            tile[r] = CandKey{};
          }
        }
      },
      best, lane);
}

// Words of per-warp scratch: the compacted axis keys, or the kept candidate pairs (uint16), whichever is larger.
template <class T, int KB, int VA, class Candidate, bool PRUNE>
constexpr int scratch_words() {
  const int axis = prune_axes<T, KB, VA, Candidate>() ? 32 * VA : 1;
  const int pairs = PRUNE ? (candidate_capacity(KB) + 31) / 32 * 32 / 2 : 1;
  return axis > pairs ? axis : pairs;
}

// One block: kWarps warps, each handling tokens blockIdx.x*kWarps + warp, then a grid's worth of tokens further.
// VC: candidate keys per lane (candidate_regs, or half of it when all candidates fit: see launch_forward_variant).
// PRUNE: candidates go through prune_candidates first (bucket 32, packed keys, more than 64 pairs).
template <class T, int KB, int VA, class Candidate, int VC, bool PRUNE>
__global__ void __launch_bounds__(kThreads, forward_min_blocks(sizeof(T), KB, VA))
    omni_router_forward_kernel(ForwardArgs<T> args) {
  using AxisKey = AxisKeyOf<T>;
  using CandKey = typename Candidate::Key;
  constexpr int kScratch = scratch_words<T, KB, VA, Candidate, PRUNE>();
  __shared__ uint16_t table[candidate_capacity(KB)];  // [count] rank pairs (a << 8) | b
  __shared__ int row_start[KB + 1];                   // [KB + 1] first table entry of each rank a
  __shared__ AxisKey lists[kWarps][2][KB];            // per warp: sorted best keys of x, of y
  __shared__ uint32_t scratch[kWarps][kScratch];      // per warp: pruning survivors (axis keys or pairs)
  const int count = build_candidate_table<KB>(table, row_start, args.top_k, args.n);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const long long stride = static_cast<long long>(gridDim.x) * kWarps;
  for (long long t = static_cast<long long>(blockIdx.x) * kWarps + warp; t < args.num_tokens; t += stride) {
    select_axis_lists<T, KB, VA, Candidate>(args, t, lists[warp], scratch[warp], lane);
    __syncwarp();  // the lists are visible to every lane
    CandKey best[VC];
    select_candidates<T, KB, Candidate, VC, PRUNE>(table, count, args.top_k, args.n, lists[warp][0],
                                                   lists[warp][1], reinterpret_cast<uint16_t*>(scratch[warp]),
                                                   best, lane);
#pragma unroll
    for (int r = 0; r < VC; ++r) {
      const int p = lane * VC + r;
      if (p < args.top_k) {
        args.scores[t * args.top_k + p] = from_float<T>(Candidate::score(best[r]));
        args.indices[t * args.top_k + p] = static_cast<int32_t>(Candidate::index(best[r]));
      }
    }
    __syncwarp();  // the next token overwrites this warp's lists and scratch
  }
}

template <class T, int KB>
__global__ void omni_router_backward_kernel(BackwardArgs<T> args) {
  constexpr int Q = KB / 32;                 // slots per lane
  __shared__ int4 slots[kWarps][KB];         // per warp: (i or -1, j or -1, dscore bits, unused)
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n = args.n;
  const int k = args.top_k;
  const long long stride = static_cast<long long>(gridDim.x) * kWarps;
  for (long long t = static_cast<long long>(blockIdx.x) * kWarps + warp; t < args.num_tokens; t += stride) {
    int mine_i[Q], mine_j[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int p = q * 32 + lane;
      mine_i[q] = -1, mine_j[q] = -1;
      if (p < k) {
        const int flat = args.indices[t * k + p];
        const float g = to_float(args.grad_scores[t * k + p]);
        if (flat >= 0 && flat < n * n) mine_i[q] = flat / n, mine_j[q] = flat - (flat / n) * n;
        slots[warp][p] = make_int4(mine_i[q], mine_j[q], __float_as_int(g), 0);
      }
    }
    T* gx = args.grad_x + t * n;
    T* gy = args.grad_y + t * n;
    for (int e = lane; e < n; e += 32) gx[e] = from_float<T>(0.0f), gy[e] = from_float<T>(0.0f);
    __syncwarp();  // slots visible, zero-fill ordered before the sums below
    float sum_i[Q], sum_j[Q];
    bool first_i[Q], first_j[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) sum_i[q] = 0.0f, sum_j[q] = 0.0f, first_i[q] = true, first_j[q] = true;
    for (int o = 0; o < k; ++o) {
      const int4 other = slots[warp][o];
      const float g = __int_as_float(other.z);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const bool before = o < q * 32 + lane;
        if (other.x == mine_i[q]) sum_i[q] += g, first_i[q] = first_i[q] && !before;
        if (other.y == mine_j[q]) sum_j[q] += g, first_j[q] = first_j[q] && !before;
      }
    }
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      if (mine_i[q] >= 0 && first_i[q]) gx[mine_i[q]] = from_float<T>(sum_i[q]);
      if (mine_j[q] >= 0 && first_j[q]) gy[mine_j[q]] = from_float<T>(sum_j[q]);
    }
    __syncwarp();  // the next token overwrites this warp's slots
  }
}

// ---- host side --------------------------------------------------------------------------------------------------
// Blocks of kKernel resident on the current device at once. The occupancy query costs host time, so it runs once
// per device and kernel (neither changes while the process lives); racing first calls store the same value.
template <auto kKernel>
inline long long resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0 = not queried yet
  int device = 0;
  cudaGetDevice(&device);
  const bool cacheable = device >= 0 && device < kMaxDevices;
  int blocks = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (blocks == 0) {
    int sms = 1, per_sm = 1;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
    blocks = std::max(per_sm, 1) * std::max(sms, 1);
    if (cacheable) cached[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Blocks for a grid-stride loop: enough for every token, at most what stays resident on the device at once.
template <auto kKernel>
inline int resident_grid(long long num_tokens) {
  return static_cast<int>(std::min((num_tokens + kWarps - 1) / kWarps, resident_blocks<kKernel>()));
}

// Whether rows of `n` elements starting at p can be read in pieces of min(16, V*sizeof(T)) bytes.
template <class T, int V>
inline bool rows_vectorizable(const void* p /* [T, N] */, int n) {
  constexpr int kPieceBytes = V * sizeof(T) < 16 ? V * sizeof(T) : 16;
  constexpr int kPieceElems = kPieceBytes / sizeof(T);
  return kPieceBytes >= 4 && n % kPieceElems == 0 && reinterpret_cast<uintptr_t>(p) % kPieceBytes == 0;
}

// Number of candidate rank pairs for top_k and n: what build_candidate_table counts on the device.
inline int candidate_count(int top_k, int n) {
  int count = 0;
  for (int a = 0; a < std::min(top_k, n); ++a) count += std::min(top_k / (a + 1), n);
  return count;
}

template <class T, int KB, int VA, class Candidate, int VC, bool PRUNE = false>
inline void launch_forward_kernel(const ForwardArgs<T>& args, cudaStream_t stream) {
  constexpr auto kernel = omni_router_forward_kernel<T, KB, VA, Candidate, VC, PRUNE>;
  kernel<<<resident_grid<kernel>(args.num_tokens), kThreads, 0, stream>>>(args);
}

// Packed keys with KB = 32: when all candidates fit in half a tile (k <= 19, or small N) the candidate selection
// runs on half the registers per lane (none of the work on the filler of a mostly empty tile); more candidates
// are pruned first and ranked on the same half tiles. Separate kernels rather than run-time branches: both paths
// in one kernel spill under the 48-register cap.
template <class T, int KB, int VA, class Candidate>
inline void launch_forward_variant(ForwardArgs<T> args, cudaStream_t stream) {
  args.vec_x = rows_vectorizable<T, VA>(args.x, args.n);
  args.vec_y = rows_vectorizable<T, VA>(args.y, args.n);
  constexpr int kRegs = candidate_regs(KB, sizeof(typename Candidate::Key));
  if constexpr (KB == 32 && std::is_same_v<Candidate, PackedCandidate<T>>) {
    static_assert(kPrunedRegs * 32 >= KB && kPrunedRegs < kRegs, "half tiles hold a chunk of KB");
    if (candidate_count(args.top_k, args.n) <= 32 * kPrunedRegs) {
      return launch_forward_kernel<T, KB, VA, Candidate, kPrunedRegs>(args, stream);
    }
    launch_forward_kernel<T, KB, VA, Candidate, kPrunedRegs, true>(args, stream);
  } else {
    launch_forward_kernel<T, KB, VA, Candidate, kRegs>(args, stream);
  }
}

// Picks the registers per lane for the axis rows (a tile of 32*VA elements: small rows waste no work on padding)
// and the candidate key width (packed 64-bit keys for 16-bit logits with N <= 256).
template <class T, int KB>
inline void launch_forward(const void* x,       // [T, N]
                           const void* y,       // [T, N]
                           void* scores,        // [T, k]
                           int32_t* indices,    // [T, k]
                           long long num_tokens, int n, int top_k, cudaStream_t stream) {
  if (num_tokens == 0) return;
  ForwardArgs<T> args{static_cast<const T*>(x), static_cast<const T*>(y), static_cast<T*>(scores), indices,
                      num_tokens, n, top_k, false, false};
  using Narrow = std::conditional_t<sizeof(T) == 2, PackedCandidate<T>, WideCandidate>;
  if constexpr (KB <= 64) {
    if (n <= 64) return launch_forward_variant<T, KB, 2, Narrow>(args, stream);
  }
  if constexpr (KB <= 128) {
    if (n <= 128) return launch_forward_variant<T, KB, 4, Narrow>(args, stream);
  }
  if (sizeof(T) == 2 && n <= 256) return launch_forward_variant<T, KB, 8, Narrow>(args, stream);
  launch_forward_variant<T, KB, 8, WideCandidate>(args, stream);
}

template <class T, int KB>
inline void launch_backward(const void* grad_scores,   // [T, k]
                            const int32_t* indices,    // [T, k]
                            void* grad_x,              // [T, N]
                            void* grad_y,              // [T, N]
                            long long num_tokens, int n, int top_k, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const BackwardArgs<T> args{static_cast<const T*>(grad_scores), indices, static_cast<T*>(grad_x),
                             static_cast<T*>(grad_y), num_tokens, n, top_k};
  constexpr auto kernel = omni_router_backward_kernel<T, KB>;
  kernel<<<resident_grid<kernel>(num_tokens), kThreads, 0, stream>>>(args);
}

}  // namespace omni
}  // namespace jitmoe
