// What both SM90 grouped-GEMM kernels (sm90, sm90ws) derive from a specialization: the CUTLASS element type of the
// wgmma operands, whether B has two halves (up and gate), the shared-memory ring of A and B tiles (K-major, 128-byte
// swizzle, one [rows, BK] tile per stage, which is also TMA's box layout) and the wgmma tiling (64 rows per
// warpgroup, fp32 accumulators). T is the layer's type (bf16/fp16: bias, output); the operands are T too, or FP8
// e4m3 (Operand, sm90ws only), which wgmma takes K-major on both sides, as here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <type_traits>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "moe/activation.cuh"
#include "moe/moe_gemm_args.cuh"

namespace jitmoe::moe {

// The CUTLASS type of a CUDA element type.
template <typename T>
using CutlassElem = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>, cutlass::bfloat16_t,
    std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::float_e4m3_t>>;

template <typename T, Act A, GemmMode Mode, int BM, int BN, int BK, int Stages, int MmaWarpGroups,
          typename Operand = T>
struct Sm90GemmTraits {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "SM90 MoE GEMM: bf16 or fp16 only");
  static_assert(std::is_same_v<Operand, T> || std::is_same_v<Operand, __nv_fp8_e4m3>,
                "SM90 MoE GEMM operands: the layer's type or FP8 e4m3");
  using Element = T;                                          // CUDA type (conversions, epilogue)
  using Elem = CutlassElem<Operand>;                          // the wgmma operands
  static constexpr int kOperandBytes = sizeof(Operand);
  static constexpr Act kAct = A;
  static constexpr bool kGemm2 = Mode == GemmMode::gemm2;
  static constexpr bool kGated = !kGemm2 && ActTraits<A>::kGated;
  static constexpr int kHalves = kGated ? 2 : 1;             // B halves: up (+ gate)
  static constexpr int kMmaWarpGroups = MmaWarpGroups;        // 64 rows of the tile each
  static_assert(BN * kHalves <= 256, "accumulators: BLOCK_N <= 256, gated BLOCK_N <= 128");

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Elem>;  // 8 rows x 128 bytes, 128-byte swizzle
  template <int Rows>
  using SmemLayout = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<Rows>, cute::Int<BK>, cute::Int<Stages>>{}));
  using SmemLayoutA = SmemLayout<BM>;  // (BM, BK, Stages): each stage one contiguous tile
  using SmemLayoutB = SmemLayout<BN>;  // (BN, BK, Stages), one per B half
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Elem, Elem, float, cute::Shape<cute::_64, cute::Int<BN>, cute::Int<BK>>>(),
      cute::Layout<cute::Shape<cute::Int<MmaWarpGroups>, cute::_1, cute::_1>>{}));
  static constexpr int kElemsA = cute::cosize_v<SmemLayoutA>;
  static constexpr int kElemsB = cute::cosize_v<SmemLayoutB>;
  static constexpr int kBytesPipe = (kElemsA + kHalves * kElemsB) * kOperandBytes;  // A stages, B stages x halves
};

}  // namespace jitmoe::moe
