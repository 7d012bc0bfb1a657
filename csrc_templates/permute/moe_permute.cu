// Launchers of the permute family (moe_align, moe_combine): plain C++ over raw pointers, no torch.
// The module has no compile-time parameters: sizes, block_m and the dtype are run-time values, so one build
// serves every call of every dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "permute/moe_align.cuh"
#include "permute/moe_combine.cuh"

namespace {

constexpr int kMinSlotsPerWarp = 256;  // fewer slots per warp would cost more in table setup than it saves

// Warps that own a slice of the slots: enough to keep each busy, few enough that (warps + 1) * E ints fit.
int choose_count_warps(int num_slots, int num_experts, int smem_limit) {
  const int by_work = (num_slots + kMinSlotsPerWarp - 1) / kMinSlotsPerWarp;
  const long long row_bytes = static_cast<long long>(num_experts) * sizeof(int32_t);
  const long long by_smem = smem_limit / row_bytes - 1;  // one extra row holds the per-expert totals
  long long w = by_work < by_smem ? by_work : by_smem;
  if (w > jitmoe::permute::kAlignWarps) w = jitmoe::permute::kAlignWarps;
  return w < 1 ? 1 : static_cast<int>(w);
}

template <typename T>
void launch_combine(const void* out_slots, const int32_t* topk_ids, void* out, int num_tokens, int topk,
                    int hidden, int expert_offset, int num_experts, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kVec = 16 / sizeof(T);
  const bool vector_ok = hidden % kVec == 0 && reinterpret_cast<uintptr_t>(out_slots) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int vec = vector_ok ? kVec : 1;
  const long long work = static_cast<long long>(num_tokens) * (hidden / vec);
  if (work == 0) return;
  long long blocks = (work + kThreads - 1) / kThreads;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // grid-stride beyond this
  const T* src = static_cast<const T*>(out_slots);
  T* dst = static_cast<T*>(out);
  if (vector_ok) {
    jitmoe::permute::moe_combine_kernel<T, kVec><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        src, topk_ids, dst, num_tokens, topk, hidden, expert_offset, num_experts);
  } else {
    jitmoe::permute::moe_combine_kernel<T, 1><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        src, topk_ids, dst, num_tokens, topk, hidden, expert_offset, num_experts);
  }
}

}  // namespace

// topk_ids [num_slots]; sorted_ids [m_pad_max]; block_expert [m_pad_max / block_m]; num_padded [1];
// expert_counts [num_experts]. Errors surface through cudaGetLastError (the binding checks it).
void moe_align_launch(const int32_t* topk_ids, int32_t* sorted_ids, int32_t* block_expert, int32_t* num_padded,
                      int32_t* expert_counts, int num_slots, int num_experts, int expert_offset, int block_m,
                      int m_pad_max, cudaStream_t stream) {
  int device = 0, smem_limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  smem_limit -= static_cast<int>((jitmoe::permute::kAlignWarps + 1) * sizeof(int));  // the kernel's static scratch
  jitmoe::permute::AlignArgs args{topk_ids, sorted_ids, block_expert, num_padded, expert_counts, num_slots,
                                  num_experts, expert_offset, block_m, m_pad_max, 0};
  args.count_warps = choose_count_warps(num_slots, num_experts, smem_limit);
  const size_t smem = static_cast<size_t>(args.count_warps + 1) * num_experts * sizeof(int32_t);
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(jitmoe::permute::moe_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  }
  jitmoe::permute::moe_align_kernel<<<1, jitmoe::permute::kAlignThreads, smem, stream>>>(args);
}

// dtype: 0 fp32, 1 bf16, 2 fp16. out_slots [num_tokens * topk, hidden]; topk_ids [num_tokens * topk];
// out [num_tokens, hidden].
void moe_combine_launch(int dtype, const void* out_slots, const int32_t* topk_ids, void* out, int num_tokens,
                        int topk, int hidden, int expert_offset, int num_experts, cudaStream_t stream) {
  switch (dtype) {
    case 0: launch_combine<float>(out_slots, topk_ids, out, num_tokens, topk, hidden, expert_offset, num_experts,
                                  stream); break;
    case 1: launch_combine<__nv_bfloat16>(out_slots, topk_ids, out, num_tokens, topk, hidden, expert_offset,
                                          num_experts, stream); break;
    case 2: launch_combine<__half>(out_slots, topk_ids, out, num_tokens, topk, hidden, expert_offset, num_experts,
                                   stream); break;
    default: break;
  }
}
