// The decode path's arguments and launcher (moe_decode.cuh has the kernels): plain C++ so the torch binding, built
// by the host compiler, can include it.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace jitmoe::moe_decode {

struct DecodeArgs {
  const void* x;              // [T, H]                                   (operand type)
  const void* fc1;            // [E, n1, H]: gated n1 = 2I (up rows, then gate rows), else n1 = I   (weight)
  const void* fc1_bias;       // [E, n1] or nullptr                       (output type)
  void* inter;                // [T * k, I]                               (operand)
  const void* fc2;            // [E, H, I]                                (weight)
  const void* fc2_bias;       // [E, H] or nullptr                        (output type)
  void* out;                  // [T, H]                                   (output type)
  const int32_t* topk_ids;    // [T * k] global expert ids
  const float* slot_weights;  // [T * k]
  const float* act_alpha;     // [E] or nullptr (activation parameters, see moe/activation.cuh)
  const float* act_beta;
  const float* act_limit;
  int num_tokens, topk, hidden, inter_size, num_experts, expert_offset;
};

// The quantization scales, all nullptr for 16-bit weights. A kernel parameter of their own: DecodeArgs grown past
// 128 bytes made ptxas spill in the 64-register GEMM2.
struct DecodeScales {
  // FP8 per-tensor (x, fc1, inter and fc2 in e4m3)
  const float* fc1_dequant;   // [E] GEMM1's dot scale
  const float* fc2_quant;     // [1] or [E] (fc2_quant_stride 0 or 1): inter = e4m3(act(...) * fc2_quant)
  const float* fc2_dequant;   // [E] GEMM2's dot scale
  int fc2_quant_stride;
  // INT8 weight-only (int8 fc1 and fc2): per-output-channel scales, fp32 when wscale_fp32, else the output type
  int wscale_fp32;
  const void* fc1_wscale;     // [E, n1]
  const void* fc2_wscale;     // [E, H]
};

// Both launches on `stream` (moe_decode.cu, rendered per dtype, operand, weight and activation); never synchronises.
void launch_decode(const DecodeArgs& a, const DecodeScales& f, cudaStream_t stream);

}  // namespace jitmoe::moe_decode
