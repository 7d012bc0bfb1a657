// Expert Choice launcher for ${dtype} logits (rendered per spec; the binding is the only file that touches torch).
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "expert_choice/expert_choice.cuh"
#include "expert_choice/expert_choice_plan.h"

namespace {
using In = jitmoe::dtype_${dtype};
}  // namespace

// Workspace words for these arguments, or -1 (with *error set) when the requested path cannot run.
int64_t expert_choice_workspace_words(int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                      bool expert_major, int64_t path, const char** error) {
  namespace ec = jitmoe::ec;
  ec::PathShape ps;
  *error = ec::choose_path(ps, T, static_cast<int>(E), capacity, static_cast<int>(top_k), tokens_softmax,
                           expert_major, static_cast<int>(path));
  return *error != nullptr ? -1 : ec::workspace_layout(ps, T, E).words;
}

namespace {
namespace ec = jitmoe::ec;

// Sets the dynamic shared memory limit of a kernel (above 48 KB it must be raised explicitly).
template <typename Kernel>
bool allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
         cudaSuccess;
}

template <bool kFull>
void (*score_keys_variant(int chunks))(ec::Params<In>) {
  switch (chunks) {
    case 1: return ec::score_keys_kernel<In, 1, kFull>;
    case 2: return ec::score_keys_kernel<In, 2, kFull>;
    case 4: return ec::score_keys_kernel<In, 4, kFull>;
    case 8: return ec::score_keys_kernel<In, 8, kFull>;
    case 16: return ec::score_keys_kernel<In, 16, kFull>;
    default: return ec::score_keys_kernel<In, 32, kFull>;
  }
}

// The score-keys kernel for rows of E experts held in `chunks` 32-expert chunks (the exact-width variant when E fills
// them).
void (*score_keys_kernel_for(int chunks, int E))(ec::Params<In>) {
  return E == 32 * chunks ? score_keys_variant<true>(chunks) : score_keys_variant<false>(chunks);
}

// Key path: raises the three kernels' shared memory limits and fits the finalizers in one wave.
const char* prepare_key_path(ec::Plan& plan, int E, bool expert_major, int num_sms) {
  if (!allow_smem(score_keys_kernel_for(plan.ps.row_chunks, E), plan.key_tile_smem) ||
      !allow_smem(ec::select_keys_kernel<In>, plan.key_select_smem))
    return "could not raise the key path's shared memory limits";
  if (expert_major) return nullptr;
  int blocks_per_sm = 0;
  if (!allow_smem(ec::finalize_kernel<In>, plan.smem_bytes) ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, ec::finalize_kernel<In>, ec::kBlock,
                                                    plan.smem_bytes) != cudaSuccess)
    return "could not set up the finalizers";
  ec::fit_finalizers_in_one_wave(plan, blocks_per_sm, num_sms);
  return nullptr;
}

// Key path: score keys, select, and (token-major) finalize: three launches in stream order, each allowed to start
// while the one before it drains (programmatic dependent launch, common/pdl.cuh).
void launch_key_path(const ec::Plan& plan, const ec::Params<In>& p, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(ec::ceil_div(p.T, ec::kKeyTileTokens));
  jitmoe::launch_pdl(score_keys_kernel_for(plan.ps.row_chunks, p.E),
                     jitmoe::LaunchShape{dim3(tiles), dim3(ec::kKeyRowThreads), plan.key_tile_smem}, stream, p);
  jitmoe::launch_pdl(ec::select_keys_kernel<In>,
                     jitmoe::LaunchShape{dim3(p.E), dim3(ec::kKeySelectThreads), plan.key_select_smem}, stream, p);
  if (!p.expert_major)
    jitmoe::launch_pdl(ec::finalize_kernel<In>,
                       jitmoe::LaunchShape{dim3(p.fin_blocks), dim3(ec::kBlock), plan.smem_bytes}, stream, p);
}

// Other paths: the route kernel's shared memory limit, and its phases fitted to its occupancy.
const char* prepare_route(ec::Plan& plan, void (*route)(ec::Params<In>), long long T, int E, int num_sms) {
  if (!allow_smem(route, plan.smem_bytes)) return "could not raise the route kernel's shared memory limit";
  int blocks_per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, route, ec::kBlock, plan.smem_bytes) !=
      cudaSuccess)
    return "could not query the route kernel's occupancy";
  ec::fit_finalizers_in_one_wave(plan, blocks_per_sm, num_sms);
  if (plan.ps.candidates) ec::fit_candidate_phases(plan, T, E, blocks_per_sm, num_sms);
  return nullptr;
}
}  // namespace

// Returns nullptr once the kernels are enqueued, else a message (launch errors are left to cudaGetLastError).
// path: jitmoe::ec::Path (0 = auto, 1 = whole columns, 2 = candidates, 3 = keys).
const char* expert_choice_launch(const void* logits,      // [T, E]
                                 const bool* token_mask,  // [T] or nullptr
                                 int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                 bool fallback_topk, bool expert_major, int64_t path,
                                 int32_t* workspace,      // [expert_choice_workspace_words(...)]
                                 float* weights,          // [T, top_k] or [E, capacity]
                                 int32_t* ids,            // [T, top_k] or [E, capacity]
                                 int32_t* counts,         // [E]
                                 cudaStream_t stream) {
  // Cached per device (common/launch.cuh): eager calls do not query the driver each time.
  const int num_sms = jitmoe::device_attribute<cudaDevAttrMultiProcessorCount>(0);
  const int smem_optin = jitmoe::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(0);
  if (num_sms == 0 || smem_optin == 0) return "could not query the device";
  ec::Plan plan = ec::make_plan(T, static_cast<int>(E), capacity, static_cast<int>(top_k), static_cast<int>(sizeof(In)),
                                expert_major, tokens_softmax, static_cast<int>(path), num_sms,
                                static_cast<size_t>(smem_optin));
  if (plan.error != nullptr) return plan.error;
  const bool keys = plan.ps.keys;
  void (*route)(ec::Params<In>) = plan.ps.candidates ? ec::route_candidates_kernel<In> : ec::route_kernel<In>;
  const char* error = keys ? prepare_key_path(plan, static_cast<int>(E), expert_major, num_sms)
                           : prepare_route(plan, route, T, static_cast<int>(E), num_sms);
  if (error != nullptr) return error;

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
  p.candidates = plan.ps.candidates;
  p.bound_blocks = plan.bound_blocks;
  p.row_blocks = plan.row_blocks;
  p.row_chunks = plan.ps.row_chunks;
  p.sample_count = plan.ps.sample_count;
  p.sample_rank = plan.ps.sample_rank;
  p.cand_cap = plan.ps.cand_cap;
  p.pick_slots = plan.ps.pick_slots;
  p.stage_slots = plan.stage_slots;
  p.key_pitch = plan.ps.key_pitch;

  const ec::Workspace w = ec::workspace_layout(plan.ps, T, E);
  unsigned* words = reinterpret_cast<unsigned*>(workspace);
  p.counters = words;
  p.row_max = reinterpret_cast<float*>(words + w.row_max);
  p.row_rcp = reinterpret_cast<float*>(words + w.row_rcp);
  p.theta_hi = words + w.theta_hi;
  p.theta_lo = words + w.theta_lo;
  p.col_max = reinterpret_cast<float*>(words + w.col_max);
  p.col_rcp = reinterpret_cast<float*>(words + w.col_rcp);
  if (plan.ps.candidates) {
    p.pick_count = plan.ps.pick_slots > 0 ? words + w.pick_count : nullptr;
    p.picks = reinterpret_cast<uint2*>(words + w.picks);
    p.bound = words + w.bound;
    p.cand_count = words + w.cand_count;
    p.sample_keys = words + w.sample_keys;
    p.cand = reinterpret_cast<uint2*>(words + w.cand);
  }
  if (keys) {
    p.keys = reinterpret_cast<unsigned short*>(words + w.keys);
    p.pick_bits = plan.ps.pick_words > 0 ? words + w.pick_bits : nullptr;  // token-major only
  }
  p.weights = weights;
  p.ids = ids;
  p.counts = counts;

  if (keys) {
    launch_key_path(plan, p, stream);
    return nullptr;
  }
  const int route_blocks = plan.ps.candidates ? p.bound_blocks + p.row_blocks + p.sel_blocks + p.fin_blocks
                                              : p.sel_blocks + p.fin_blocks;
  ec::prepare_kernel<In><<<static_cast<unsigned>(plan.prep_blocks), ec::kPrepBlock, 0, stream>>>(p);
  route<<<route_blocks, ec::kBlock, plan.smem_bytes, stream>>>(p);
  return nullptr;
}
