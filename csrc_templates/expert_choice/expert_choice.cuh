// Expert Choice routing in two launches, no host synchronisation, no dense [T, E] buffer.
//
// Each expert picks its top-C tokens by score (ties: lower token id); each token then keeps up to top_k of the
// experts that picked it (best first) and, with fallback="topk", fills its empty slots from its best other experts.
// Scores follow the fixed fp32 recipe of ec_scores.cuh (bit-identical to the torch reference).
//
// 1. prepare_kernel: zeroes the block tickets, the selector counter and the per-expert counts; for
//    normalize_over="experts" one warp per token computes the token's softmax statistics (max, 1 / sum).
// 2. route_kernel: every block takes a ticket (an atomic counter, so tickets follow the order in which blocks
//    start). Tickets [0, sel_blocks) are selectors (ec_select.cuh): each finds, for its experts, the threshold key
//    of the C-th best token, and writes the expert-major rows or publishes the thresholds. Later tickets are
//    finalizers (ec_finalize.cuh, token-major output only): they wait until every selector has finished, then route
//    one token per warp. A finalizer only ever waits on blocks that started before it, so the dataflow cannot
//    deadlock however many blocks are resident.
// What crosses blocks: a token's pick test key >= theta[e] needs only E thresholds, not a [T, E] matrix.
#pragma once
#include "expert_choice/ec_finalize.cuh"
#include "expert_choice/ec_select.cuh"

namespace jitmoe::ec {

template <typename In>
__device__ void token_softmax_stats(const Params<In>& p, int t) {
  const In* row = p.logits + static_cast<size_t>(t) * p.E;  // [E]
  const int lane = lane_id();
  float mx = -INFINITY;
  for (int e = lane; e < p.E; e += kExpertLanes) mx = fmaxf(mx, to_float(row[e]));
  mx = warp_max_f32(mx);
  float sum = 0.0f;  // lane `lane` of kExpertLanes: experts lane, lane + 32, ... in order
  for (int e = lane; e < p.E; e += kExpertLanes) sum = __fadd_rn(sum, softmax_term(to_float(row[e]), mx));
#pragma unroll
  for (int offset = kExpertLanes / 2; offset > 0; offset >>= 1)  // butterfly == halving tree, on every lane
    sum = __fadd_rn(sum, __shfl_xor_sync(kFullWarp, sum, offset));
  if (lane == 0) {
    p.row_max[t] = mx;
    p.row_rcp[t] = __frcp_rn(sum);
  }
}

template <typename In>
__global__ void __launch_bounds__(kPrepBlock) prepare_kernel(Params<In> p) {
  const long long gid = static_cast<long long>(blockIdx.x) * kPrepBlock + threadIdx.x;
  if (gid < 2) p.counters[gid] = 0;
  if (gid < p.E) p.counts[gid] = 0;
  const long long t = gid / 32;  // uniform within a warp
  if (!p.tokens_softmax && t < p.T) token_softmax_stats(p, static_cast<int>(t));
}

template <typename In>
__global__ void __launch_bounds__(kBlock, 2) route_kernel(Params<In> p) {
  extern __shared__ __align__(16) unsigned char ec_smem[];
  Scratch* sc = reinterpret_cast<Scratch*>(ec_smem);
  if (threadIdx.x == 0) sc->ticket = atomicAdd(p.counters, 1u);
  __syncthreads();
  const int ticket = static_cast<int>(sc->ticket);
  if (ticket < p.sel_blocks) {
    run_selector(p, ticket, ec_smem);
  } else {
    run_finalizer(p, ticket - p.sel_blocks, ec_smem);
  }
}

}  // namespace jitmoe::ec
