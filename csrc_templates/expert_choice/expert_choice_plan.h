// Launch plan of the Expert Choice kernels (host code): grid sizes, experts per selector block, shared memory.
#pragma once
#include <algorithm>
#include <cstddef>

#include "expert_choice/ec_params.cuh"

namespace jitmoe::ec {

constexpr size_t kCacheBudget = 128 * 1024;     // key cache of one selector block
constexpr size_t kFinalizerBudget = 64 * 1024;  // finalizers may use this much even when selectors need less

struct Plan {
  const char* error;     // nullptr when the plan can run
  int group;             // experts per selector block
  bool cache_keys;
  int sel_blocks, fin_blocks, fin_warps;
  long long prep_blocks;
  size_t smem_bytes;     // dynamic shared memory of the route kernel
};

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

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
// up to two blocks per SM (the route kernel's launch bounds allow two resident blocks).
inline void plan_finalizers(Plan& plan, long long T, int E, int num_sms, size_t smem_optin) {
  const size_t room = std::min(smem_optin, std::max(plan.smem_bytes, kFinalizerBudget));
  const size_t fixed = finalizer_smem_bytes(E, 0);
  const long long fit = room > fixed ? static_cast<long long>((room - fixed) / (4ull * E)) : 0;
  plan.fin_warps = static_cast<int>(std::clamp<long long>(fit, 1, kMaxFinalizerWarps));
  plan.smem_bytes = std::max(plan.smem_bytes, finalizer_smem_bytes(E, plan.fin_warps));
  const long long resident = 2ll * std::max(num_sms, 1);
  plan.fin_blocks = static_cast<int>(std::clamp<long long>(ceil_div(T, plan.fin_warps), 1, resident));
}

// Finalizers in a single wave: no more blocks than fit on the GPU at once with the route kernel's shared memory
// (a second wave would only repeat each block's setup and leave a tail).
inline void fit_finalizers_in_one_wave(Plan& plan, int blocks_per_sm, int num_sms) {
  plan.fin_blocks = std::max(1, std::min(plan.fin_blocks, std::max(blocks_per_sm, 1) * std::max(num_sms, 1)));
}

inline Plan make_plan(long long T, int E, int elem_bytes, bool expert_major, bool tokens_softmax, int num_sms,
                      size_t smem_optin) {
  Plan plan{};
  plan_selectors(plan, T, E, elem_bytes, num_sms, smem_optin);
  if (!expert_major) plan_finalizers(plan, T, E, num_sms, smem_optin);
  const long long prep_threads = std::max<long long>({tokens_softmax ? 0 : 32 * T, E, 2});
  plan.prep_blocks = ceil_div(prep_threads, kPrepBlock);
  if (plan.smem_bytes > smem_optin) plan.error = "too many experts for this GPU's shared memory per block";
  return plan;
}

}  // namespace jitmoe::ec
