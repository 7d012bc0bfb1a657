// Expert Choice launcher for ${dtype} logits (rendered per spec; the binding is the only file that touches torch).
#include <cuda_runtime.h>

#include "expert_choice/expert_choice.cuh"
#include "expert_choice/expert_choice_plan.h"

namespace {
using In = jitmoe::dtype_${dtype};
}  // namespace

// Workspace words for these arguments, or -1 (with *error set) when the requested path cannot run.
int64_t expert_choice_workspace_words(int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                      bool expert_major, int64_t path, const char** error) {
  namespace ec = jitmoe::ec;
  ec::CandidateShape cs;
  *error = ec::choose_path(cs, T, static_cast<int>(E), capacity, static_cast<int>(top_k), tokens_softmax,
                           expert_major, static_cast<int>(path));
  return *error != nullptr ? -1 : ec::workspace_layout(cs, T, E).words;
}

// Returns nullptr once both kernels are enqueued, else a message (launch errors are left to cudaGetLastError).
// path: jitmoe::ec::Path (0 = auto, 1 = whole columns, 2 = candidates).
const char* expert_choice_launch(const void* logits,      // [T, E]
                                 const bool* token_mask,  // [T] or nullptr
                                 int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                 bool fallback_topk, bool expert_major, int64_t path,
                                 int32_t* workspace,      // [expert_choice_workspace_words(...)]
                                 float* weights,          // [T, top_k] or [E, capacity]
                                 int32_t* ids,            // [T, top_k] or [E, capacity]
                                 int32_t* counts,         // [E]
                                 cudaStream_t stream) {
  namespace ec = jitmoe::ec;
  int device = 0, num_sms = 0, smem_optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return "could not query the device";
  ec::Plan plan = ec::make_plan(T, static_cast<int>(E), capacity, static_cast<int>(top_k), static_cast<int>(sizeof(In)),
                                expert_major, tokens_softmax, static_cast<int>(path), num_sms,
                                static_cast<size_t>(smem_optin));
  if (plan.error != nullptr) return plan.error;
  void (*route)(ec::Params<In>) = plan.cs.on ? ec::route_candidates_kernel<In> : ec::route_kernel<In>;
  if (cudaFuncSetAttribute(route, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes)) !=
      cudaSuccess)
    return "could not raise the route kernel's shared memory limit";
  int blocks_per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, route, ec::kBlock, plan.smem_bytes) !=
      cudaSuccess)
    return "could not query the route kernel's occupancy";
  ec::fit_finalizers_in_one_wave(plan, blocks_per_sm, num_sms);
  if (plan.cs.on) ec::fit_candidate_phases(plan, T, static_cast<int>(E), blocks_per_sm, num_sms);

  ec::Params<In> p{};
  p.logits = static_cast<const In*>(logits);
  p.token_mask = token_mask;
  p.T = static_cast<int>(T);
  p.E = static_cast<int>(E);
  p.capacity = static_cast<int>(capacity);
  p.top_k = static_cast<int>(top_k);
  p.tokens_softmax = tokens_softmax;
  p.fallback_topk = fallback_topk;
  p.expert_major = expert_major;
  p.group = plan.group;
  p.cache_keys = plan.cache_keys;
  p.sel_blocks = plan.sel_blocks;
  p.fin_blocks = expert_major ? 0 : plan.fin_blocks;
  p.fin_warps = expert_major ? 0 : plan.fin_warps;
  p.candidates = plan.cs.on;
  p.bound_blocks = plan.bound_blocks;
  p.row_blocks = plan.row_blocks;
  p.row_chunks = plan.cs.row_chunks;
  p.sample_count = plan.cs.sample_count;
  p.sample_rank = plan.cs.sample_rank;
  p.cand_cap = plan.cs.cand_cap;
  p.pick_slots = plan.cs.pick_slots;
  p.stage_slots = plan.stage_slots;

  const ec::Workspace w = ec::workspace_layout(plan.cs, T, E);
  unsigned* words = reinterpret_cast<unsigned*>(workspace);
  p.counters = words;
  p.row_max = reinterpret_cast<float*>(words + w.row_max);
  p.row_rcp = reinterpret_cast<float*>(words + w.row_rcp);
  p.theta_hi = words + w.theta_hi;
  p.theta_lo = words + w.theta_lo;
  p.col_max = reinterpret_cast<float*>(words + w.col_max);
  p.col_rcp = reinterpret_cast<float*>(words + w.col_rcp);
  if (plan.cs.on) {
    p.bound = words + w.bound;
    p.cand_count = words + w.cand_count;
    p.pick_count = plan.cs.pick_slots > 0 ? words + w.pick_count : nullptr;
    p.sample_keys = words + w.sample_keys;
    p.cand = reinterpret_cast<uint2*>(words + w.cand);
    p.picks = reinterpret_cast<uint2*>(words + w.picks);
  }
  p.weights = weights;
  p.ids = ids;
  p.counts = counts;

  const int route_blocks = plan.cs.on ? p.bound_blocks + p.row_blocks + p.sel_blocks + p.fin_blocks
                                      : p.sel_blocks + p.fin_blocks;
  ec::prepare_kernel<In><<<static_cast<unsigned>(plan.prep_blocks), ec::kPrepBlock, 0, stream>>>(p);
  route<<<route_blocks, ec::kBlock, plan.smem_bytes, stream>>>(p);
  return nullptr;
}
