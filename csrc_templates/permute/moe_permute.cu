// Launchers of the permute family (moe_align, moe_combine): plain C++ over raw pointers, no torch.
// The module has no compile-time parameters: sizes, block_m, the dtype and the moe_align path (one CTA, or
// num_chunks > 0 chunks over many CTAs, chosen by the caller from the slot count) are run-time values, so one
// build serves every call.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/launch.cuh"
#include "common/pdl.cuh"
#include "permute/moe_align.cuh"
#include "permute/moe_align_multi.cuh"
#include "permute/moe_combine.cuh"

namespace {

constexpr int kMinSlotsPerWarp = 64;  // fewer slots per warp would cost more in table setup than it saves
constexpr int kStaticSmemAllowance = 256;  // >= either align kernel's static shared memory (ptxas: 144 and 80 B)

// Warps of the single-CTA kernel that own a slice: enough to keep each busy, few enough that (warps + 1) * E ints
// fit (the extra row holds the per-expert totals).
int single_cta_count_warps(int num_slots, int num_experts, int smem_limit) {
  const int by_work = (num_slots + kMinSlotsPerWarp - 1) / kMinSlotsPerWarp;
  const long long row_bytes = static_cast<long long>(num_experts) * sizeof(int32_t);
  const long long by_smem = smem_limit / row_bytes - 1;
  long long w = by_work < by_smem ? by_work : by_smem;
  if (w > jitmoe::permute::kAlignWarps) w = jitmoe::permute::kAlignWarps;
  return w < 1 ? 1 : static_cast<int>(w);
}

// Placer warps of the many-CTA kernel: as many as fit count_warps * E ints of shared memory, at most one per warp.
int multi_cta_count_warps(int num_experts, int smem_limit) {
  const long long w = smem_limit / (static_cast<long long>(num_experts) * sizeof(int32_t));
  if (w > jitmoe::permute::kMultiWarps) return jitmoe::permute::kMultiWarps;
  return w < 1 ? 1 : static_cast<int>(w);
}

// Dynamic shared memory the device allows one block next to an align kernel's static shared memory.
int dynamic_smem_limit() {
  return jitmoe::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(0) - kStaticSmemAllowance;
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
}

void launch_align_single(jitmoe::permute::AlignArgs args, cudaStream_t stream) {
  namespace pm = jitmoe::permute;
  const int smem_limit = dynamic_smem_limit();
  args.count_warps = single_cta_count_warps(args.num_slots, args.num_experts, smem_limit);
  const size_t smem = static_cast<size_t>(args.count_warps + 1) * args.num_experts * sizeof(int32_t);
  allow_dynamic_smem(pm::moe_align_kernel, smem);
  jitmoe::launch_pdl(pm::moe_align_kernel, {1, pm::kAlignThreads, smem}, stream, args);
}

void launch_align_multi(jitmoe::permute::AlignArgs args, int32_t* sync, int32_t* scratch, int num_chunks,
                        cudaStream_t stream) {
  namespace pm = jitmoe::permute;
  const int smem_limit = dynamic_smem_limit();
  args.count_warps = multi_cta_count_warps(args.num_experts, smem_limit);
  const long long per_chunk = (static_cast<long long>(args.num_slots) + num_chunks - 1) / num_chunks;
  const int chunk_slots = static_cast<int>((per_chunk + 31) / 32 * 32);
  const pm::MultiAlignArgs multi{args, sync, scratch, num_chunks, chunk_slots};
  const size_t smem = static_cast<size_t>(args.count_warps) * args.num_experts * sizeof(int32_t);
  allow_dynamic_smem(pm::moe_align_multi_kernel, smem);
  jitmoe::launch_pdl(pm::moe_align_multi_kernel, {2 * num_chunks, pm::kMultiThreads, smem}, stream, multi);
}

// Blocks of one launch up to which moe_combine is latency-bound (a few tokens: about one block per SM) and takes
// the kernel that has all of a token's choices in flight at once; past it the one-choice-at-a-time kernel, whose
// fewer registers keep more loads in flight per SM. H100, kernel time, old -> batched: OLMoE T = 16 / 256
// 5.3 / 6.2 -> 3.1 / 4.7 us, but T = 4096 56.9 -> 61.0 (benchmarks/results/h100-2026-11-23-session17/).
constexpr int kCombineBatchedBlocksPerSm = 2;

template <typename T, int VEC>
void launch_combine_vec(const T* src, const int32_t* topk_ids, T* dst, int num_tokens, int topk, int hidden,
                        int expert_offset, int num_experts, unsigned blocks, unsigned threads, cudaStream_t stream) {
  namespace pm = jitmoe::permute;
  const auto kernel = blocks <= static_cast<unsigned>(kCombineBatchedBlocksPerSm * jitmoe::sm_count())
                          ? pm::moe_combine_kernel<T, VEC, pm::kCombineBatch>
                          : pm::moe_combine_kernel<T, VEC, 1>;
  jitmoe::launch_pdl(kernel, {blocks, threads}, stream, src, topk_ids, dst, num_tokens, topk, hidden, expert_offset,
                     num_experts);
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
  const auto grid = static_cast<unsigned>(blocks);
  if (vector_ok) {
    launch_combine_vec<T, kVec>(src, topk_ids, dst, num_tokens, topk, hidden, expert_offset, num_experts, grid,
                                kThreads, stream);
  } else {
    launch_combine_vec<T, 1>(src, topk_ids, dst, num_tokens, topk, hidden, expert_offset, num_experts, grid,
                             kThreads, stream);
  }
}

}  // namespace

// topk_ids [num_slots]; sorted_ids [m_pad_max]; block_expert [m_pad_max / block_m]; num_padded [1];
// expert_counts [num_experts]; slot_rows [num_slots] or null (not written); block_done [m_pad_max / block_m] or null
// (zeroed when given). num_chunks == 0: the single-CTA kernel (sync and scratch unused, may be null); otherwise the
// many-CTA kernel with sync [4] (zero on entry, zero again on exit) and scratch [(num_chunks + 1) * num_experts].
// Errors surface through cudaGetLastError (the binding checks it).
void moe_align_launch(const int32_t* topk_ids, int32_t* sorted_ids, int32_t* block_expert, int32_t* num_padded,
                      int32_t* expert_counts, int32_t* slot_rows, int32_t* block_done, int32_t* sync,
                      int32_t* scratch, int num_slots, int num_experts, int expert_offset, int block_m, int m_pad_max,
                      int num_chunks, cudaStream_t stream) {
  const jitmoe::permute::AlignArgs args{topk_ids,  sorted_ids,  block_expert,  num_padded, expert_counts, slot_rows,
                                        num_slots, num_experts, expert_offset, block_m,    m_pad_max,     0,
                                        block_done};
  if (num_chunks > 0) {
    launch_align_multi(args, sync, scratch, num_chunks, stream);
  } else {
    launch_align_single(args, stream);
  }
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
