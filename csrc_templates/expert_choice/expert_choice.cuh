// Expert Choice routing in two launches (three on the key path, ec_keys.cuh), no host synchronisation, no dense
// [T, E] buffer of scores.
//
// Each expert picks its top-C tokens by score (ties: lower token id); each token then keeps up to top_k of the
// experts that picked it (best first) and, with fallback="topk", fills its empty slots from its best other experts.
// Scores follow the fixed fp32 recipe of ec_scores.cuh (bit-identical to the torch reference).
//
// 1. prepare_kernel zeroes the counters and per-expert counts, then
//    - column path: for normalize_over="experts", one warp per token computes the token's softmax statistics;
//    - candidate path (ec_candidates.cuh): one warp per sampled token writes the token's scores.
// 2. route_kernel: every block takes a ticket (an atomic counter, so tickets follow the order in which blocks
//    start) and runs the phase its ticket falls in; a phase's blocks wait until every block of the previous phase
//    has counted itself done. A block only ever waits on blocks that started before it, so the dataflow cannot
//    deadlock however many blocks are resident.
//    - column path: selectors (ec_select.cuh) find, for their experts, the threshold key of the C-th best token over
//      the whole column, and write the expert-major rows or publish the thresholds; then finalizers
//      (ec_finalize.cuh, token-major output only) route one token per warp.
//    - candidate path: bound, rows, candidate selectors, finalizers (ec_candidates.cuh): each score is computed once
//      in the row pass, and experts select among short candidate lists.
// What crosses blocks: a token's pick test key >= theta[e] needs only E thresholds, not a [T, E] matrix.
#pragma once
#include "expert_choice/ec_candidates.cuh"
#include "expert_choice/ec_finalize.cuh"
#include "expert_choice/ec_keys.cuh"
#include "expert_choice/ec_select.cuh"

namespace jitmoe::ec {

template <typename In>
__global__ void __launch_bounds__(kPrepBlock) prepare_kernel(Params<In> p) {
  const long long gid = static_cast<long long>(blockIdx.x) * kPrepBlock + threadIdx.x;
  if (gid < kCounters) p.counters[gid] = 0;
  if (gid < p.E) p.counts[gid] = 0;
  if (p.candidates) {
    prepare_candidates(p, gid);
    return;
  }
  const long long t = gid / 32;  // uniform within a warp
  if (p.tokens_softmax || t >= p.T) return;
  const float2 stats = row_softmax_stats(p.logits + static_cast<size_t>(t) * p.E, p.E);
  store_row_stats(p, t, stats.x, stats.y);
}

// The block's ticket: blocks count themselves in counters[0] in the order they start.
__device__ __forceinline__ int take_ticket(unsigned* counters, unsigned char* smem) {
  Scratch* sc = reinterpret_cast<Scratch*>(smem);
  if (threadIdx.x == 0) sc->ticket = atomicAdd(counters, 1u);
  converged_syncthreads();
  return static_cast<int>(sc->ticket);
}

template <typename In>
__global__ void __launch_bounds__(kBlock, 2) route_kernel(Params<In> p) {
  extern __shared__ __align__(16) unsigned char ec_smem[];
  const int ticket = take_ticket(p.counters, ec_smem);
  if (ticket < p.sel_blocks) {
    run_selector(p, ticket, ec_smem);
  } else {
    run_finalizer(p, ticket - p.sel_blocks, ec_smem, p.counters + 1);
  }
}

// One 1024-thread block per SM: the row phase holds up to 8 scores per lane in registers (64 registers; at two
// blocks per SM, 32 registers, it spilled).
template <typename In>
__global__ void __launch_bounds__(kBlock, 1) route_candidates_kernel(Params<In> p) {
  extern __shared__ __align__(16) unsigned char ec_smem[];
  int ticket = take_ticket(p.counters, ec_smem);
  if (ticket < p.bound_blocks) return run_bound(p, ticket);
  ticket -= p.bound_blocks;
  if (ticket < p.row_blocks) return run_rows(p, ticket, ec_smem);
  ticket -= p.row_blocks;
  if (ticket < p.sel_blocks) return run_candidate_selector(p, ticket, ec_smem);
  run_finalizer(p, ticket - p.sel_blocks, ec_smem, p.counters + 3);
}

}  // namespace jitmoe::ec
