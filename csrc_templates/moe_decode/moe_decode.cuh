// Decode path of the fused MoE layer: weight-streaming kernels for a few tokens, where every (token, choice) slot
// has its own expert rows and a grouped GEMM's tiles would be mostly padding.
//
//   gemm1:  inter[s, n] = act(x[t] . fc1[e, n] + b1[e, n], x[t] . fc1[e, I + n] + b1[e, I + n])   (gated)
//   gemm2:  out[t, n]   = sum over j < k of w[t, j] * (inter[t k + j] . fc2[e_j, n] + b2[e_j, n])
//
// with s = t * k + j and e = topk_ids[s] - expert_offset; slots whose expert is not local are skipped (GEMM1 leaves
// their inter row unwritten, GEMM2 adds nothing for them), so a token without a local expert gets zeros. GEMM2
// sums a token's choices itself in a fixed order: no sorting, no padding, no per-slot buffer, no atomics.
//
// FP8 per-tensor (Op = W = e4m3: x, both weights and inter in e4m3, out in T): GEMM1 scales its fp32 dot by
// fc1_dequant[e] before the bias and stores e4m3(act(...) * fc2_quant) (saturating); GEMM2 scales each choice's dot
// by fc2_dequant[e] before its bias. A product of two e4m3 values is exact in fp32 and the sums round in fp32:
// unlike the e4m3 wgmma, nothing accumulates in fewer bits.
// INT8 weight-only (W = int8_t, Op = T): each output column's dot is scaled by its weight row's scale before the bias.
// A 16-byte weight chunk then holds 16 values, which meet 32 bytes of the vector.
//
// Each warp owns kCols output columns and streams their weight rows (K contiguous) in 16-byte chunks, lane l taking
// chunks l, l + 32, ...; it loads the chunks of the vector it multiplies them with (x[t] or an inter row, read by
// every warp of the grid and so served by L2) in the same round, so nothing is staged and no barrier stands between
// the launch and the first weight request. A round issues the loads of kUnroll1 (GEMM1) or kUnroll2 chunk steps of
// every row before their FMAs so each lane keeps many 16-byte requests in flight: at these sizes the kernels are bound
// by DRAM latency x bandwidth, not by arithmetic. GEMM2 has a token's k choices to stream: its warps split them (warp
// q of a column group takes choices q, q + jw, ...) so a one-token call still fills the GPU with requests, and a final
// in-block step adds the groups' partial sums in a fixed order.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

#include "common/dtypes.cuh"
#include "common/int8.cuh"
#include "common/pdl.cuh"
#include "moe/activation.cuh"
#include "moe_decode/moe_decode_args.h"

namespace jitmoe::moe_decode {

using moe::Act;
using moe::ActParams;

constexpr int kWarps = 4;     // GEMM1
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 4;      // output columns per warp
constexpr int kColsPerBlock = kWarps * kCols;
// Elements of Op per 16-byte chunk. H and I are whole chunks (moe_decode.fits_decode), so a warp's kCols columns
// are all in range or all past the end: warps test their first column only.
template <typename Op>
constexpr int kChunk = 16 / static_cast<int>(sizeof(Op));
static_assert(kChunk<__nv_bfloat16> % kCols == 0 && kChunk<__nv_fp8_e4m3> % kCols == 0,
              "a warp's columns must not straddle the end of a row");
template <typename Op>
constexpr bool kFp8 = std::is_same_v<Op, __nv_fp8_e4m3>;
template <typename W>
constexpr bool kS8 = std::is_same_v<W, int8_t>;
// 16-byte vector chunks (of Op) that meet one 16-byte weight chunk (of W): 2 for int8 weights against 16-bit x.
template <typename Op, typename W>
constexpr int kVecWords = static_cast<int>(sizeof(Op) / sizeof(W));
constexpr int kUnroll1 = 2;   // GEMM1 chunk steps in flight together (2 x kCols rows when gated)
constexpr int kWarps2 = 8;    // GEMM2: column groups x choice warps
constexpr int kThreads2 = 32 * kWarps2;
constexpr int kUnroll2 = 2;   // GEMM2 chunk steps in flight together
// GEMM2 blocks per SM the registers must allow: four (64 registers) put a one-token call's blocks in one wave on the
// H100; sm_80's code needs 94 (it spills at 80). The FP8 form spills 56 bytes at 64 (to L1, in a kernel that waits
// on DRAM; three blocks per SM would cost Qwen3/OLMoE at T = 1 a second wave).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kMinBlocks2 = 2;
#else
constexpr int kMinBlocks2 = 4;
#endif

// GEMM2's warps per column group: they split the token's choices. A power of two (the column groups must tile the
// block) no larger than k, so no warp idles on a token with few choices.
__host__ __device__ constexpr int choice_warps(int topk) {
  int jw = 1;
  while (2 * jw <= kWarps2 && 2 * jw <= topk) jw *= 2;
  return jw;
}
__host__ __device__ constexpr int gemm2_cols_per_block(int topk) { return kWarps2 / choice_warps(topk) * kCols; }

// Local expert of slot s, or -1 (unsigned wrap-around keeps the subtraction defined for any id).
__device__ __forceinline__ int local_expert(const DecodeArgs& a, int s) {
  const uint32_t d = static_cast<uint32_t>(a.topk_ids[s]) - static_cast<uint32_t>(a.expert_offset);
  return d < static_cast<uint32_t>(a.num_experts) ? static_cast<int>(d) : -1;
}

// Elements 2i, 2i + 1 of a 16-byte chunk of Op values as floats (e4m3 through the hardware's e4m3x2 -> f16x2
// conversion, int8 through common/int8.cuh's; both exact).
template <typename Op>
__device__ __forceinline__ float2 pair_to_float2(const uint4& chunk, int i) {
  if constexpr (kS8<Op>) {
    const uint32_t biased = reinterpret_cast<const uint32_t*>(&chunk)[i / 2] ^ kS8Bias;
    return make_float2(s8_biased_to_float(biased, 2 * (i % 2)), s8_biased_to_float(biased, 2 * (i % 2) + 1));
  } else if constexpr (kFp8<Op>) {
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2(reinterpret_cast<const __nv_fp8x2_storage_t*>(&chunk)[i], __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
  } else {
    const Op* e = reinterpret_cast<const Op*>(&chunk) + 2 * i;
    return make_float2(to_float(e[0]), to_float(e[1]));
  }
}

// acc[r] += w[r][u] . v for R weight chunks (of W) against the vector chunks they meet (of Op), each row's products
// summed in element order before they join acc[r]. Element pair by pair across the rows: a vector pair is converted
// once and is dead after its R products, and a weight word is dead once its elements are used (the 16-bit GEMM2
// fits in 64 registers).
template <typename Op, typename W, int R, int U>
__device__ __forceinline__ void add_chunk_dots(const uint4 (&w)[R][U], int u, const uint4 (&v)[kVecWords<Op, W>],
                                               float (&acc)[R]) {
  constexpr int kPairsPerVec = kChunk<Op> / 2;
  float dot[R] = {};
#pragma unroll
  for (int i = 0; i < kChunk<W> / 2; ++i) {
    const float2 vf = pair_to_float2<Op>(v[i / kPairsPerVec], i % kPairsPerVec);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float2 wf = pair_to_float2<W>(w[r][u], i);
      dot[r] = fmaf(wf.y, vf.y, fmaf(wf.x, vf.x, dot[r]));
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] += dot[r];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc[r] += this lane's share of rows[r] . vec over `chunks` 16-byte chunks of W (all in global memory).
template <typename Op, typename W, int R, int U>
__device__ __forceinline__ void accumulate_rows(const uint4* const (&rows)[R], const uint4* vec, int chunks, int lane,
                                                float (&acc)[R]) {
  constexpr int kV = kVecWords<Op, W>;
  for (int base = lane; base < chunks; base += 32 * U) {
    uint4 w[R][U], v[U][kV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + 32 * u;
      const bool in = c < chunks;
#pragma unroll
      for (int i = 0; i < kV; ++i) v[u][i] = in ? __ldg(vec + c * kV + i) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < R; ++r) w[r][u] = in ? __ldg(rows[r] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + 32 * u >= chunks) break;
      add_chunk_dots<Op, W>(w, u, v[u], acc);
    }
  }
}

// grid (ceil(I / kColsPerBlock), T * k): one slot's kColsPerBlock columns of inter (in Op).
template <typename T, typename Op, typename W, Act A>
__global__ void __launch_bounds__(kThreads) decode_gemm1_kernel(const DecodeArgs a, const DecodeScales f) {
  constexpr bool kGated = moe::ActTraits<A>::kGated;
  constexpr int kRows = kGated ? 2 * kCols : kCols;
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int s = blockIdx.y;
  const int e = local_expert(a, s);
  if (e < 0) return;  // block-uniform
  const uint4* x =
      reinterpret_cast<const uint4*>(static_cast<const Op*>(a.x) + static_cast<int64_t>(s / a.topk) * a.hidden);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kCols;
  if (n0 >= a.inter_size) return;  // warp-uniform
  const int n1 = kGated ? 2 * a.inter_size : a.inter_size;
  const int chunks = a.hidden / kChunk<W>;
  const W* fc1 = static_cast<const W*>(a.fc1) + static_cast<int64_t>(e) * n1 * a.hidden;
  const uint4* rows[kRows];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = n0 + c;
    rows[c] = reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(n) * a.hidden);
    if constexpr (kGated) {
      rows[kCols + c] = reinterpret_cast<const uint4*>(fc1 + static_cast<int64_t>(a.inter_size + n) * a.hidden);
    }
  }
  float acc[kRows] = {};
  accumulate_rows<Op, W, kRows, kUnroll1>(rows, x, chunks, lane, acc);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane != 0) return;
  const T* bias = a.fc1_bias ? static_cast<const T*>(a.fc1_bias) + static_cast<int64_t>(e) * n1 : nullptr;
  const ActParams params = moe::load_act_params<A>(a.act_alpha, a.act_beta, a.act_limit, e);
  float dequant = 1.f, quant = 1.f;  // FP8: the dot's scale, and the e4m3 output's
  if constexpr (kFp8<Op>) {
    dequant = f.fc1_dequant[e];
    quant = f.fc2_quant[e * f.fc2_quant_stride];
  }
  Op* inter = static_cast<Op*>(a.inter) + static_cast<int64_t>(s) * a.inter_size;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = n0 + c;
    float up_scale = dequant, gate_scale = dequant;  // INT8 weight-only: the rows' own scales
    if constexpr (kS8<W>) {
      up_scale = load_scale<T>(f.fc1_wscale, static_cast<int64_t>(e) * n1 + n, f.wscale_fp32);
      if constexpr (kGated) {
        gate_scale = load_scale<T>(f.fc1_wscale, static_cast<int64_t>(e) * n1 + a.inter_size + n, f.wscale_fp32);
      }
    }
    const float up = acc[c] * up_scale + (bias ? to_float(bias[n]) : 0.f);
    float gate = 0.f;
    if constexpr (kGated) gate = acc[kCols + c] * gate_scale + (bias ? to_float(bias[a.inter_size + n]) : 0.f);
    inter[n] = from_float<Op>(moe::apply_act<A>(up, gate, params) * quant);  // e4m3: saturating
  }
}

// grid (ceil(H / gemm2_cols_per_block(k)), T): one token's output columns, in column groups of kCols per warp.
// Warp q of a group streams the rows of choices q, q + jw, ... and keeps per-lane partial sums; the group's first
// warp then adds the jw partials in order and reduces over lanes, so the result does not depend on timing.
template <typename T, typename Op, typename W>
__global__ void __launch_bounds__(kThreads2, kMinBlocks2)
    decode_gemm2_kernel(const DecodeArgs a, const DecodeScales f) {
  __shared__ float partial[kWarps2][kCols][32];
  __shared__ float bias_partial[kWarps2][kCols];
  pdl_start();  // common/pdl.cuh: launched with launch_pdl
  const int t = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int jw = choice_warps(a.topk);
  const int group = warp / jw, q = warp % jw;
  const int n0 = blockIdx.x * gemm2_cols_per_block(a.topk) + group * kCols;
  const int chunks = a.inter_size / kChunk<W>;
  float acc[kCols] = {};
  float bias_sum[kCols] = {};
  const bool in_range = n0 < a.hidden;  // warp-uniform; the warp still meets the barrier below
  for (int j = in_range ? q : a.topk; j < a.topk; j += jw) {
    const int s = t * a.topk + j;
    const int e = local_expert(a, s);
    if (e < 0) continue;  // warp-uniform
    const float w = a.slot_weights[s];
    const float w_dot = kFp8<Op> ? w * f.fc2_dequant[e] : w;  // FP8: the dot's scale joins the routing weight
    const W* fc2 = static_cast<const W*>(a.fc2) + static_cast<int64_t>(e) * a.hidden * a.inter_size;
    const uint4* rows[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      rows[c] = reinterpret_cast<const uint4*>(fc2 + static_cast<int64_t>(n0 + c) * a.inter_size);
    }
    const uint4* inter =
        reinterpret_cast<const uint4*>(static_cast<const Op*>(a.inter) + static_cast<int64_t>(s) * a.inter_size);
    float part[kCols] = {};
    accumulate_rows<Op, W, kCols, kUnroll2>(rows, inter, chunks, lane, part);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      float scale = w_dot;  // INT8 weight-only: times the row's own scale
      if constexpr (kS8<W>) {
        scale *= load_scale<T>(f.fc2_wscale, static_cast<int64_t>(e) * a.hidden + n0 + c, f.wscale_fp32);
      }
      acc[c] = fmaf(scale, part[c], acc[c]);
    }
    if (a.fc2_bias != nullptr) {
      const T* bias = static_cast<const T*>(a.fc2_bias) + static_cast<int64_t>(e) * a.hidden;
#pragma unroll
      for (int c = 0; c < kCols; ++c) bias_sum[c] += w * to_float(bias[n0 + c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    partial[warp][c][lane] = acc[c];
    if (lane == 0) bias_partial[warp][c] = bias_sum[c];
  }
  __syncthreads();
  if (q != 0 || !in_range) return;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(t) * a.hidden;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    float v = 0.f, b = 0.f;
    for (int p = 0; p < jw; ++p) {
      v += partial[warp + p][c][lane];
      b += bias_partial[warp + p][c];
    }
    v = warp_sum(v);
    if (lane == 0) out[n0 + c] = from_float<T>(v + b);
  }
}

}  // namespace jitmoe::moe_decode
