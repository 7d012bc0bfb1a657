// One grouped GEMM of the fused-MoE layer on the persistent warp-specialised SM90 kernel (TMA + wgmma), rendered
// per spec; built for sm_90a only. Placeholders are those of sm90/gemm.cu:
//   ${dtype}    element type tag: bf16 | fp16 (jitmoe::dtype_<tag>): the layer's type (bias, GEMM2's output)
//   ${operand}  element type tag of A and B: ${dtype}'s own, or e4m3 (FP8; GEMM1 then writes inter in e4m3)
//   ${weight}   element type tag of B: ${operand}'s own, or s8 (INT8 weight-only: int8 B converted to ${dtype} in
//               shared memory, per-channel scales in the epilogue; 16-bit operands, clusters of 1)
//   ${act}      an Act enumerator (activation.cuh); GEMM2 is rendered with Identity
//   ${mode}     gemm1 (gather x into a_sorted, activation epilogue -> inter) | gemm2 (inter, bias * routing
//               weight -> out_slots)
//   ${block_m}  rows of the sorted order per tile (= the moe_align block size): 128
//   ${block_n}  output columns per tile: 64, 128, 192 or 256 (gated GEMM1: 64 or 128)
//   ${block_k}  K slice per ring stage: 64 (128 with e4m3 operands: 128 bytes either way)
//   ${stages}   depth of the TMA ring: >= 2, shared memory (ring + [BM, BN] staging tile) <= 227 KiB
//   ${cluster_m} CTAs per cluster along M sharing (multicasting) the weight tile: 1 or 2
// This spec: ${dtype} (${operand} operands, ${weight} weights) ${act} ${mode} ${block_m}x${block_n}x${block_k},
// ${stages} stages, clusters of ${cluster_m}.
#include "moe/sm90ws/moe_gemm_sm90ws.cuh"

namespace jitmoe::moe {

void moe_gemm_launch(const MoeGemmArgs& args, cudaStream_t stream) {
  sm90ws::launch<jitmoe::dtype_${dtype}, jitmoe::dtype_${operand}, jitmoe::dtype_${weight}, Act::${act},
                 sm90ws::GemmMode::${mode}, ${block_m}, ${block_n}, ${block_k}, ${stages}, ${cluster_m}>(args, stream);
}

}  // namespace jitmoe::moe
