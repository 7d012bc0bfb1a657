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

template <typename T, int VEC>
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
    for (int j = 0; j < topk; ++j) {
      const long long slot = t * topk + j;
      const uint32_t local = static_cast<uint32_t>(topk_ids[slot]) - static_cast<uint32_t>(expert_offset);
      if (local >= static_cast<uint32_t>(num_experts)) continue;
      const Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(out_slots + slot * hidden + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += to_float(x.v[v]);
    }
    Vec<T, VEC> y;
#pragma unroll
    for (int v = 0; v < VEC; ++v) y.v[v] = from_float<T>(acc[v]);
    *reinterpret_cast<Vec<T, VEC>*>(out + t * hidden + col) = y;
  }
}

}  // namespace jitmoe::permute
