// One grouped GEMM of the fused-MoE layer on the SM90 kernel (wgmma + cp.async), rendered per spec; built for
// sm_90a only. Placeholders are those of sm80/gemm.cu:
//   ${dtype}    element type tag: bf16 | fp16 (jitmoe::dtype_<tag>)
//   ${act}      an Act enumerator (activation.cuh); GEMM2 is rendered with Identity
//   ${mode}     gemm1 (gather x, activation epilogue -> inter) | gemm2 (inter, bias * routing weight -> out_slots)
//   ${block_m}  rows of the sorted order per CTA (= the moe_align block size): 64 or 128
//   ${block_n}  output columns per CTA: a multiple of 32, <= 256 (gated GEMM1: <= 128)
//   ${block_k}  K slice per pipeline stage: 64 or 128
//   ${stages}   depth of the cp.async ring: >= 3, shared memory <= 227 KiB
// This spec: ${dtype} ${act} ${mode} ${block_m}x${block_n}x${block_k}, ${stages} stages.
#include "moe/sm90/moe_gemm_sm90.cuh"

namespace jitmoe::moe {

void moe_gemm_launch(const MoeGemmArgs& args, cudaStream_t stream) {
  sm90::launch<jitmoe::dtype_${dtype}, Act::${act}, sm90::GemmMode::${mode}, ${block_m}, ${block_n}, ${block_k},
               ${stages}>(args, stream);
}

}  // namespace jitmoe::moe
