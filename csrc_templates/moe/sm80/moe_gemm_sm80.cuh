// Grouped GEMM of the fused-MoE layer for SM80 and later: mma.sync m16n8k16 + ldmatrix + a multi-stage cp.async ring.
//
// Algorithm. One CTA per (M block of the expert-sorted order, N block of the output), rasterised in groups of
// kGroupM M blocks that sweep the N blocks together: the CTAs resident at one time share a few experts' weight
// slices and a few M blocks' A rows, so both are read from HBM about once and reused from L2. A CTA reads
// num_padded and its block's expert and exits at once when the block is unused. It looks up its BLOCK_M rows once:
// GEMM1 gathers x rows (token = slot / topk), GEMM2 reads inter rows in place; padding rows are zero-filled by
// cp.async with src-size 0, so no address outside the tensors is ever read. The mainloop streams
// BLOCK_K-wide slices of A (BLOCK_M rows) and B (BLOCK_N rows of the expert's weight; for gated activations BLOCK_N up
// rows followed by the BLOCK_N gate rows of the same columns) through a STAGES-deep ring of shared-memory tiles whose
// rows are padded by 16 bytes, so the eight rows one ldmatrix phase reads land in distinct banks. Each warp owns a
// WARP_M x WARP_N patch of the output (of both halves when gated, so up and gate of one element meet in one thread)
// and accumulates it in fp32 with mma.sync. K and N tails are predicated per 16-byte chunk (K, N multiples of 8).
// The epilogue adds the bias, applies the activation (GEMM1) or the slot's routing weight (GEMM2) in fp32, stages the
// tile in shared memory and writes 16-byte coalesced chunks: GEMM1 to inter[p], GEMM2 to out_slots[slot], real rows
// only (GEMM1's padding rows are left unwritten: GEMM2 never reads them).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

#include "common/dtypes.cuh"
#include "common/launch.cuh"
#include "moe/activation.cuh"
#include "moe/moe_gemm_args.cuh"
#include "moe/split_k.cuh"

namespace jitmoe::moe::sm80 {

using moe::GemmMode;

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers. The ones touching shared memory are volatile with a memory clobber so the compiler neither merges
// them across k-iterations nor moves them across __syncthreads.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators.
template <typename Elem>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename Elem>
__device__ __forceinline__ void store_pair(Elem* dst, float lo, float hi) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
  } else {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Compile-time tile geometry. Warps: about 64 fp32 accumulators per thread, 4 to 8 warps, 2 warp rows once
// BLOCK_M >= 64. Shared memory per stage: [A: BLOCK_M rows | B: kRowsB rows] x (BLOCK_K + 8) elements.
constexpr int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <int kBlockM_, int kBlockN_, int kBlockK_, int kStages_, bool kGated_>
struct TileConfig {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = kBlockK_, kStages = kStages_;
  static constexpr bool kGated = kGated_;
  static constexpr int kHalves = kGated ? 2 : 1;          // accumulator sets: up (and gate)
  static constexpr int kRowsB = kBlockN * kHalves;        // weight rows per stage
  static constexpr int kWarps = clamp_int(kBlockM * kRowsB / (32 * 64), 4, 8);
  static constexpr int kWarpsM = kBlockM >= 64 ? 2 : 1;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpM = kBlockM / kWarpsM;        // output rows per warp
  static constexpr int kWarpN = kBlockN / kWarpsN;        // output columns per warp (per half)
  static constexpr int kMmaM = kWarpM / 16;               // m16 tiles per warp
  static constexpr int kMmaN = kWarpN / 8;                // n8 tiles per warp (per half)
  static constexpr int kChunksK = kBlockK / 8;            // 16-byte chunks per smem row
  static constexpr int kLdsAB = kBlockK + 8;              // smem row stride of A and B tiles (elements)
  static constexpr int kLdsC = kBlockN + 8;               // smem row stride of the epilogue tile (elements)
  static constexpr int kStageElems = (kBlockM + kRowsB) * kLdsAB;
  static constexpr int kSmemBytes = 2 * max_int(kStages * kStageElems, kBlockM * kLdsC);

  static_assert(kBlockM % 16 == 0 && kBlockM >= 16 && kBlockM <= 128, "BLOCK_M: a multiple of 16 in [16, 128]");
  static_assert(kBlockK % 16 == 0 && kBlockK >= 16 && kBlockK <= 128, "BLOCK_K: a multiple of 16 in [16, 128]");
  static_assert(kStages >= 2, "the cp.async ring needs at least 2 stages");
  static_assert(kWarpM % 16 == 0, "each warp needs whole m16 tiles");
  static_assert(kWarpN % 16 == 0, "each warp needs pairs of n8 tiles (one ldmatrix.x4 loads two)");
  static_assert(kThreads % kChunksK == 0, "a thread keeps one chunk column of the K slice");
  static_assert(kHalves * kMmaM * kMmaN * 4 <= 128, "too many accumulators per thread: shrink the tile");
};

// ---------------------------------------------------------------------------------------------------------------
// One thread's share of the cp.async traffic for a tile of kRows rows: the same chunk column (kc) of rows
// row0, row0 + kRowsPerPass, ... in every k-slice. Rows resolved once, before the mainloop.
template <class Cfg, typename Elem, int kRows>
struct RowLoader {
  static constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunksK;
  static constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;

  const Elem* base;          // the tensor's first element: the (never read) source of zero-filled chunks
  const Elem* src[kPasses];  // global address of this thread's chunk at k = 0 (base when !ok)
  bool ok[kPasses];          // the row exists (real token / in-range weight row)
  int row0;                  // first tile row of this thread
  int kc;                    // element offset of this thread's chunk inside the BLOCK_K slice

  __device__ __forceinline__ int row(int pass) const { return row0 + pass * kRowsPerPass; }
  __device__ __forceinline__ bool in_tile(int pass) const {
    return kRows % kRowsPerPass == 0 || row(pass) < kRows;
  }

  // Copy the slice [k0, k0 + BLOCK_K) of every row into the tile at smem address `tile` (row stride kLdsAB).
  __device__ __forceinline__ void load(uint32_t tile, int k0, int k) const {
    const bool k_ok = k0 + kc < k;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      if (!in_tile(p)) continue;
      const bool valid = ok[p] && k_ok;
      const uint32_t dst = tile + static_cast<uint32_t>((row(p) * Cfg::kLdsAB + kc) * sizeof(Elem));
      cp_async_16(dst, valid ? src[p] + k0 : base, valid);
    }
  }
};

// A rows: GEMM1 gathers x[token], GEMM2 reads inter[m0 + r]; row_src < 0 marks a padding row (zero-filled).
template <class Cfg, typename Elem, GemmMode kMode>
__device__ __forceinline__ RowLoader<Cfg, Elem, Cfg::kBlockM> make_a_loader(const MoeGemmArgs& args,
                                                                           const int* row_src, int m0) {
  RowLoader<Cfg, Elem, Cfg::kBlockM> ld;
  ld.row0 = threadIdx.x / Cfg::kChunksK;
  ld.kc = (threadIdx.x % Cfg::kChunksK) * 8;
  const Elem* a = static_cast<const Elem*>(args.a);  // GEMM1: x [T, K]; GEMM2: inter [m_pad_max, K]
  ld.base = a;
#pragma unroll
  for (int p = 0; p < ld.kPasses; ++p) {
    const int src_row = ld.in_tile(p) ? row_src[ld.row(p)] : -1;
    const int64_t a_row = kMode == GemmMode::gemm1 ? src_row : static_cast<int64_t>(m0) + ld.row(p);
    ld.ok[p] = src_row >= 0;
    ld.src[p] = ld.ok[p] ? a + a_row * args.k + ld.kc : a;
  }
  return ld;
}

// B rows of expert e: tile row j < BLOCK_N is weight row n0 + j (up); when gated, row BLOCK_N + j is N + n0 + j (gate).
template <class Cfg, typename Elem>
__device__ __forceinline__ RowLoader<Cfg, Elem, Cfg::kRowsB> make_b_loader(const MoeGemmArgs& args, int expert,
                                                                          int n0) {
  RowLoader<Cfg, Elem, Cfg::kRowsB> ld;
  ld.row0 = threadIdx.x / Cfg::kChunksK;
  ld.kc = (threadIdx.x % Cfg::kChunksK) * 8;
  const Elem* b = static_cast<const Elem*>(args.b);  // [E, n_b, K]
  ld.base = b;
  const int64_t rows_b = static_cast<int64_t>(args.n) * Cfg::kHalves;
#pragma unroll
  for (int p = 0; p < ld.kPasses; ++p) {
    const int half = ld.row(p) / Cfg::kBlockN;
    const int n = n0 + ld.row(p) % Cfg::kBlockN;
    ld.ok[p] = ld.in_tile(p) && n < args.n;
    const int64_t b_row = static_cast<int64_t>(expert) * rows_b + static_cast<int64_t>(half) * args.n + n;
    ld.src[p] = ld.ok[p] ? b + b_row * args.k + ld.kc : b;
  }
  return ld;
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core work on one resident stage. a_lane / b_lane: this lane's ldmatrix row addresses in the stage for
// k = 0 (A: row lane % 16 of the warp's rows, k half lane / 16; B: n row (lane / 16) * 8 + lane % 8, k half
// (lane / 8) % 2), so matrix i of each x4 load lands in fragment register i as mma.m16n8k16 expects.
template <class Cfg, typename Elem>
__device__ __forceinline__ void mma_stage(float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4], uint32_t a_lane,
                                          uint32_t b_lane) {
  constexpr uint32_t kRowBytes = Cfg::kLdsAB * sizeof(Elem);
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockK / 16; ++kk) {
    uint32_t a_frag[Cfg::kMmaM][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kMmaM; ++mi) ldmatrix_x4(a_frag[mi], a_lane + mi * 16 * kRowBytes + kk * 32);
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h) {
#pragma unroll
      for (int nj = 0; nj < Cfg::kMmaN / 2; ++nj) {
        uint32_t b_frag[4];  // n8 tile 2nj: {b0, b1} = {0, 1}; n8 tile 2nj + 1: {2, 3}
        ldmatrix_x4(b_frag, b_lane + (h * Cfg::kBlockN + nj * 16) * kRowBytes + kk * 32);
#pragma unroll
        for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
          mma_16816<Elem>(acc[h][mi][2 * nj], a_frag[mi], b_frag[0], b_frag[1]);
          mma_16816<Elem>(acc[h][mi][2 * nj + 1], a_frag[mi], b_frag[2], b_frag[3]);
        }
      }
    }
  }
}

// The multi-stage mainloop over the k tiles [kr.begin, kr.end): STAGES - 1 slices in flight while one is
// multiplied. Slice kt (counted from kr.begin) lives in stage kt % STAGES; the stage refilled at iteration kt was
// consumed at kt - 1, which every warp finished before the barrier.
template <class Cfg, typename Elem, class LoaderA, class LoaderB>
__device__ __forceinline__ void mainloop(float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4], const LoaderA& ld_a,
                                         const LoaderB& ld_b, uint32_t smem, int k, KTileRange kr, int warp_m,
                                         int warp_n, int lane) {
  constexpr uint32_t kStageBytes = Cfg::kStageElems * sizeof(Elem);
  constexpr uint32_t kOffsetB = Cfg::kBlockM * Cfg::kLdsAB * sizeof(Elem);
  const uint32_t a_lane =
      smem + ((warp_m * Cfg::kWarpM + lane % 16) * Cfg::kLdsAB + (lane / 16) * 8) * sizeof(Elem);
  const uint32_t b_lane = smem + kOffsetB +
      ((warp_n * Cfg::kWarpN + (lane / 16) * 8 + lane % 8) * Cfg::kLdsAB + ((lane / 8) % 2) * 8) * sizeof(Elem);
  const int k_tiles = kr.end - kr.begin;
  const int k_first = kr.begin * Cfg::kBlockK;

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) {
      ld_a.load(smem + s * kStageBytes, k_first + s * Cfg::kBlockK, k);
      ld_b.load(smem + s * kStageBytes + kOffsetB, k_first + s * Cfg::kBlockK, k);
    }
    cp_async_commit();
  }
  int read_stage = 0, write_stage = Cfg::kStages - 1;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) {
      ld_a.load(smem + write_stage * kStageBytes, k_first + next * Cfg::kBlockK, k);
      ld_b.load(smem + write_stage * kStageBytes + kOffsetB, k_first + next * Cfg::kBlockK, k);
    }
    cp_async_commit();  // possibly empty: keeps the group count in step with kt
    mma_stage<Cfg, Elem>(acc, a_lane + read_stage * kStageBytes, b_lane + read_stage * kStageBytes);
    read_stage = read_stage + 1 == Cfg::kStages ? 0 : read_stage + 1;
    write_stage = write_stage + 1 == Cfg::kStages ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the epilogue reuses it
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue, part 1: fp32 math on the accumulators, bf16/fp16 into the smem tile [BLOCK_M][kLdsC].
// Accumulator element (mi, ni, 2 * hr + j) is tile row warp_m * WARP_M + mi * 16 + lane / 4 + 8 * hr and tile column
// warp_n * WARP_N + ni * 8 + 2 * (lane % 4) + j; the gate of an up element sits at the same index of half 1.
template <class Cfg, typename Elem, Act kAct, GemmMode kMode>
__device__ __forceinline__ void epilogue_math(const float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4],
                                              const MoeGemmArgs& args, const int* row_src, Elem* tile, int expert,
                                              int n0, int warp_m, int warp_n, int lane) {
  const Elem* bias = static_cast<const Elem*>(args.bias);  // [E, n_b] or nullptr
  const Elem* bias_e = bias ? bias + static_cast<int64_t>(expert) * args.n * Cfg::kHalves : nullptr;
  const ActParams prm = load_act_params<kAct>(args, expert);

  float row_scale[Cfg::kMmaM][2];  // GEMM2: the routing weight of each of this thread's rows
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row_scale[mi][hr] = 1.f;
      if constexpr (kMode == GemmMode::gemm2) {
        const int slot = row_src[warp_m * Cfg::kWarpM + mi * 16 + lane / 4 + 8 * hr];
        if (args.slot_weights && slot >= 0) row_scale[mi][hr] = args.slot_weights[slot];
      }
    }
  }
#pragma unroll
  for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
    const int c = warp_n * Cfg::kWarpN + ni * 8 + 2 * (lane % 4);
    const int n = n0 + c;  // n < N implies n + 1 < N (N is a multiple of 8, n is even)
    float bias_up[2] = {0.f, 0.f}, bias_gate[2] = {0.f, 0.f};
    if (bias_e && n < args.n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        bias_up[j] = to_float(bias_e[n + j]);
        if constexpr (Cfg::kGated) bias_gate[j] = to_float(bias_e[args.n + n + j]);
      }
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = warp_m * Cfg::kWarpM + mi * 16 + lane / 4 + 8 * hr;
        float v[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float up = acc[0][mi][ni][2 * hr + j] + bias_up[j];
          if constexpr (kMode == GemmMode::gemm2) {
            v[j] = up * row_scale[mi][hr];
          } else {
            const float gate = Cfg::kGated ? acc[Cfg::kHalves - 1][mi][ni][2 * hr + j] + bias_gate[j] : 0.f;
            v[j] = apply_act<kAct>(up, gate, prm);
          }
        }
        store_pair(tile + r * Cfg::kLdsC + c, v[0], v[1]);
      }
    }
  }
}

// Split-K: slice z's raw fp32 sums of the real rows go to args.partials (layout in split_k.cuh). Same accumulator
// coordinates as epilogue_math.
template <class Cfg, GemmMode kMode>
__device__ __forceinline__ void store_partials(const float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4],
                                               const MoeGemmArgs& args, const int* row_src, int m0, int n0, int z,
                                               int warp_m, int warp_n, int lane) {
  constexpr bool kGemm2 = kMode == GemmMode::gemm2;
  const PartialsView pv = partials_view<kGemm2, Cfg::kGated>(args);
  float* part = pv.base + z * pv.slice;
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = warp_m * Cfg::kWarpM + mi * 16 + lane / 4 + 8 * hr;
      const int src = row_src[r];  // GEMM2: the slot
      if (src < 0) continue;
      float* row = part + (kGemm2 ? src : m0 + r) * pv.ld;
#pragma unroll
      for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
        const int n = n0 + warp_n * Cfg::kWarpN + ni * 8 + 2 * (lane % 4);
        if (n >= args.n) continue;  // n < N implies n + 1 < N
#pragma unroll
        for (int h = 0; h < Cfg::kHalves; ++h) {
          *reinterpret_cast<float2*>(row + h * args.n + n) =
              make_float2(acc[h][mi][ni][2 * hr], acc[h][mi][ni][2 * hr + 1]);
        }
      }
    }
  }
}

// Epilogue, part 2: 16-byte chunks from the smem tile to global rows (coalesced along N). Real rows only.
template <class Cfg, typename Elem, GemmMode kMode>
__device__ __forceinline__ void epilogue_store(const MoeGemmArgs& args, const int* row_src, const Elem* tile, int m0,
                                               int n0) {
  constexpr int kChunksN = Cfg::kBlockN / 8;
  Elem* out = static_cast<Elem*>(args.out);  // GEMM1: inter [m_pad_max, N]; GEMM2: out_slots [num_slots, N]
  for (int idx = threadIdx.x; idx < Cfg::kBlockM * kChunksN; idx += Cfg::kThreads) {
    const int r = idx / kChunksN;
    const int n = n0 + (idx % kChunksN) * 8;
    const int src = row_src[r];
    if (src < 0 || n >= args.n) continue;
    const int64_t dst_row = kMode == GemmMode::gemm1 ? static_cast<int64_t>(m0) + r : src;
    *reinterpret_cast<uint4*>(out + dst_row * args.n + n) =
        *reinterpret_cast<const uint4*>(tile + r * Cfg::kLdsC + (idx % kChunksN) * 8);
  }
}

// ---------------------------------------------------------------------------------------------------------------
constexpr int kGroupM = 8;  // M blocks per rasterisation group

// Linear CTA id -> (M block, N block): bid walks the N blocks of a group of kGroupM M blocks (the last group may
// be shorter), M fastest. A bijection onto [0, m_blocks) x [0, n_blocks).
__device__ __forceinline__ void tile_coords(int bid, int m_blocks, int n_blocks, int& m_block, int& n_block) {
  const int per_group = kGroupM * n_blocks;
  const int first_m = (bid / per_group) * kGroupM;
  const int rows = min(m_blocks - first_m, kGroupM);
  const int in_group = bid % per_group;
  m_block = first_m + in_group % rows;
  n_block = in_group / rows;
}

template <typename Elem, Act kAct, GemmMode kMode, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) moe_gemm_kernel(const __grid_constant__ MoeGemmArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];  // the cp.async ring, then the epilogue tile
  __shared__ int row_src[Cfg::kBlockM];  // GEMM1: x row (token); GEMM2: slot; -1: padding row

  int m_block, n_block;
  tile_coords(blockIdx.x, args.m_pad_max / Cfg::kBlockM, (args.n + Cfg::kBlockN - 1) / Cfg::kBlockN, m_block,
              n_block);
  const int m0 = m_block * Cfg::kBlockM;
  const int n0 = n_block * Cfg::kBlockN;
  if (m0 >= *args.num_padded) return;  // uniform per CTA: no barrier has been reached yet
  const int expert = args.block_expert[m_block];
  if (expert < 0 || expert >= args.num_experts) return;

  for (int r = threadIdx.x; r < Cfg::kBlockM; r += Cfg::kThreads) {
    const int slot = args.sorted_ids[m0 + r];
    const bool real = slot >= 0 && slot < args.num_slots;
    row_src[r] = !real ? -1 : (kMode == GemmMode::gemm1 ? slot / args.topk : slot);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  float acc[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4] = {};
  {
    const auto ld_a = make_a_loader<Cfg, Elem, kMode>(args, row_src, m0);
    const auto ld_b = make_b_loader<Cfg, Elem>(args, expert, n0);
    const KTileRange kr = k_tile_range((args.k + Cfg::kBlockK - 1) / Cfg::kBlockK, args.k_splits, blockIdx.y);
    mainloop<Cfg, Elem>(acc, ld_a, ld_b, smem_u32(smem), args.k, kr, warp_m, warp_n, lane);
  }
  if (args.k_splits > 1) {  // uniform: the reduce launch applies the epilogue
    store_partials<Cfg, kMode>(acc, args, row_src, m0, n0, blockIdx.y, warp_m, warp_n, lane);
    return;
  }
  Elem* tile = reinterpret_cast<Elem*>(smem);
  epilogue_math<Cfg, Elem, kAct, kMode>(acc, args, row_src, tile, expert, n0, warp_m, warp_n, lane);
  __syncthreads();
  epilogue_store<Cfg, Elem, kMode>(args, row_src, tile, m0, n0);
}

// Host side: one launch over all M blocks x N blocks (the caller keeps their product below 2^31) x K slices; unused
// blocks exit on the device (no host sync); with k_splits > 1 the split-K reduce follows on the same stream.
template <typename Elem, Act kAct, GemmMode kMode, int kBlockM, int kBlockN, int kBlockK, int kStages>
void launch(const MoeGemmArgs& args, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __nv_bfloat16> || std::is_same_v<Elem, __half>, "bf16 or fp16 only");
  static_assert(kMode == GemmMode::gemm1 || kAct == Act::Identity, "GEMM2 is rendered with act=Identity");
  using Cfg = TileConfig<kBlockM, kBlockN, kBlockK, kStages, kMode == GemmMode::gemm1 && ActTraits<kAct>::kGated>;
  const int m_blocks = args.m_pad_max / kBlockM;
  const int n_blocks = (args.n + kBlockN - 1) / kBlockN;
  if (m_blocks <= 0 || n_blocks <= 0 || args.num_slots <= 0) return;
  auto* kernel = &moe_gemm_kernel<Elem, kAct, kMode, Cfg>;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    // A failure here (tile too large for this GPU) makes the launch fail too; the binding reports it.
    set_max_dynamic_smem_once<&moe_gemm_kernel<Elem, kAct, kMode, Cfg>>(Cfg::kSmemBytes);
  }
  kernel<<<dim3(m_blocks * n_blocks, args.k_splits), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  launch_split_k_reduce<Elem, kAct, kMode == GemmMode::gemm2>(args, kBlockM, stream);
}

}  // namespace jitmoe::moe::sm80
