// Expert Choice launcher for ${dtype} logits (rendered per spec; the binding is the only file that touches torch).
#include <cuda_runtime.h>

#include "expert_choice/expert_choice.cuh"
#include "expert_choice/expert_choice_plan.h"

namespace {
using In = jitmoe::dtype_${dtype};
}  // namespace

int64_t expert_choice_workspace_words(int64_t T, int64_t E) { return jitmoe::ec::workspace_words(T, E); }

// Returns nullptr once both kernels are enqueued, else a message (launch errors are left to cudaGetLastError).
const char* expert_choice_launch(const void* logits,      // [T, E]
                                 const bool* token_mask,  // [T] or nullptr
                                 int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                 bool fallback_topk, bool expert_major,
                                 int32_t* workspace,      // [expert_choice_workspace_words(T, E)]
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
  ec::Plan plan = ec::make_plan(T, static_cast<int>(E), static_cast<int>(sizeof(In)), expert_major,
                                tokens_softmax, num_sms, static_cast<size_t>(smem_optin));
  if (plan.error != nullptr) return plan.error;
  if (cudaFuncSetAttribute(ec::route_kernel<In>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(plan.smem_bytes)) != cudaSuccess)
    return "could not raise the route kernel's shared memory limit";
  int blocks_per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, ec::route_kernel<In>, ec::kBlock,
                                                    plan.smem_bytes) != cudaSuccess)
    return "could not query the route kernel's occupancy";
  ec::fit_finalizers_in_one_wave(plan, blocks_per_sm, num_sms);

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
  unsigned* words = reinterpret_cast<unsigned*>(workspace);
  p.counters = words;
  p.row_max = reinterpret_cast<float*>(words + 4);
  p.row_rcp = p.row_max + T;
  p.theta_hi = reinterpret_cast<unsigned*>(p.row_rcp + T);
  p.theta_lo = p.theta_hi + E;
  p.col_max = reinterpret_cast<float*>(p.theta_lo + E);
  p.col_rcp = p.col_max + E;
  p.weights = weights;
  p.ids = ids;
  p.counts = counts;

  ec::prepare_kernel<In><<<static_cast<unsigned>(plan.prep_blocks), ec::kPrepBlock, 0, stream>>>(p);
  ec::route_kernel<In><<<p.sel_blocks + p.fin_blocks, ec::kBlock, plan.smem_bytes, stream>>>(p);
  return nullptr;
}
