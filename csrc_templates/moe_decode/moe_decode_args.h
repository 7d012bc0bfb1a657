// The decode path's arguments and launcher (moe_decode.cuh has the kernels): plain C++ so the torch binding, built
// by the host compiler, can include it.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace jitmoe::moe_decode {

struct DecodeArgs {
  const void* x;              // [T, H]
  const void* fc1;            // [E, n1, H]: gated n1 = 2I (up rows, then gate rows), else n1 = I
  const void* fc1_bias;       // [E, n1] or nullptr
  void* inter;                // [T * k, I]
  const void* fc2;            // [E, H, I]
  const void* fc2_bias;       // [E, H] or nullptr
  void* out;                  // [T, H]
  const int32_t* topk_ids;    // [T * k] global expert ids
  const float* slot_weights;  // [T * k]
  const float* act_alpha;     // [E] or nullptr (activation parameters, see moe/activation.cuh)
  const float* act_beta;
  const float* act_limit;
  int num_tokens, topk, hidden, inter_size, num_experts, expert_offset;
};

// Both launches on `stream` (moe_decode.cu, rendered per dtype and activation); never synchronises.
void launch_decode(const DecodeArgs& a, cudaStream_t stream);

}  // namespace jitmoe::moe_decode
