// moe_combine: the deterministic finalize of the fused MoE layer.
//
//   out[t, :] = sum over j < topk, in order, of out_slots[t * topk + j, :]   for slots whose expert is local
//
// GEMM2 has already applied the fc2 bias and the routing weight to every local slot row and never wrote the
// others (other ranks' experts, invalid ids), so those rows are skipped here and a token without a local expert
// gets an all-zero row. Each thread owns VEC consecutive columns of one token, accumulates in fp32 in the fixed
// j order (no atomics: bitwise repeatable) and stores once. VEC is 16 bytes' worth of elements when the hidden
// size and both pointers allow 16-byte vectors, else 1.
#pragma once
#include <cstdint>

#include "common/dtypes.cuh"
#include "common/pdl.cuh"

namespace jitmoe::permute {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

constexpr int kCombineBatch = 8;  // choices whose rows one thread of the latency-bound kernel has in flight

// BATCH: choices whose rows a thread loads before adding any (the launcher picks kCombineBatch for few tokens, 1
// for many; moe_permute.cu).
template <typename T, int VEC, int BATCH>
__global__ void moe_combine_kernel(const T* __restrict__ out_slots,      // [num_tokens * topk, hidden]
                                   const int32_t* __restrict__ topk_ids,  // [num_tokens * topk] global ids
                                   T* __restrict__ out,                   // [num_tokens, hidden]
                                   int num_tokens, int topk, int hidden, int expert_offset, int num_experts) {
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const long long vecs_per_row = hidden / VEC;
  const long long total = static_cast<long long>(num_tokens) * vecs_per_row;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long t = i / vecs_per_row;
    const long long col = (i - t * vecs_per_row) * VEC;
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    for (int j0 = 0; j0 < topk; j0 += BATCH) {
      // Issue the batch's loads before any add: with few tokens the kernel is latency-bound, and one round trip
      // per choice (k = 8: eight in a row) was most of its time. The adds keep the j order.
      Vec<T, VEC> x[BATCH];
      bool local[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        const long long slot = t * topk + j0 + u;
        local[u] = j0 + u < topk &&
                   static_cast<uint32_t>(topk_ids[slot]) - static_cast<uint32_t>(expert_offset) <
                       static_cast<uint32_t>(num_experts);
        if (local[u]) x[u] = *reinterpret_cast<const Vec<T, VEC>*>(out_slots + slot * hidden + col);
      }
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        if (!local[u]) continue;
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += to_float(x[u].v[v]);
      }
    }
    Vec<T, VEC> y;
#pragma unroll
    for (int v = 0; v < VEC; ++v) y.v[v] = from_float<T>(acc[v]);
    *reinterpret_cast<Vec<T, VEC>*>(out + t * hidden + col) = y;
  }
}

}  // namespace jitmoe::permute
