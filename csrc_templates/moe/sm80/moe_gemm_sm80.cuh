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
//
// INT8 weight-only (WElem = int8_t): the ring holds the int8 B tiles (half the bytes of a 16-bit one). One k-slice
// ahead of the MMAs, every thread converts its share of the next slice's B tile to Elem (common/int8.cuh, exact)
// into one of two 16-bit B buffers, which the MMAs read as they read a 16-bit tile; the mainloop's one barrier per
// k-slice orders both. The per-channel weight scale multiplies the fp32 sums before the bias (and in the split-K
// partials, which the reduce adds unchanged).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/dtypes.cuh"
#include "common/int8.cuh"
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
// BLOCK_M >= 64. Shared memory per stage: [A: BLOCK_M rows | B: kRowsB rows] x (BLOCK_K + 8) elements; with int8
// weights the stage's B rows are BLOCK_K + 16 bytes and two 16-bit B tiles follow the ring.
constexpr int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <int kBlockM_, int kBlockN_, int kBlockK_, int kStages_, bool kGated_, bool kS8_ = false>
struct TileConfig {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = kBlockK_, kStages = kStages_;
  static constexpr bool kGated = kGated_;
  static constexpr bool kS8 = kS8_;                       // int8 weights (converted to 16 bits in shared memory)
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
  static constexpr int kLdsAB = kBlockK + 8;              // smem row stride of 16-bit A and B tiles (elements)
  static constexpr int kLdsB8 = kBlockK + 16;             // smem row stride of int8 B tiles (bytes)
  static constexpr int kLdsC = kBlockN + 8;               // smem row stride of the epilogue tile (elements)
  static constexpr int kBytesA = kBlockM * kLdsAB * 2;    // A tile of a stage
  static constexpr int kBytesB16 = kRowsB * kLdsAB * 2;   // a 16-bit B tile
  static constexpr int kStageBytes = kBytesA + (kS8 ? kRowsB * kLdsB8 : kBytesB16);
  static constexpr int kRingBytes = kStages * kStageBytes + (kS8 ? 2 * kBytesB16 : 0);  // int8: + two B buffers
  static constexpr int kSmemBytes = max_int(kRingBytes, kBlockM * kLdsC * 2);

  static_assert(kBlockM % 16 == 0 && kBlockM >= 16 && kBlockM <= 128, "BLOCK_M: a multiple of 16 in [16, 128]");
  static_assert(kBlockK % 16 == 0 && kBlockK >= 16 && kBlockK <= 128, "BLOCK_K: a multiple of 16 in [16, 128]");
  static_assert(kStages >= (kS8 ? 3 : 2), "the cp.async ring needs 2 stages (3 with int8 weights)");
  static_assert(kWarpM % 16 == 0, "each warp needs whole m16 tiles");
  static_assert(kWarpN % 16 == 0, "each warp needs pairs of n8 tiles (one ldmatrix.x4 loads two)");
  static_assert(kThreads % (kBlockK / 8) == 0, "a thread keeps one chunk column of the K slice");
  static_assert(kHalves * kMmaM * kMmaN * 4 <= 128, "too many accumulators per thread: shrink the tile");
};

// ---------------------------------------------------------------------------------------------------------------
// One thread's share of the cp.async traffic for a tile of kRows rows of Elem (row stride kLdsBytes): the same
// 16-byte chunk column (kc) of rows row0, row0 + kRowsPerPass, ... in every k-slice. Rows resolved once, before
// the mainloop.
template <class Cfg, typename Elem, int kRows, int kLdsBytes>
struct RowLoader {
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(Elem));
  static constexpr int kChunks = Cfg::kBlockK / kChunkElems;  // 16-byte chunks per row of the K slice
  static constexpr int kRowsPerPass = Cfg::kThreads / kChunks;
  static constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  static_assert(Cfg::kThreads % kChunks == 0, "a thread keeps one chunk column of the K slice");

  const Elem* base;          // the tensor's first element: the (never read) source of zero-filled chunks
  const Elem* src[kPasses];  // global address of this thread's chunk at k = 0 (base when !ok)
  bool ok[kPasses];          // the row exists (real token / in-range weight row)
  int row0;                  // first tile row of this thread
  int kc;                    // element offset of this thread's chunk inside the BLOCK_K slice

  __device__ __forceinline__ void init_lanes() {
    row0 = threadIdx.x / kChunks;
    kc = (threadIdx.x % kChunks) * kChunkElems;
  }
  __device__ __forceinline__ int row(int pass) const { return row0 + pass * kRowsPerPass; }
  __device__ __forceinline__ bool in_tile(int pass) const {
    return kRows % kRowsPerPass == 0 || row(pass) < kRows;
  }

  // Copy the slice [k0, k0 + BLOCK_K) of every row into the tile at smem address `tile`.
  __device__ __forceinline__ void load(uint32_t tile, int k0, int k) const {
    const bool k_ok = k0 + kc < k;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      if (!in_tile(p)) continue;
      const bool valid = ok[p] && k_ok;
      const uint32_t dst = tile + static_cast<uint32_t>(row(p) * kLdsBytes + kc * static_cast<int>(sizeof(Elem)));
      cp_async_16(dst, valid ? src[p] + k0 : base, valid);
    }
  }
};

// A rows: GEMM1 gathers x[token], GEMM2 reads inter[m0 + r]; row_src < 0 marks a padding row (zero-filled).
template <class Cfg, typename Elem, GemmMode kMode>
__device__ __forceinline__ RowLoader<Cfg, Elem, Cfg::kBlockM, Cfg::kLdsAB * 2> make_a_loader(
    const MoeGemmArgs& args, const int* row_src, int m0) {
  RowLoader<Cfg, Elem, Cfg::kBlockM, Cfg::kLdsAB * 2> ld;
  ld.init_lanes();
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
// WElem: the weights' type (Elem, or int8_t into the int8 ring).
template <class Cfg, typename WElem>
using BLoader = RowLoader<Cfg, WElem, Cfg::kRowsB, Cfg::kS8 ? Cfg::kLdsB8 : Cfg::kLdsAB * 2>;

template <class Cfg, typename Elem>
__device__ __forceinline__ BLoader<Cfg, Elem> make_b_loader(const MoeGemmArgs& args, int expert, int n0) {
  BLoader<Cfg, Elem> ld;
  ld.init_lanes();
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

// int8 weights: the int8 B tile at `b8` (kRowsB rows of kLdsB8 bytes) into the 16-bit tile at `b16` (kRowsB rows of
// kLdsAB elements), 16 values per thread and step.
template <class Cfg, typename Elem>
__device__ __forceinline__ void convert_b8(const unsigned char* b8, Elem* b16) {
  constexpr int kChunks = Cfg::kBlockK / 16;
  constexpr int kSteps = (Cfg::kRowsB * kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int idx = threadIdx.x + step * Cfg::kThreads;
    if ((Cfg::kRowsB * kChunks) % Cfg::kThreads != 0 && idx >= Cfg::kRowsB * kChunks) break;
    const int r = idx / kChunks, c = idx % kChunks;
    const uint4 q = *reinterpret_cast<const uint4*>(b8 + r * Cfg::kLdsB8 + c * 16);
    uint4 lo, hi;
    s8x4_to_pairs<Elem>(q.x, lo.x, lo.y);
    s8x4_to_pairs<Elem>(q.y, lo.z, lo.w);
    s8x4_to_pairs<Elem>(q.z, hi.x, hi.y);
    s8x4_to_pairs<Elem>(q.w, hi.z, hi.w);
    uint4* dst = reinterpret_cast<uint4*>(b16 + r * Cfg::kLdsAB + c * 16);
    dst[0] = lo;
    dst[1] = hi;
  }
}

// The multi-stage mainloop over the k tiles [kr.begin, kr.end): STAGES - 1 slices in flight while one is
// multiplied. Slice kt (counted from kr.begin) lives in stage kt % STAGES; the stage refilled at iteration kt was
// consumed at kt - 1, which every warp finished before the barrier.
// int8 weights: slice kt + 1 must have landed too at iteration kt (STAGES - 2 slices in flight), which converts its
// B tile into 16-bit buffer (kt + 1) % 2 while the MMAs read buffer kt % 2 (converted at kt - 1, or before the loop
// for slice 0). The barrier at kt + 1 publishes the new buffer and frees the old one.
template <class Cfg, typename Elem, class LoaderA, class LoaderB>
__device__ __forceinline__ void mainloop(float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4], const LoaderA& ld_a,
                                         const LoaderB& ld_b, unsigned char* smem_ptr, int k, KTileRange kr,
                                         int warp_m, int warp_n, int lane) {
  constexpr uint32_t kStageBytes = Cfg::kStageBytes;
  constexpr uint32_t kOffsetB = Cfg::kBytesA;
  constexpr uint32_t kB16 = Cfg::kS8 ? Cfg::kStages * Cfg::kStageBytes : kOffsetB;  // (first) 16-bit B tile
  const uint32_t smem = smem_u32(smem_ptr);
  const uint32_t a_lane =
      smem + ((warp_m * Cfg::kWarpM + lane % 16) * Cfg::kLdsAB + (lane / 16) * 8) * sizeof(Elem);
  const uint32_t b_lane = smem + kB16 +
      ((warp_n * Cfg::kWarpN + (lane / 16) * 8 + lane % 8) * Cfg::kLdsAB + ((lane / 8) % 2) * 8) * sizeof(Elem);
  Elem* b16 = reinterpret_cast<Elem*>(smem_ptr + kB16);
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
  if constexpr (Cfg::kS8) {
    if (k_tiles > 0) {
      cp_async_wait<Cfg::kStages - 2>();
      __syncthreads();
      convert_b8<Cfg, Elem>(smem_ptr + kOffsetB, b16);
    }
  }
  int read_stage = 0, write_stage = Cfg::kStages - 1;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kS8 ? Cfg::kStages - 3 : Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) {
      ld_a.load(smem + write_stage * kStageBytes, k_first + next * Cfg::kBlockK, k);
      ld_b.load(smem + write_stage * kStageBytes + kOffsetB, k_first + next * Cfg::kBlockK, k);
    }
    cp_async_commit();  // possibly empty: keeps the group count in step with kt
    uint32_t b_read = b_lane + read_stage * kStageBytes;
    if constexpr (Cfg::kS8) {
      const int following = read_stage + 1 == Cfg::kStages ? 0 : read_stage + 1;
      if (kt + 1 < k_tiles) {
        Elem* dst = b16 + ((kt + 1) % 2) * (Cfg::kBytesB16 / 2);
        convert_b8<Cfg, Elem>(smem_ptr + following * kStageBytes + kOffsetB, dst);
      }
      b_read = b_lane + (kt % 2) * Cfg::kBytesB16;
    }
    mma_stage<Cfg, Elem>(acc, a_lane + read_stage * kStageBytes, b_read);
    read_stage = read_stage + 1 == Cfg::kStages ? 0 : read_stage + 1;
    write_stage = write_stage + 1 == Cfg::kStages ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the epilogue reuses it
}

// ---------------------------------------------------------------------------------------------------------------
// int8 weights: the per-channel scales of columns n and n + 1 of B half h (up 0, gate 1) of the expert; 1 otherwise.
template <class Cfg, typename Elem>
__device__ __forceinline__ float2 weight_scales(const MoeGemmArgs& args, int expert, int h, int n) {
  if constexpr (Cfg::kS8) {
    const int64_t i = (static_cast<int64_t>(expert) * Cfg::kHalves + h) * args.n + n;  // scales [E, n_b]
    return make_float2(load_scale<Elem>(args.w_scale, i, args.w_scale_fp32),
                       load_scale<Elem>(args.w_scale, i + 1, args.w_scale_fp32));
  } else {
    return make_float2(1.f, 1.f);
  }
}

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
    float2 scale_up = make_float2(1.f, 1.f), scale_gate = scale_up;
    if (Cfg::kS8 && n < args.n) {
      scale_up = weight_scales<Cfg, Elem>(args, expert, 0, n);
      if constexpr (Cfg::kGated) scale_gate = weight_scales<Cfg, Elem>(args, expert, 1, n);
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = warp_m * Cfg::kWarpM + mi * 16 + lane / 4 + 8 * hr;
        float v[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float up = acc[0][mi][ni][2 * hr + j] * (j ? scale_up.y : scale_up.x) + bias_up[j];
          if constexpr (kMode == GemmMode::gemm2) {
            v[j] = up * row_scale[mi][hr];
          } else {
            const float gate_scale = j ? scale_gate.y : scale_gate.x;
            const float gate =
                Cfg::kGated ? acc[Cfg::kHalves - 1][mi][ni][2 * hr + j] * gate_scale + bias_gate[j] : 0.f;
            v[j] = apply_act<kAct>(up, gate, prm);
          }
        }
        store_pair(tile + r * Cfg::kLdsC + c, v[0], v[1]);
      }
    }
  }
}

// Split-K: slice z's raw fp32 sums of the real rows (int8 weights: times their scales) go to args.partials (layout
// in split_k.cuh). Same accumulator coordinates as epilogue_math.
template <class Cfg, typename Elem, GemmMode kMode>
__device__ __forceinline__ void store_partials(const float (&acc)[Cfg::kHalves][Cfg::kMmaM][Cfg::kMmaN][4],
                                               const MoeGemmArgs& args, const int* row_src, int expert, int m0,
                                               int n0, int z, int warp_m, int warp_n, int lane) {
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
          const float2 scale = weight_scales<Cfg, Elem>(args, expert, h, n);
          *reinterpret_cast<float2*>(row + h * args.n + n) =
              make_float2(acc[h][mi][ni][2 * hr] * scale.x, acc[h][mi][ni][2 * hr + 1] * scale.y);
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

template <typename Elem, typename WElem, Act kAct, GemmMode kMode, class Cfg>
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
    const auto ld_b = make_b_loader<Cfg, WElem>(args, expert, n0);
    const KTileRange kr = k_tile_range((args.k + Cfg::kBlockK - 1) / Cfg::kBlockK, args.k_splits, blockIdx.y);
    mainloop<Cfg, Elem>(acc, ld_a, ld_b, smem, args.k, kr, warp_m, warp_n, lane);
  }
  if (args.k_splits > 1) {  // uniform: the reduce launch applies the epilogue
    store_partials<Cfg, Elem, kMode>(acc, args, row_src, expert, m0, n0, blockIdx.y, warp_m, warp_n, lane);
    return;
  }
  Elem* tile = reinterpret_cast<Elem*>(smem);
  epilogue_math<Cfg, Elem, kAct, kMode>(acc, args, row_src, tile, expert, n0, warp_m, warp_n, lane);
  __syncthreads();
  epilogue_store<Cfg, Elem, kMode>(args, row_src, tile, m0, n0);
}

// Host side: one launch over all M blocks x N blocks (the caller keeps their product below 2^31) x K slices; unused
// blocks exit on the device (no host sync); with k_splits > 1 the split-K reduce follows on the same stream.
// WElem: the weights' type, Elem or int8_t (INT8 weight-only, args.w_scale holding the per-channel scales).
template <typename Elem, typename WElem, Act kAct, GemmMode kMode, int kBlockM, int kBlockN, int kBlockK, int kStages>
void launch(const MoeGemmArgs& args, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __nv_bfloat16> || std::is_same_v<Elem, __half>, "bf16 or fp16 only");
  static_assert(std::is_same_v<WElem, Elem> || std::is_same_v<WElem, int8_t>, "16-bit or int8 weights");
  static_assert(kMode == GemmMode::gemm1 || kAct == Act::Identity, "GEMM2 is rendered with act=Identity");
  constexpr bool kS8 = std::is_same_v<WElem, int8_t>;
  using Cfg =
      TileConfig<kBlockM, kBlockN, kBlockK, kStages, kMode == GemmMode::gemm1 && ActTraits<kAct>::kGated, kS8>;
  const int m_blocks = args.m_pad_max / kBlockM;
  const int n_blocks = (args.n + kBlockN - 1) / kBlockN;
  if (args.block_done != nullptr) {
    throw std::invalid_argument("moe_gemm sm80: block_done: expected None (per-block completion counters are the "
                                "sm90ws kernel's)");
  }
  if (m_blocks <= 0 || n_blocks <= 0 || args.num_slots <= 0) return;
  auto* kernel = &moe_gemm_kernel<Elem, WElem, kAct, kMode, Cfg>;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    // A failure here (tile too large for this GPU) makes the launch fail too; the binding reports it.
    set_max_dynamic_smem_once<&moe_gemm_kernel<Elem, WElem, kAct, kMode, Cfg>>(Cfg::kSmemBytes);
  }
  kernel<<<dim3(m_blocks * n_blocks, args.k_splits), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  launch_split_k_reduce<Elem, kAct, kMode == GemmMode::gemm2>(args, kBlockM, stream);
}

}  // namespace jitmoe::moe::sm80
