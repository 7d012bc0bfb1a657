// Activations of the fused MoE layer, applied in fp32 inside GEMM1's epilogue.
// Names and formulas follow FlashInfer's ActivationType; gated ones combine the gate and up halves of fc1.
#pragma once
#include <cmath>

#include "moe/moe_gemm_args.cuh"

namespace jitmoe::moe {

enum class Act : int {
  Gelu, Relu, Silu, Swiglu, Geglu, SwigluBias, Relu2, SwigluStep, GegluTanh, Identity, Situ
};

template <Act A> struct ActTraits { static constexpr bool kGated = false; };
template <> struct ActTraits<Act::Swiglu> { static constexpr bool kGated = true; };
template <> struct ActTraits<Act::Geglu> { static constexpr bool kGated = true; };
template <> struct ActTraits<Act::SwigluBias> { static constexpr bool kGated = true; };
template <> struct ActTraits<Act::SwigluStep> { static constexpr bool kGated = true; };
template <> struct ActTraits<Act::GegluTanh> { static constexpr bool kGated = true; };
template <> struct ActTraits<Act::Situ> { static constexpr bool kGated = true; };

// Approximate reciprocal (MUFU rcp and one multiply): an IEEE division would add a Newton step and a slow-path test
// to every element of GEMM1's epilogue, for accuracy that the bf16/fp16 store drops. 1 / inf gives 0.
__device__ __forceinline__ float act_sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }
__device__ __forceinline__ float act_silu(float x) { return x * act_sigmoid(x); }
__device__ __forceinline__ float act_gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float act_gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// Per-expert parameters of the parametrised activations (defaults when the pointers are null).
struct ActParams {
  float alpha = 1.f;      // SwigluBias
  float beta = 0.f;       // SwigluBias
  float limit = INFINITY; // SwigluBias, SwigluStep (SwigluStep's default is 7)
};

// Activation parameters of expert e from per-expert arrays (ActParams defaults where a pointer is null).
template <Act A>
__device__ __forceinline__ ActParams load_act_params(const float* alpha, const float* beta, const float* limit,
                                                     int e) {
  ActParams p;
  if (alpha) p.alpha = alpha[e];
  if (beta) p.beta = beta[e];
  if (limit) p.limit = limit[e];
  else if constexpr (A == Act::SwigluStep) p.limit = 7.f;
  return p;
}

template <Act A>
__device__ __forceinline__ ActParams load_act_params(const MoeGemmArgs& args, int e) {
  return load_act_params<A>(args.act_alpha, args.act_beta, args.act_limit, e);
}

// Non-gated: act(x). `gate` is unused.
template <Act A>
__device__ __forceinline__ float apply_act(float up, float gate, const ActParams& p) {
  if constexpr (A == Act::Gelu) return act_gelu(up);
  else if constexpr (A == Act::Relu) return fmaxf(up, 0.f);
  else if constexpr (A == Act::Silu) return act_silu(up);
  else if constexpr (A == Act::Relu2) { float r = fmaxf(up, 0.f); return r * r; }
  else if constexpr (A == Act::Identity) return up;
  else if constexpr (A == Act::Swiglu) return act_silu(gate) * up;
  else if constexpr (A == Act::Geglu) return act_gelu(gate) * up;
  else if constexpr (A == Act::GegluTanh) return act_gelu_tanh(gate) * up;
  else if constexpr (A == Act::SwigluBias) {
    float g = fminf(gate, p.limit);
    float u = fminf(fmaxf(up, -p.limit), p.limit);
    return g * act_sigmoid(p.alpha * g) * (u + p.beta);
  } else if constexpr (A == Act::SwigluStep) {
    return fminf(act_silu(gate), p.limit) * fminf(fmaxf(up, -p.limit), p.limit);
  } else {  // Situ with FlashInfer's default betas (4, 25)
    return (4.f * tanhf(gate * 0.25f) * act_sigmoid(gate)) * (25.f * tanhf(up * 0.04f));
  }
}

}  // namespace jitmoe::moe
