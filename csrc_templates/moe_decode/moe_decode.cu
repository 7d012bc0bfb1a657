// Launcher of the decode path (moe_decode.cuh), rendered per spec:
//   ${dtype}    output (and bias) type tag: bf16 | fp16
//   ${operand}  x / inter type tag: the same as dtype, or e4m3 (FP8 per-tensor, sm_89+)
//   ${weight}   the weights' type tag: the same as operand, or s8 (INT8 weight-only, 16-bit operand)
//   ${act}      an Act enumerator of moe/activation.cuh (GEMM1's activation)
// Two launches on the caller's stream (PDL: the second one's launch overlaps the first), never a synchronisation.
#include "moe_decode/moe_decode.cuh"

namespace jitmoe::moe_decode {

void launch_decode(const DecodeArgs& a, const DecodeScales& f, cudaStream_t stream) {
  using T = jitmoe::dtype_${dtype};
  using Op = jitmoe::dtype_${operand};
  using W = jitmoe::dtype_${weight};
  constexpr Act kAct = Act::${act};
  if (a.num_tokens <= 0) return;
  const dim3 grid1((a.inter_size + kColsPerBlock - 1) / kColsPerBlock, a.num_tokens * a.topk);
  launch_pdl(decode_gemm1_kernel<T, Op, W, kAct>, {grid1, kThreads}, stream, a, f);
  const int cols2 = gemm2_cols_per_block(a.topk);
  const dim3 grid2((a.hidden + cols2 - 1) / cols2, a.num_tokens);
  launch_pdl(decode_gemm2_kernel<T, Op, W>, {grid2, kThreads2}, stream, a, f);
}

}  // namespace jitmoe::moe_decode
