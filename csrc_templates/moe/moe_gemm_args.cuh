// The contract between the fused-MoE pipeline and its grouped GEMM kernels (SM80 and SM90 share it).
//
// Rows are processed in the expert-sorted, tile-padded order produced by moe_align: row p of that order holds
// slot s = sorted_ids[p] (a slot is one (token, choice) pair, s = t * topk + j); s >= num_slots marks a padding
// row. Every BLOCK_M consecutive rows belong to one local expert, block_expert[p / BLOCK_M] (-1: unused block).
//   GEMM1 (gather):  inter[p, :]      = act( x[s / topk, :] @ fc1[e]^T + b1[e] )           for real rows
//   GEMM2 (scatter): out_slots[s, :]  = w[s] * ( inter[p, :] @ fc2[e]^T + b2[e] )           for real rows
// With FP8 operands (x, fc1, inter, fc2 in e4m3; sm90ws only) the products are scaled by acc_scale[e] before the
// bias, and GEMM1 rounds act(...) * out_scale to e4m3 (jitmoe/quant.py has the FlashInfer scales they come from).
// Padding rows are never written by GEMM2; GEMM1 may write anything into them (GEMM2 ignores them).
//
// Split-K (k_splits > 1; kernels that support it): the K range is cut into k_splits slices of whole BLOCK_K tiles;
// slice z writes its fp32 sums to partials[z] and a second launch reduces the slices in a fixed order (deterministic)
// and applies the epilogue. GEMM1: partials [k_splits, m_pad_max, n_b] raw sums (bias and activation come in the
// reduce); GEMM2: partials [k_splits, num_slots, N] raw sums (bias and routing weight come in the reduce).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace jitmoe::moe {

enum class GemmMode { gemm1, gemm2 };  // which of the two GEMMs above a kernel specialization computes

struct MoeGemmArgs {
  const void* a;                // GEMM1: x [T, K]; GEMM2: inter [m_pad_max, K]
  const void* b;                // [E, n_b, K] row-major (K contiguous); gated GEMM1: n_b = 2N, rows [0,N) up,
                                // rows [N, 2N) gate; otherwise n_b = N
  const void* bias;             // [E, n_b] in the element type, or nullptr
  void* out;                    // GEMM1: inter [m_pad_max, N]; GEMM2: out_slots [num_slots, N]
  const int32_t* sorted_ids;    // [m_pad_max]
  const int32_t* block_expert;  // [m_pad_max / BLOCK_M]
  const int32_t* num_padded;    // [1] rows of the sorted order in use (a device value: no host sync)
  const float* slot_weights;    // GEMM2: [num_slots] routing weight per slot; GEMM1: nullptr
  const float* act_alpha;       // [E] SwigluBias alpha, or nullptr (1)
  const float* act_beta;        // [E] SwigluBias beta, or nullptr (0)
  const float* act_limit;       // [E] SwigluBias/SwigluStep limit, or nullptr (inf; 7 for SwigluStep)
  const float* acc_scale;       // FP8 operands (sm90ws): [E] per-expert multiplier of the accumulator (the
                                // dequantization, before bias and activation); nullptr otherwise
  const float* out_scale;       // GEMM1 with FP8 operands: multiplier of act(...) before its e4m3 rounding (GEMM2's
                                // input quantization), [1] or [E] (out_scale_stride 0 or 1); nullptr otherwise
  int out_scale_stride;
  const void* w_scale;          // INT8 weight-only (sm80 kernel): [E, n_b] per-output-channel weight scales (fp32
                                // when w_scale_fp32, else the element type), multiplying the sums before the bias
  bool w_scale_fp32;
  float* partials;              // split-K scratch (see above), or nullptr when k_splits == 1
  void* a_sorted;               // GEMM1 on kernels that load A in sorted order with TMA: [m_pad_max, K] scratch the
                                // launch fills with x[sorted_ids[p] / topk] first, or nullptr: sm90ws then loads
                                // each real row from x by itself ("direct rows"); nullptr for the other kernels
  int32_t* slot_rows;           // with a_sorted: [num_slots] the sorted row of every slot; else nullptr
  bool slot_rows_filled;        // slot_rows already holds every slot's row (moe_align wrote it, -1 for slots of no
                                // local expert); otherwise it is scratch that the launch fills first
  int32_t* block_done;          // sm90ws only: [m_pad_max / BLOCK_M] counters zeroed by moe_align, or nullptr. GEMM1
                                // adds one per consumer warp for each tile of M block m it has stored; GEMM2,
                                // launched with PDL right after it, loads an A block once its count is complete
                                // instead of waiting for the whole of GEMM1 (see sm90ws/moe_gemm_sm90ws.cuh)
  int block_done_n_blocks;      // GEMM2 with block_done: GEMM1's N blocks (the tiles each M block waits for)
  int num_slots;                // T * topk
  int topk;
  int m_pad_max;                // length of sorted_ids (a multiple of BLOCK_M)
  int n;                        // output columns: GEMM1 I, GEMM2 H
  int k;                        // reduction length: GEMM1 H, GEMM2 I
  int num_experts;              // local experts
  int k_splits;                 // >= 1
};

// Each rendered GEMM source (sm80/gemm.cu or sm90/gemm.cu, one spec = one GEMM of one kind) defines this;
// the binding (moe_gemm_binding.cpp) calls it. Must not synchronise; errors surface via cudaGetLastError.
void moe_gemm_launch(const MoeGemmArgs& args, cudaStream_t stream);

}  // namespace jitmoe::moe
