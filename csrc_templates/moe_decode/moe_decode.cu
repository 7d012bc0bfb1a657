// Launcher of the decode path (moe_decode.cuh), rendered per spec:
//   ${dtype}  element type tag: bf16 | fp16
//   ${act}    an Act enumerator of moe/activation.cuh (GEMM1's activation)
// Two launches on the caller's stream, never a synchronisation.
#include "common/launch.cuh"
#include "moe_decode/moe_decode.cuh"

namespace jitmoe::moe_decode {

void launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  using T = jitmoe::dtype_${dtype};
  constexpr Act kAct = Act::${act};
  if (a.num_tokens <= 0) return;
  const int smem1 = a.hidden * static_cast<int>(sizeof(T));                  // x[t]
  const int smem2 = a.topk * a.inter_size * static_cast<int>(sizeof(T));     // the token's k inter rows
  // The opt-in is set once per kernel and device, so it must be the largest size any call stages, not this call's
  // (a first small call would cap every later one). A device with less makes the launch fail; the binding reports it.
  set_max_dynamic_smem_once<&decode_gemm1_kernel<T, kAct>>(kMaxStagedBytes);
  set_max_dynamic_smem_once<&decode_gemm2_kernel<T>>(kMaxStagedBytes);
  const dim3 grid1((a.inter_size + kColsPerBlock - 1) / kColsPerBlock, a.num_tokens * a.topk);
  decode_gemm1_kernel<T, kAct><<<grid1, kThreads, smem1, stream>>>(a);
  const dim3 grid2((a.hidden + kColsPerBlock - 1) / kColsPerBlock, a.num_tokens);
  decode_gemm2_kernel<T><<<grid2, kThreads, smem2, stream>>>(a);
}

}  // namespace jitmoe::moe_decode
