// One grouped GEMM of the fused-MoE layer on the SM80 kernel (mma.sync + cp.async), rendered per spec.
// Placeholders (the SM90 templates use the same ones, but for ${weight}):
//   ${dtype}    element type tag: bf16 | fp16 (jitmoe::dtype_<tag>)
//   ${weight}   the weights' type tag: ${dtype}, or s8 (INT8 weight-only; this kernel only)
//   ${act}      an Act enumerator (activation.cuh); GEMM2 is rendered with Identity
//   ${mode}     gemm1 (gather x, activation epilogue -> inter) | gemm2 (inter, bias * routing weight -> out_slots)
//   ${block_m}  rows of the sorted order per CTA (= the moe_align block size)
//   ${block_n}  output columns per CTA (gated GEMM1 also loads the matching gate rows)
//   ${block_k}  K slice per pipeline stage
//   ${stages}   depth of the cp.async ring
// This spec: ${dtype} (weights ${weight}) ${act} ${mode} ${block_m}x${block_n}x${block_k}, ${stages} stages.
#include "moe/sm80/moe_gemm_sm80.cuh"

namespace jitmoe::moe {

void moe_gemm_launch(const MoeGemmArgs& args, cudaStream_t stream) {
  sm80::launch<jitmoe::dtype_${dtype}, jitmoe::dtype_${weight}, Act::${act}, sm80::GemmMode::${mode}, ${block_m},
               ${block_n}, ${block_k}, ${stages}>(args, stream);
}

}  // namespace jitmoe::moe
