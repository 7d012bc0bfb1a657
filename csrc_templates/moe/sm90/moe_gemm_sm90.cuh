// MoE grouped GEMM for Hopper (sm_90a): wgmma tensor cores fed by a multi-stage cp.async pipeline.
//
// One CTA computes a BLOCK_M x BLOCK_N output tile of one M block of the expert-sorted, tile-padded row order
// (moe_gemm_args.cuh). Its rows all belong to expert e = block_expert[m_block]; CTAs whose block is past
// num_padded or unused (e = -1) exit at once. BLOCK_M / 64 consumer warpgroups each own 64 rows of the tile and
// issue SS wgmma (both operands K-major in 128-byte-swizzled shared memory, fp32 accumulators). A rows are
// gathered (GEMM1: x[sorted_ids[p] / topk]; GEMM2: inter[p]) so TMA cannot fetch them; every thread therefore
// issues 16-byte cp.async copies (zero-filled for padding rows, N and K tails) for A and for the expert's weight
// rows B. The pipeline keeps STAGES - 2 tiles in flight and one wgmma batch running while the next tile is issued:
// at k-tile kt a thread waits for its copies of tile kt, fences them into the async proxy, and a CTA barrier
// makes them visible and proves that every warpgroup has retired wgmma kt-2, whose stage is refilled with tile
// kt + STAGES - 2. A gated GEMM1 keeps two accumulators with identical layouts, one fed by the up rows
// [n0, n0+BN) of fc1[e] and one by the gate rows [N+n0, ...), so element i of both holds the same (row, column).
// The epilogue applies bias + activation (GEMM1) or bias * routing weight (GEMM2) in fp32, stages the tile in
// shared memory and writes 16-byte row chunks: GEMM1 to inter[p], GEMM2 scattered to out_slots[s]; padding rows
// are never written.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "common/dtypes.cuh"
#include "common/launch.cuh"
#include "common/pdl.cuh"
#include "moe/activation.cuh"
#include "moe/sm90_gemm_traits.cuh"
#include "moe/moe_gemm_args.cuh"
#include "moe/split_k.cuh"

namespace jitmoe::moe::sm90 {

using moe::GemmMode;

// Everything a specialization fixes at compile time, and the invariants the kernel relies on.
template <typename T, Act A, GemmMode Mode, int BM, int BN, int BK, int Stages>
struct Config : Sm90GemmTraits<T, A, Mode, BM, BN, BK, Stages, BM / 64> {
  using Traits = Sm90GemmTraits<T, A, Mode, BM, BN, BK, Stages, BM / 64>;
  static constexpr int kBlockM = BM, kBlockN = BN, kBlockK = BK, kStages = Stages;

  static constexpr int kWarpGroups = Traits::kMmaWarpGroups;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kChunksK = BK / 8;                     // 16-byte chunks per tile row
  static constexpr int kRowsPerPass = kThreads / kChunksK;    // tile rows one cp.async pass covers
  static constexpr int kPassesA = BM / kRowsPerPass;
  static constexpr int kPassesB = BN / kRowsPerPass;

  static_assert(BM == 64 || BM == 128, "BLOCK_M must be 64 or 128 (one or two consumer warpgroups)");
  static_assert(BK == 64 || BK == 128, "BLOCK_K must be 64 or 128 (whole 128-byte swizzle atoms)");
  static_assert(BN % 32 == 0 && BN >= 32, "BLOCK_N must be a multiple of 32");
  static_assert(BN % kRowsPerPass == 0 && BM % kRowsPerPass == 0, "cp.async passes must tile the block");
  static_assert(Stages >= 3, "the pipeline keeps one wgmma batch and at least one copy in flight");

  // Shared memory: [A stages | B stages x halves] reused by the epilogue's staging tile, then per-row metadata.
  static constexpr int kStageLd = BN + 8;                     // staging row pitch (elements): conflict-free
  static constexpr int kBytesStaging = BM * kStageLd * 2;
  static constexpr int kBytesMain = Traits::kBytesPipe > kBytesStaging ? Traits::kBytesPipe : kBytesStaging;
  static constexpr int kSwizzleAlign = 1024;                  // the 128-byte swizzle repeats every 1 KiB
  static constexpr int kSmemBytes = kSwizzleAlign + kBytesMain + BM * 3 * 4;
  static_assert(Traits::kElemsA * 2 % kSwizzleAlign == 0 && Traits::kElemsB * 2 % kSwizzleAlign == 0,
                "stage buffers stay aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA may use: fewer stages");
};

// Per-row metadata of the CTA's M block (shared memory), computed once from sorted_ids.
template <int BM>
struct RowInfo {
  int32_t a_row[BM];    // row of A to gather (GEMM1: token, GEMM2: sorted position), -1: padding
  int32_t out_row[BM];  // row of the output (GEMM1: sorted position, GEMM2: slot), -1: never written
  float scale[BM];      // GEMM2 routing weight of the row's slot
};

template <class Cfg>
__device__ __forceinline__ void load_row_info(const MoeGemmArgs& args, RowInfo<Cfg::kBlockM>& rows, int m0,
                                              int num_padded) {
  for (int r = threadIdx.x; r < Cfg::kBlockM; r += Cfg::kThreads) {
    const int p = m0 + r;
    const int s = (p < num_padded && p < args.m_pad_max) ? args.sorted_ids[p] : -1;
    const bool real = s >= 0 && s < args.num_slots;
    if constexpr (Cfg::kGemm2) {
      rows.a_row[r] = real ? p : -1;
      rows.out_row[r] = real ? s : -1;
      rows.scale[r] = real && args.slot_weights != nullptr ? args.slot_weights[s] : 1.f;
    } else {
      rows.a_row[r] = real ? s / args.topk : -1;
      rows.out_row[r] = real ? p : -1;
      rows.scale[r] = 1.f;
    }
  }
}

// The gmem -> smem side of the pipeline. Thread t always copies 16-byte chunk (t % kChunksK) of rows
// t / kChunksK + i * kRowsPerPass of the tile; gathered A row addresses are resolved once.
template <class Cfg>
struct TileLoader {
  using Elem = typename Cfg::Elem;
  const Elem* a_row_src[Cfg::kPassesA];  // start of the gathered A row of each pass, nullptr: zero-fill
  const Elem* b_src[Cfg::kHalves];       // [BN, K] rows n0.. of the up (and gate) half of b[e]
  const Elem* fallback;                  // any valid address for zero-filling copies (never read)
  int b_rows;                            // rows of each B half that exist: N - n0
  int k;                                 // reduction length
  int chunk;                             // this thread's 16-byte chunk within a tile row
  int row;                               // this thread's first row within the tile

  __device__ __forceinline__ TileLoader(const MoeGemmArgs& args, const RowInfo<Cfg::kBlockM>& rows, int e, int n0) {
    const Elem* a = static_cast<const Elem*>(args.a);
    const Elem* b = static_cast<const Elem*>(args.b);
    k = args.k;
    chunk = threadIdx.x % Cfg::kChunksK;
    row = threadIdx.x / Cfg::kChunksK;
    fallback = a;
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kPassesA; ++i) {
      const int src = rows.a_row[row + i * Cfg::kRowsPerPass];
      a_row_src[i] = src >= 0 ? a + static_cast<int64_t>(src) * k : nullptr;
    }
    const int64_t n_b = static_cast<int64_t>(args.n) * Cfg::kHalves;
    CUTE_UNROLL
    for (int h = 0; h < Cfg::kHalves; ++h) {
      b_src[h] = b + (static_cast<int64_t>(e) * n_b + static_cast<int64_t>(h) * args.n + n0) * k;
    }
    b_rows = args.n - n0;
  }

  template <class TensorA, class TensorB>
  __device__ __forceinline__ void load(int k_tile, int stage, TensorA& sA, TensorB& sB0, TensorB& sB1) const {
    const int col = chunk * 8;
    const int k_col = k_tile * Cfg::kBlockK + col;
    const bool k_in = k_col < k;  // K % 8 == 0: a chunk is wholly inside or outside
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kPassesA; ++i) {
      const bool pred = k_in && a_row_src[i] != nullptr;
      copy16(pred ? a_row_src[i] + k_col : fallback, &sA(row + i * Cfg::kRowsPerPass, col, stage), pred);
    }
    CUTE_UNROLL
    for (int h = 0; h < Cfg::kHalves; ++h) {
      CUTE_UNROLL
      for (int i = 0; i < Cfg::kPassesB; ++i) {
        const int r = row + i * Cfg::kRowsPerPass;
        const bool pred = k_in && r < b_rows;
        Elem* dst = h == 0 ? &sB0(r, col, stage) : &sB1(r, col, stage);
        copy16(pred ? b_src[h] + static_cast<int64_t>(r) * k + k_col : fallback, dst, pred);
      }
    }
  }

  __device__ __forceinline__ static void copy16(const Elem* src, Elem* dst, bool pred) {
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst), pred);
  }
};

// Issues one k-tile's wgmma batch (up and, when gated, gate) on one pipeline stage.
template <class Cfg, class FragA, class FragB, class Acc>
__device__ __forceinline__ void mma_tile(typename Cfg::TiledMma& mma, int stage, FragA& tCrA, FragB& tCrB0,
                                         FragB& tCrB1, Acc& acc_up, Acc& acc_gate) {
  using namespace cute;
  warpgroup_fence_operand(acc_up);
  if constexpr (Cfg::kGated) warpgroup_fence_operand(acc_gate);
  warpgroup_arrive();
  gemm(mma, tCrA(_, _, _, stage), tCrB0(_, _, _, stage), acc_up);
  if constexpr (Cfg::kGated) gemm(mma, tCrA(_, _, _, stage), tCrB1(_, _, _, stage), acc_gate);
  warpgroup_commit_batch();
}

// The main loop: accumulates A[BM, K] x B[BN, K]^T over the k tiles [kr.begin, kr.end) of this tile into acc_up
// (and acc_gate).
template <class Cfg, class Acc>
__device__ __forceinline__ void mainloop(const TileLoader<Cfg>& loader, KTileRange kr, typename Cfg::Elem* smem_a,
                                         typename Cfg::Elem* smem_b, Acc& acc_up, Acc& acc_gate) {
  using namespace cute;
  constexpr int S = Cfg::kStages;
  using LayoutA = typename Cfg::SmemLayoutA;
  using LayoutB = typename Cfg::SmemLayoutB;
  Tensor sA = make_tensor(make_smem_ptr(smem_a), LayoutA{});                                   // (BM,BK,S)
  Tensor sB0 = make_tensor(make_smem_ptr(smem_b), LayoutB{});                                  // (BN,BK,S) up
  Tensor sB1 = make_tensor(make_smem_ptr(smem_b + (Cfg::kHalves - 1) * Cfg::kElemsB), LayoutB{});  // gate

  typename Cfg::TiledMma mma;
  const int warp_group = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 128, 0);
  auto wg_mma = mma.get_slice(warp_group * 128);
  Tensor tCrA = wg_mma.make_fragment_A(wg_mma.partition_A(sA));     // (MMA,MMA_M,MMA_K,S) smem descriptors
  Tensor tCrB0 = wg_mma.make_fragment_B(wg_mma.partition_B(sB0));   // (MMA,MMA_N,MMA_K,S)
  Tensor tCrB1 = wg_mma.make_fragment_B(wg_mma.partition_B(sB1));

  const int k_tiles = kr.end - kr.begin;  // tile kt of this loop is k tile kr.begin + kt
  CUTE_UNROLL
  for (int t = 0; t < S - 2; ++t) {  // one commit group per tile, empty past the end, so counts stay uniform
    if (t < k_tiles) loader.load(kr.begin + t, t, sA, sB0, sB1);
    cp_async_fence();
  }
  clear(acc_up);
  warpgroup_fence_operand(acc_up);
  if constexpr (Cfg::kGated) {
    clear(acc_gate);
    warpgroup_fence_operand(acc_gate);
  }

  CUTE_NO_UNROLL
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<S - 3>();                   // this thread's copies of tile kt have landed
    cutlass::arch::fence_view_async_shared(); // ... and are visible to wgmma (async proxy)
    __syncthreads();                          // everyone's copies of kt landed; every wgmma kt-2 retired
    const int next = kt + S - 2;
    if (next < k_tiles) loader.load(kr.begin + next, next % S, sA, sB0, sB1);  // refills the stage of tile kt-2
    cp_async_fence();
    mma_tile<Cfg>(mma, kt % S, tCrA, tCrB0, tCrB1, acc_up, acc_gate);
    warpgroup_wait<1>();                      // wgmma kt-1 retired: kt stays in flight across the barrier
    warpgroup_fence_operand(acc_up);
    if constexpr (Cfg::kGated) warpgroup_fence_operand(acc_gate);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_up);
  if constexpr (Cfg::kGated) warpgroup_fence_operand(acc_gate);
  cp_async_wait<0>();
}

// fp32 epilogue math of every accumulator element, written as T into the staging tile [BM, kStageLd].
template <class Cfg, class Acc>
__device__ __forceinline__ void epilogue_to_smem(const MoeGemmArgs& args, const Acc& acc_up, const Acc& acc_gate,
                                                 const RowInfo<Cfg::kBlockM>& rows, typename Cfg::Element* staging,
                                                 int e, int n0) {
  using namespace cute;
  using T = typename Cfg::Element;
  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCcC = thr_mma.partition_C(make_identity_tensor(Shape<Int<Cfg::kBlockM>, Int<Cfg::kBlockN>>{}));
  static_assert(decltype(size(tCcC))::value == decltype(size(acc_up))::value, "accumulator / coordinate mismatch");
  const T* bias = static_cast<const T*>(args.bias);
  const int64_t n_b = static_cast<int64_t>(args.n) * Cfg::kHalves;
  ActParams params;
  if constexpr (!Cfg::kGemm2) params = load_act_params<Cfg::kAct>(args, e);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_up); ++i) {
    const int m = get<0>(tCcC(i));
    const int n = get<1>(tCcC(i));
    const int col = n0 + n;
    const bool has_bias = bias != nullptr && col < args.n;
    float v = acc_up(i) + (has_bias ? to_float(bias[e * n_b + col]) : 0.f);
    if constexpr (Cfg::kGemm2) {
      v *= rows.scale[m];
    } else if constexpr (Cfg::kGated) {
      const float g = acc_gate(i) + (has_bias ? to_float(bias[e * n_b + args.n + col]) : 0.f);
      v = apply_act<Cfg::kAct>(v, g, params);
    } else {
      v = apply_act<Cfg::kAct>(v, 0.f, params);
    }
    staging[m * Cfg::kStageLd + n] = from_float<T>(v);
  }
}

// Split-K: slice z's raw fp32 sums of the real rows go to args.partials (layout in split_k.cuh).
template <class Cfg, class Acc>
__device__ __forceinline__ void store_partials(const MoeGemmArgs& args, const Acc& acc_up, const Acc& acc_gate,
                                               const RowInfo<Cfg::kBlockM>& rows, int m0, int n0, int z) {
  using namespace cute;
  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCcC = thr_mma.partition_C(make_identity_tensor(Shape<Int<Cfg::kBlockM>, Int<Cfg::kBlockN>>{}));
  const PartialsView pv = partials_view<Cfg::kGemm2, Cfg::kGated>(args);
  float* part = pv.base + z * pv.slice;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_up); ++i) {
    const int m = get<0>(tCcC(i));
    const int col = n0 + get<1>(tCcC(i));
    const int out_row = rows.out_row[m];  // GEMM1: p = m0 + m; GEMM2: the slot
    if (out_row < 0 || col >= args.n) continue;
    float* dst = part + (Cfg::kGemm2 ? out_row : m0 + m) * pv.ld + col;
    dst[0] = acc_up(i);
    if constexpr (Cfg::kGated) dst[args.n] = acc_gate(i);
  }
}

// Copies the staged tile to the output rows in 16-byte chunks; padding rows and columns >= N are skipped.
template <class Cfg>
__device__ __forceinline__ void store_tile(const MoeGemmArgs& args, const typename Cfg::Element* staging,
                                           const RowInfo<Cfg::kBlockM>& rows, int n0) {
  using T = typename Cfg::Element;
  constexpr int kChunksN = Cfg::kBlockN / 8;
  T* out = static_cast<T*>(args.out);  // GEMM1: [m_pad_max, N]; GEMM2: [num_slots, N]
  for (int c = threadIdx.x; c < Cfg::kBlockM * kChunksN; c += Cfg::kThreads) {
    const int r = c / kChunksN;
    const int col = (c % kChunksN) * 8;
    const int out_row = rows.out_row[r];
    if (out_row < 0 || n0 + col >= args.n) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(staging + r * Cfg::kStageLd + col);
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(out_row) * args.n + n0 + col) = v;
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) moe_gemm_sm90_kernel(const __grid_constant__ MoeGemmArgs args) {
  using namespace cute;
  using Elem = typename Cfg::Elem;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + Cfg::kSwizzleAlign - 1) & ~uintptr_t(Cfg::kSwizzleAlign - 1));
  Elem* smem_a = reinterpret_cast<Elem*>(smem);                     // [S][BM, BK] swizzled (SmemLayoutA)
  Elem* smem_b = reinterpret_cast<Elem*>(smem + Cfg::kElemsA * 2);  // [halves][S][BN, BK] swizzled (SmemLayoutB)
  auto* staging = reinterpret_cast<typename Cfg::Element*>(smem);   // [BM, kStageLd], aliases A/B after the loop
  auto& rows = *reinterpret_cast<RowInfo<Cfg::kBlockM>*>(smem + Cfg::kBytesMain);
  pdl_start();  // common/pdl.cuh: launched with launch_pdl

  const int m_block = blockIdx.x;
  const int m0 = m_block * Cfg::kBlockM;
  const int n0 = blockIdx.y * Cfg::kBlockN;
  const int num_padded = *args.num_padded;
  if (m0 >= num_padded) return;  // whole CTA: no barrier has been reached yet
  const int e = args.block_expert[m_block];
  if (e < 0 || e >= args.num_experts) return;

  load_row_info<Cfg>(args, rows, m0, num_padded);
  __syncthreads();

  auto acc_up = partition_fragment_C(typename Cfg::TiledMma{}, Shape<Int<Cfg::kBlockM>, Int<Cfg::kBlockN>>{});
  auto acc_gate = make_fragment_like(acc_up);
  const KTileRange kr = k_tile_range((args.k + Cfg::kBlockK - 1) / Cfg::kBlockK, args.k_splits, blockIdx.z);
  mainloop<Cfg>(TileLoader<Cfg>(args, rows, e, n0), kr, smem_a, smem_b, acc_up, acc_gate);
  if (args.k_splits > 1) {  // uniform: the reduce launch applies the epilogue
    store_partials<Cfg>(args, acc_up, acc_gate, rows, m0, n0, blockIdx.z);
    return;
  }

  __syncthreads();  // every warpgroup's wgmma has retired: the pipeline buffers become the staging tile
  epilogue_to_smem<Cfg>(args, acc_up, acc_gate, rows, staging, e, n0);
  __syncthreads();
  store_tile<Cfg>(args, staging, rows, n0);
}

// Host side: one CTA per (M block, N block, K slice); unused blocks exit on the device; with k_splits > 1 the
// split-K reduce follows on the same stream. Never synchronises.
template <typename T, Act A, GemmMode Mode, int BM, int BN, int BK, int Stages>
void launch(const MoeGemmArgs& args, cudaStream_t stream) {
  static_assert(Mode == GemmMode::gemm1 || A == Act::Identity, "GEMM2 is rendered with act=Identity");
  using Cfg = Config<T, A, Mode, BM, BN, BK, Stages>;
  const int m_blocks = args.m_pad_max / BM;
  const int n_blocks = (args.n + BN - 1) / BN;
  if (args.block_done != nullptr) {
    throw std::invalid_argument("moe_gemm sm90: block_done: expected None (per-block completion counters are the "
                                "sm90ws kernel's)");
  }
  if (m_blocks <= 0 || n_blocks <= 0 || args.num_slots <= 0) return;
  auto* kernel = &moe_gemm_sm90_kernel<Cfg>;
  // A failure here (tile too large for this GPU) makes the launch fail too; the binding reports it.
  set_max_dynamic_smem_once<&moe_gemm_sm90_kernel<Cfg>>(Cfg::kSmemBytes);
  launch_pdl(kernel, {dim3(m_blocks, n_blocks, args.k_splits), Cfg::kThreads, Cfg::kSmemBytes}, stream, args);
  launch_split_k_reduce<T, A, Mode == GemmMode::gemm2>(args, BM, stream);
}

}  // namespace jitmoe::moe::sm90
