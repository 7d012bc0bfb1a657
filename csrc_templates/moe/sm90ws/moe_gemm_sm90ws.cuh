// MoE grouped GEMM for Hopper (sm_90a): persistent, warp-specialised, TMA-fed wgmma ("sm90ws").
//
// Rows are in the expert-sorted, tile-padded order of moe_gemm_args.cuh, so the BLOCK_M rows of an M block are
// contiguous in A (GEMM1: a_sorted, filled first by a small gather launch; GEMM2: inter) and all belong to one
// expert e = block_expert[m_block]; the expert's weight tile is a contiguous box of rows of B viewed as one
// [E * n_b, K] matrix. Both operands are therefore loaded by TMA (128-byte swizzle, hardware zero-fill of the K
// tail and of rows past the matrix). With few rows per expert GEMM1 skips the gather and loads each real row
// straight from x by a one-row TMA box ("direct rows": produce_direct_rows); the caller chooses it by passing no
// a_sorted.
//
// The grid is persistent and made of clusters of kCluster CTAs along M (one CTA per SM). A cluster walks work
// units (kCluster neighbouring M blocks, one N block) in a static round-robin; CTA r computes the tile of the
// unit's r-th M block. M blocks past num_padded (a device value) do not exist and unused blocks (e = -1) have no
// tile. When all of a unit's blocks belong to one expert (the common case in prefill) they need the same weight
// tile: each CTA loads 1/kCluster of it and the TMA multicasts it to the whole cluster, which halves the L2 -> SM
// traffic of B. (Measured on the H100 it helps some shapes and hurts others, so the default is one CTA per
// cluster: moe_gemm.SM90WS_CLUSTER_M.) Units are rastered in groups of M blocks with M fastest, so the clusters
// that run at the same time read the same weight tile (and a bounded set of A blocks) and each byte of B comes from
// HBM about once per group; how many M blocks a group spans is TileScheduler's choice (see there).
//
// Each CTA has three warpgroups: a producer (registers given back with setmaxnreg) whose first thread issues the
// TMA loads of every k-tile into a ring of kStages stages, each guarded by a "full" transaction mbarrier (TMA bytes
// landed) and an "empty" mbarrier (every consumer warp of the cluster retired its wgmma on that stage: the peer may
// multicast into this CTA's stage, so the rings of a cluster move in step); and two consumer warpgroups (registers
// raised) that each own 64 rows of the 128-row tile ("cooperative"), issue SS wgmma with fp32 accumulators, and release
// a stage as soon as the wgmma that read it has retired. A gated GEMM1 stages the up rows [n0, n0+BN) of fc1[e] and the
// gate rows [N+n0, ...) as one [2 BN, BK] B tile and issues one wgmma of N = 2 BN per k-step: the accumulator's second
// half holds the gate of its first half's (row, column), and A is read from shared memory once per k-step instead of
// once per half. (On the H100 this left kernel times unchanged against two N = BN wgmmas with two accumulators:
// benchmarks/results/h100-2026-11-23-session14/dev_fused_gate_ab.log.) When the second warpgroup's 64 rows are all
// padding (the tail of an expert's last block) it issues no wgmma and the first one has the tensor cores to itself. The
// epilogue (GEMM1: bias + activation; GEMM2: (acc + bias) * routing weight) runs in fp32, goes through a dedicated
// XOR-swizzled staging tile (so the producer keeps filling the ring for the next tile meanwhile), each warp through its
// own 16 rows, and leaves as 16-byte row chunks: GEMM1 to inter[p] (the padding rows of a 16-row group that holds a
// real row too: GEMM2 ignores them), GEMM2 scattered to out_slots[slot] (real rows only); columns >= N are never
// written. Row groups of padding only are neither loaded (A) nor stored.
//
// Per-block completion (args.block_done, both GEMMs of a layer on this kernel): every consumer warp of GEMM1 counts
// each tile it leaves behind in its M block's counter, after a fence that makes its stores visible GPU-wide. GEMM2,
// launched with PDL as soon as every GEMM1 CTA runs, then does not wait for GEMM1 to end: its producer issues a
// unit's B loads, waits (acquire) until the unit's A block counts GEMM1's N blocks times its consumer warps, and only
// then loads that block. GEMM2's CTAs thus stream weights on the SMs that GEMM1's last, partial wave leaves idle.
// Everything else GEMM2 reads was complete before GEMM1 let it launch, and nothing GEMM1 touches is written by GEMM2;
// one thread still waits for GEMM1's end before its CTA exits, so that GEMM2 ending still implies GEMM1 ended.
//
// FP8 (Operand = e4m3): A and B are e4m3, a stage holds [rows, 128] of them (the same bytes as [rows, 64] of
// bf16), the wgmma is the e4m3 one (K = 32 per instruction), and the epilogue first scales the accumulator by
// acc_scale[e]; GEMM1 writes inter in e4m3 (act(...) * out_scale, saturated), which is GEMM2's A.
//
// INT8 weight-only (Weight = int8_t, 16-bit A): the ring's B stages hold int8 [rows, 64] tiles (64 bytes a row, no
// swizzle). wgmma has no int8 x 16-bit form, so every k-tile the 256 consumer threads convert the landed int8 tile
// into one of two 16-bit B slots, laid out exactly as a 16-bit TMA load would have left it, and the wgmma reads that
// slot. The conversion of k-tile kt overlaps the wgmma of kt - 1; two named barriers per k-tile order it (the slot
// is complete before any wgmma reads it; the wgmma that read a slot two k-tiles ago retired in both warpgroups
// before the slot is written again). The epilogue multiplies each column by its weight row's scale (w_scale).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "common/dtypes.cuh"
#include "common/int8.cuh"
#include "common/launch.cuh"
#include "common/pdl.cuh"
#include "moe/activation.cuh"
#include "moe/sm90_gemm_traits.cuh"
#include "moe/moe_gemm_args.cuh"
#include "moe/sm90ws/gather.cuh"
#include "moe/sm90ws/tma_host.cuh"

namespace jitmoe::moe::sm90ws {

using moe::GemmMode;

// Everything a specialization fixes at compile time, the shared-memory plan, and the invariants.
template <typename T, typename Operand, typename Weight, Act A, GemmMode Mode, int BM, int BN, int BK, int Stages,
          int ClusterM>
struct Config : Sm90GemmTraits<T, A, Mode, BM, BN, BK, Stages, 2, Operand> {
  using Traits = Sm90GemmTraits<T, A, Mode, BM, BN, BK, Stages, 2, Operand>;  // two consumer warpgroups
  static constexpr int kBlockM = BM, kBlockN = BN, kBlockK = BK, kStages = Stages;
  static constexpr bool kFp8 = std::is_same_v<Operand, __nv_fp8_e4m3>;
  static constexpr bool kS8 = std::is_same_v<Weight, int8_t>;  // INT8 weight-only: B converted in shared memory
  static constexpr int kOp = sizeof(Operand);  // bytes per A element (and per B element as the wgmma reads it)
  static constexpr int kWeightBytes = sizeof(Weight);  // bytes per B element in the ring
  using WElem = std::conditional_t<kS8, int8_t, typename Traits::Elem>;
  static_assert(std::is_same_v<Weight, Operand> || (kS8 && std::is_same_v<Operand, T>),
                "B: the operand type, or int8 against 16-bit A");
  static_assert(!kS8 || ClusterM == 1, "int8 weights: one CTA per cluster (the int8 ring is not multicast)");
  // What the epilogue stores: GEMM1 writes GEMM2's A operand (inter), GEMM2 the layer's type.
  using Out = std::conditional_t<Traits::kGemm2, T, Operand>;
  static constexpr int kChunkShift = sizeof(Out) == 1 ? 4 : 3;  // log2 of the elements in one 16-byte store
  static constexpr int kChunkElems = 1 << kChunkShift;
  static constexpr int kRowChunks = BN / kChunkElems;                      // 16-byte chunks of a staged row

  static constexpr int kConsumerWarpGroups = Traits::kMmaWarpGroups;
  // B as the wgmma sees it: both halves of a stage stacked, [kHalves * BN, BK] (up rows first), one wgmma of
  // N = kHalves * BN per k-step and one [BM, kHalves * BN] accumulator per CTA. (These hide the traits' per-half
  // layout and MMA, which the sm90 kernel keeps.)
  static constexpr int kRowsB = Traits::kHalves * BN;
  using SmemLayoutB = typename Traits::template SmemLayout<kRowsB>;  // (kRowsB, BK, Stages)
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<typename Traits::Elem, typename Traits::Elem, float,
                                 cute::Shape<cute::_64, cute::Int<kRowsB>, cute::Int<BK>>>(),
      cute::Layout<cute::Shape<cute::Int<Traits::kMmaWarpGroups>, cute::_1, cute::_1>>{}));
  static constexpr int kThreads = 128 * (1 + kConsumerWarpGroups);
  static constexpr int kProducerRegs = 40;                   // 128 x 40 + 256 x 232 <= 64 K registers
  static constexpr int kConsumerRegs = 232;
  // CTAs of a cluster along M. They walk the same sequence of tiles with their rings in step, on neighbouring M
  // blocks of one N block; when both blocks belong to one expert each CTA loads half of the B tile and the TMA
  // multicasts it into both, halving the L2 -> SM traffic of B.
  static constexpr int kCluster = ClusterM;
  static constexpr int kConsumerWarps = 4 * kConsumerWarpGroups;
  static constexpr int kEmptyArrivals = kConsumerWarps * kCluster;  // every consumer warp of the cluster
  static constexpr int kRasterGroup = 8;                     // M blocks per raster group (GEMM1: see TileScheduler)
  static constexpr int kBoxRowsB = BN / kCluster;            // rows of one B TMA box (one CTA's multicast share)
  // A block whose upper half is padding loads A in boxes of 16 rows, only those of its row groups that hold a real
  // slot (see a_row_groups): an expert's last block is mostly padding when it has few rows (Qwen3 T = 256: 16 real
  // rows of 128), and its padding rows would otherwise cost as much DRAM traffic as they hold bytes (ncu: 914 MB
  // read for 805 MB of weights). Other blocks take one [BM, BK] box.
  static constexpr int kBoxRowsA = 16;
  static constexpr int kRowGroups = BM / kBoxRowsA;

  static_assert(BM == 128, "BLOCK_M must be 128 (two consumer warpgroups of 64 rows)");
  static_assert(BK * kOp == 128, "BLOCK_K: one 128-byte swizzle row per TMA box row (64 bf16/fp16 or 128 fp8)");
  static_assert(kRowChunks % 2 == 0, "a warp's 16 staged rows are whole 32-lane steps of 16-byte chunks");
  static_assert(BN % 64 == 0 && BN <= 256, "BLOCK_N: 64, 128, 192 or 256 (TMA box <= 256 rows; the staging swizzle "
                                           "permutes groups of 8 16-byte chunks)");
  static_assert(Stages >= 2, "the ring needs at least two stages to overlap loads and wgmma");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of one or two CTAs along M");
  static_assert(kRasterGroup % kCluster == 0 && kBoxRowsB % 8 == 0, "a B box is whole 8-row swizzle atoms");

  // Shared memory: [A stages | B stages x halves | int8: two 16-bit B slots | staging tile | full barriers | empty
  // barriers].
  static constexpr int kBytesStageA = BM * BK * kOp;
  static constexpr int kBytesStageB = BN * BK * kWeightBytes;  // one half
  static constexpr int kBytesBoxA = kBoxRowsA * BK * kOp;
  static constexpr int kBytesRowA = BK * kOp;                 // one direct row (GEMM1 without a_sorted)
  static constexpr int kTxBytesB = Traits::kHalves * kBytesStageB;  // per stage; A adds kBytesBoxA per row group
  static constexpr int kBytesStaging = BM * BN * static_cast<int>(sizeof(Out));
  static constexpr int kOffsetB = Traits::kElemsA * kOp;
  static constexpr int kBytesRowsB = kRowsB * BK * kWeightBytes;  // one stage's B, both halves
  static constexpr int kCvtSlots = kS8 ? 2 : 0;
  static constexpr int kBytesCvtSlot = kRowsB * BK * kOp;
  using SmemLayoutCvt = decltype(cute::tile_to_shape(typename Traits::SmemAtom{},
                                                     cute::Shape<cute::Int<kRowsB>, cute::Int<BK>, cute::_2>{}));
  static constexpr int kOffsetCvt = kOffsetB + Stages * kBytesRowsB;
  static constexpr int kOffsetStaging = kOffsetCvt + kCvtSlots * kBytesCvtSlot;
  static constexpr int kOffsetBarriers = kOffsetStaging + kBytesStaging;
  static constexpr int kSwizzleAlign = 1024;                  // the 128-byte swizzle repeats every 1 KiB
  static constexpr int kSmemBytes = kSwizzleAlign + kOffsetBarriers + 2 * Stages * 8;
  static_assert(Traits::kElemsA == Stages * BM * BK && Traits::kElemsB == Stages * BN * BK, "stage buffers are dense");
  static_assert(kBytesStageA % kSwizzleAlign == 0 && kBytesStageB % kSwizzleAlign == 0 &&
                kBytesBoxA % kSwizzleAlign == 0 && kBytesCvtSlot % kSwizzleAlign == 0,
                "stages, B slots and A boxes stay aligned to the swizzle");
  static_assert(!kS8 || (BK == 64 && kRowsB * BK / 16 % (128 * kConsumerWarpGroups) == 0),
                "int8: 64-byte rows, converted in whole 16-byte chunks by every consumer thread alike");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA may use: fewer stages");
};

// The static tile order shared by the producer and the consumers of every CTA of a cluster. The work units are
// (M group, N block) pairs, an M group being kCluster neighbouring M blocks; CTA r of a cluster computes the tile
// of M block group * kCluster + r. Every CTA of a cluster walks the same units, and every role skips exactly the
// units where no CTA of the cluster has a used block. Each role walks its units in increasing order and keeps its
// place in the raster (coords is stateful), so raster groups may have data-dependent sizes.
template <class Cfg>
struct TileScheduler {
  // Raster groups span kRasterMinGroups M groups (kRasterGroup M blocks) and grow, up to twice that, until the next
  // M group starts with a new expert: an expert whose blocks straddle two raster groups is streamed from HBM once
  // per group (its weight tiles are read at different times), a cost that a fixed group size pays at nearly every
  // boundary once expert sizes are not multiples of it.
  static constexpr int kRasterMinGroups = Cfg::kRasterGroup / Cfg::kCluster;
  static constexpr int kRasterMaxGroups = 2 * kRasterMinGroups;

  int m_blocks;   // M blocks that exist: ceil(min(num_padded, m_pad_max) / BM)
  // The raster group holding the last unit walked: M groups [group_first, group_first + group_size), i.e. units
  // [group_first * n_blocks, (group_first + group_size) * n_blocks).
  int group_first = 0, group_size = 0;

  // GEMM1 (K = hidden: a long A block, read once per N block) with few N blocks (at most half the clusters:
  // DeepSeek-V3, Qwen3, OLMoE) takes one M group per raster group, i.e. N fastest: the clusters that share an A block
  // start together and find it in L2, while the running window still spans several M groups (an expert's other
  // blocks). Measured on the H100, GEMM1 alone (cluster 2) against raster groups of 8 M blocks: DeepSeek-V3 T=16384
  // 17.0 -> 14.5 ms, T=4096 8.93 -> 8.58; Qwen3 T=1024 0.414 -> 0.397; held-out shapes Qwen3-235B T=4096 2.08 ->
  // 1.92, DeepSeek-V2-Lite and Qwen2-57B -1 to -5% (one +2%). With many N blocks (Mixtral: 112) the window would cover
  // one M group and an expert's blocks would re-read its weights, so those keep raster groups; so does GEMM2 (N
  // fastest was up to 30% slower there). Fixed raster groups of 32 M blocks looked better for Mixtral once and were
  // 14-35% slower on re-run (their A blocks no longer stay in L2 across a wave).
  __device__ __forceinline__ TileScheduler(const MoeGemmArgs& args) {
    const int rows_used = max(0, min(*args.num_padded, args.m_pad_max));
    m_blocks = (rows_used + Cfg::kBlockM - 1) / Cfg::kBlockM;
    group_size = raster_group_size(args, 0);
  }

  // These two are recomputed from the arguments and gridDim when needed rather than kept: the direct-rows warp (40
  // registers after setmaxnreg) has none to spare.
  static __device__ __forceinline__ int n_blocks(const MoeGemmArgs& args) {
    return (args.n + Cfg::kBlockN - 1) / Cfg::kBlockN;
  }
  static __device__ __forceinline__ bool n_fastest(const MoeGemmArgs& args) {
    return !Cfg::kGemm2 && 2 * n_blocks(args) <= static_cast<int>(gridDim.x) / Cfg::kCluster;
  }

  // Whether M block m (0 < m < m_blocks) is the first block of its expert.
  __device__ __forceinline__ bool starts_expert(const MoeGemmArgs& args, int m) const {
    return args.block_expert[m] != args.block_expert[m - 1];
  }

  // M groups of the raster group that starts at M group g. The candidate boundaries are loaded together (one
  // round trip: the walk runs on the producer thread's critical path).
  __device__ __forceinline__ int raster_group_size(const MoeGemmArgs& args, int g) const {
    const int m_groups = (m_blocks + Cfg::kCluster - 1) / Cfg::kCluster;
    if (n_fastest(args)) return min(1, m_groups - g);
    const int base = min(kRasterMinGroups, m_groups - g);
    unsigned clean = 0;  // bit i: M group g + base + i does not exist or starts with a new expert
    CUTE_UNROLL
    for (int i = 0; i < kRasterMaxGroups - kRasterMinGroups; ++i) {
      const int m = (g + base + i) * Cfg::kCluster;
      clean |= (m >= m_blocks || starts_expert(args, m) ? 1u : 0u) << i;
    }
    return base + __ffs(clean | (1u << (kRasterMaxGroups - kRasterMinGroups))) - 1;
  }

  // Unit u -> (M group, N block), M fastest inside a raster group, then N, so the clusters running at the same time
  // read the same weight tiles and a bounded set of A blocks; false once u is past the last unit. u must not
  // decrease from one call to the next. (No unit count is kept: see n_blocks.)
  __device__ __forceinline__ bool coords(const MoeGemmArgs& args, int u, int& m_group, int& n_block) {
    const int n = n_blocks(args);
    while (u >= (group_first + group_size) * n) {
      if (group_size == 0) return false;  // the last raster group is behind
      group_first += group_size;
      group_size = raster_group_size(args, group_first);
    }
    const int local = u - group_first * n;
    m_group = group_first + local % group_size;
    n_block = local / group_size;
    return true;
  }

  // The local expert of M block m, or -1 when the block is unused or does not exist.
  __device__ __forceinline__ int expert_of(const MoeGemmArgs& args, int m_block) const {
    if (m_block >= m_blocks) return -1;
    const int e = args.block_expert[m_block];
    return e >= 0 && e < args.num_experts ? e : -1;
  }
};

// What one CTA does in one unit: its M block and expert, and whether its cluster shares (multicasts) the B tile.
struct UnitRole {
  int m_block;
  int expert;     // -1: this CTA has no tile in the unit (it still keeps its ring in step)
  bool skip;      // no CTA of the cluster has a tile: every role of every CTA skips the unit
  bool multicast;
};

template <class Cfg>
__device__ __forceinline__ UnitRole unit_role(const MoeGemmArgs& args, const TileScheduler<Cfg>& sched, int m_group,
                                              int rank) {
  UnitRole role;
  role.m_block = m_group * Cfg::kCluster + rank;
  role.expert = sched.expert_of(args, role.m_block);
  if constexpr (Cfg::kCluster == 1) {
    role.skip = role.expert < 0;
    role.multicast = false;
  } else {
    const int peer = sched.expert_of(args, m_group * Cfg::kCluster + (rank ^ 1));
    role.skip = role.expert < 0 && peer < 0;
    role.multicast = role.expert >= 0 && role.expert == peer;
  }
  return role;
}

// Position of this CTA in the persistent grid: cluster index, cluster count, rank inside the cluster.
struct ClusterCoord {
  int id, count, rank;
};

template <class Cfg>
__device__ __forceinline__ ClusterCoord cluster_coord() {
  const int rank = Cfg::kCluster == 1 ? 0 : static_cast<int>(cute::block_rank_in_cluster());
  return {static_cast<int>(blockIdx.x) / Cfg::kCluster, static_cast<int>(gridDim.x) / Cfg::kCluster, rank};
}

// The ring's position: stage index and the parity of the current pass over the ring.
template <int Stages>
struct RingState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == Stages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Shared-memory pointers of one CTA.
template <class Cfg>
struct SmemPlan {
  using Elem = typename Cfg::Elem;
  Elem* a;                          // [Stages][BM, BK] swizzled (SmemLayoutA)
  typename Cfg::WElem* b;           // [Stages][halves * BN, BK] swizzled (Config::SmemLayoutB); int8: unswizzled
  Elem* cvt;                        // int8 only: [2][halves * BN, BK] 16-bit, swizzled (Config::SmemLayoutCvt)
  typename Cfg::Out* staging;       // [BM, BN] epilogue tile, 16-byte chunks XOR-swizzled by row % 8
  uint64_t* full;                   // [Stages] TMA landed (transaction count)
  uint64_t* empty;                  // [Stages] every consumer warp retired its wgmma on the stage

  __device__ __forceinline__ explicit SmemPlan(uint8_t* base) {
    a = reinterpret_cast<Elem*>(base);
    b = reinterpret_cast<typename Cfg::WElem*>(base + Cfg::kOffsetB);
    cvt = reinterpret_cast<Elem*>(base + Cfg::kOffsetCvt);
    staging = reinterpret_cast<typename Cfg::Out*>(base + Cfg::kOffsetStaging);
    full = reinterpret_cast<uint64_t*>(base + Cfg::kOffsetBarriers);
    empty = full + Cfg::kStages;
  }
};

__device__ __forceinline__ bool is_real_slot(int s, int num_slots) { return s >= 0 && s < num_slots; }

// Row groups of kBoxRowsA rows that the producer loads for M block m_block: all of them (one [BM, BK] box) unless
// the block's upper half is padding, else the groups of its lower half that hold a real slot (an expert's rows come
// first and its padding after, so those are the first groups). Few boxes only: on the H100 a block loaded as up
// to 8 small boxes made DeepSeek-V3's GEMM1 at T = 16384 (a partial last block per expert) 25% slower. The loads
// do not depend on the block's expert, so they overlap the scheduler's block_expert load.
template <class Cfg>
__device__ __forceinline__ int a_row_groups(const MoeGemmArgs& args, const TileScheduler<Cfg>& sched, int m_block) {
  constexpr int kHalf = Cfg::kRowGroups / 2;
  if (m_block >= sched.m_blocks) return 0;
  const int32_t* ids = args.sorted_ids + static_cast<int64_t>(m_block) * Cfg::kBlockM;
  int first[kHalf];  // the slots of rows 16, 32, ..., 64: the first row of groups 1 .. kHalf
  CUTE_UNROLL
  for (int g = 1; g <= kHalf; ++g) first[g - 1] = ids[g * Cfg::kBoxRowsA];
  if (is_real_slot(first[kHalf - 1], args.num_slots)) return Cfg::kRowGroups;
  int groups = 1;  // a used block's first row is real
  CUTE_UNROLL
  for (int g = 1; g < kHalf; ++g) groups += is_real_slot(first[g - 1], args.num_slots) ? 1 : 0;
  return groups;
}

// GEMM1 with block_done: this warp's count for the tile of M block m_block, once its stores are visible GPU-wide.
template <class Cfg>
__device__ __forceinline__ void count_tile_stored(const MoeGemmArgs& args, int m_block, int lane) {
  if constexpr (!Cfg::kGemm2) {
    if (args.block_done == nullptr) return;
    __threadfence();  // every lane's stores before the count (one MEMBAR for the warp)
    __syncwarp();
    if (lane == 0) atomicAdd(args.block_done + m_block, 1);
  }
}

// GEMM2 with block_done: waits until GEMM1 has stored every tile of M block m_block (acquire), then orders those
// generic-proxy stores before this thread's TMA (async-proxy) loads of the block.
template <class Cfg>
__device__ __forceinline__ void wait_block_stored(const MoeGemmArgs& args, int m_block) {
  if constexpr (Cfg::kGemm2) {
    if (args.block_done == nullptr) return;
    const int target = args.block_done_n_blocks * Cfg::kConsumerWarps;
    const int32_t* counter = args.block_done + m_block;
    for (;;) {
      int done;
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(done) : "l"(counter) : "memory");
      if (done >= target) break;
      __nanosleep(128);
    }
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }
}

// GEMM1 "direct rows": the launch got no a_sorted (few rows per expert), so there is no gather launch and no sorted
// copy of x. Each real row of a block is loaded by its own [1, BK] TMA box from its token's row of x into the row's
// place in the stage. The 128-byte swizzle permutes 16-byte chunks by shared-memory address bits (bits 4-6 XOR bits
// 7-9), so a one-row box at row r of a 1 KiB-aligned stage lands exactly as row r of a [BM, BK] box would.
template <class Cfg>
__device__ __forceinline__ bool uses_direct_rows(const MoeGemmArgs& args) {
  return !Cfg::kGemm2 && args.a_sorted == nullptr;
}

// The second producer warp, with direct rows only: it walks the units and the ring in step with the producer thread
// (each full barrier then expects two arrivals) and loads A, lane l the rows l, l + 32, ... of the block. A warp of
// its own because the producer thread's registers (40 after setmaxnreg) have no room for the rows' tokens.
template <class Cfg>
__device__ __forceinline__ void produce_direct_rows(const MoeGemmArgs& args, const CUtensorMap* tmap_x_rows,
                                                    const SmemPlan<Cfg>& smem, int lane) {
  using cutlass::arch::ClusterBarrier;
  using cutlass::arch::ClusterTransactionBarrier;
  constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  constexpr int kPerLane = Cfg::kBlockM / 32;
  TileScheduler<Cfg> sched(args);
  const ClusterCoord cluster = cluster_coord<Cfg>();
  const int k_tiles = (args.k + Cfg::kBlockK - 1) / Cfg::kBlockK;
  RingState<Cfg::kStages> ring;
  int m_group, n_block;
  for (int u = cluster.id; sched.coords(args, u, m_group, n_block); u += cluster.count) {
    const UnitRole role = unit_role<Cfg>(args, sched, m_group, cluster.rank);
    if (role.skip) continue;
    int token[kPerLane];  // x row of block row lane + 32 j, -1 for padding
    int rows = 0;         // real rows of the block
    CUTE_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int s = role.expert >= 0 ? args.sorted_ids[role.m_block * Cfg::kBlockM + lane + 32 * j] : -1;
      token[j] = is_real_slot(s, args.num_slots) ? s / args.topk : -1;
      rows += __popc(__ballot_sync(0xffffffffu, token[j] >= 0));
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      ClusterBarrier::wait(&smem.empty[ring.stage], ring.phase ^ 1);
      uint64_t* full = &smem.full[ring.stage];
      if (lane == 0) ClusterTransactionBarrier::arrive_and_expect_tx(full, rows * Cfg::kBytesRowA);
      __syncwarp();  // the expected bytes are announced before any row can land
      auto* a_dst = smem.a + ring.stage * Cfg::kBlockM * Cfg::kBlockK;
      CUTE_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        if (token[j] >= 0) {
          cute::SM90_TMA_LOAD_2D::copy(tmap_x_rows, full, kHint, a_dst + (lane + 32 * j) * Cfg::kBlockK,
                                       kt * Cfg::kBlockK, token[j]);
        }
      }
      ring.advance();
    }
  }
}

// Producer (one thread): for every unit of this cluster, every k-tile: wait until the stage is empty in every CTA
// of the cluster, announce its bytes, issue the TMA boxes of A (one [BM, BK] box, or one [16, BK] box per row group
// that a_row_groups picks: the others' rows never reach a kept output) and of each B half [BN, BK]. A shared B
// tile is loaded as kCluster boxes, one per CTA, each multicast to the whole cluster; otherwise this CTA loads all
// of its B boxes itself. A CTA without a tile in the unit only arrives, so its ring stays in step.
template <class Cfg>
__device__ __forceinline__ void produce(const MoeGemmArgs& args, const CUtensorMap* tmap_a,
                                        const CUtensorMap* tmap_a_group, const CUtensorMap* tmap_b,
                                        const SmemPlan<Cfg>& smem) {
  using cutlass::arch::ClusterBarrier;
  using cutlass::arch::ClusterTransactionBarrier;
  constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  constexpr uint16_t kClusterMask = (1u << Cfg::kCluster) - 1;
  TileScheduler<Cfg> sched(args);
  const ClusterCoord cluster = cluster_coord<Cfg>();
  const int k_tiles = (args.k + Cfg::kBlockK - 1) / Cfg::kBlockK;
  const int n_b = args.n * Cfg::kHalves;
  const bool direct = uses_direct_rows<Cfg>(args);  // A comes from produce_direct_rows
  RingState<Cfg::kStages> ring;
  int m_group, n_block;
  for (int u = cluster.id; sched.coords(args, u, m_group, n_block); u += cluster.count) {
    const int groups = direct ? 0 : a_row_groups<Cfg>(args, sched, m_group * Cfg::kCluster + cluster.rank);
    const UnitRole role = unit_role<Cfg>(args, sched, m_group, cluster.rank);
    if (role.skip) continue;
    const int a_row = role.m_block * Cfg::kBlockM;
    const int a_groups = role.expert >= 0 ? groups : 0;
    const int b_row = max(role.expert, 0) * n_b + n_block * Cfg::kBlockN;  // up half; gate is args.n rows further
    for (int kt = 0; kt < k_tiles; ++kt) {
      ClusterBarrier::wait(&smem.empty[ring.stage], ring.phase ^ 1);  // the first pass finds every stage empty
      uint64_t* full = &smem.full[ring.stage];
      if (role.expert < 0) {
        ClusterBarrier::arrive(full);
        ring.advance();
        continue;
      }
      ClusterTransactionBarrier::arrive_and_expect_tx(full, a_groups * Cfg::kBytesBoxA + Cfg::kTxBytesB);
      const int k0 = kt * Cfg::kBlockK;
      CUTE_UNROLL
      for (int h = 0; h < Cfg::kHalves; ++h) {
        auto* dst = smem.b + (ring.stage * Cfg::kHalves + h) * Cfg::kBlockN * Cfg::kBlockK;
        const int row = b_row + h * args.n;
        if (role.multicast) {
          const int box = cluster.rank * Cfg::kBoxRowsB;
          cute::SM90_TMA_LOAD_MULTICAST_2D::copy(tmap_b, full, kClusterMask, kHint, dst + box * Cfg::kBlockK, k0,
                                                 row + box);
        } else {
          CUTE_UNROLL
          for (int box = 0; box < Cfg::kBlockN; box += Cfg::kBoxRowsB) {
            cute::SM90_TMA_LOAD_2D::copy(tmap_b, full, kHint, dst + box * Cfg::kBlockK, k0, row + box);
          }
        }
      }
      // A after B: with block_done, the wait for the block's GEMM1 tiles overlaps the B loads of the unit's first
      // k-tile.
      if (kt == 0) wait_block_stored<Cfg>(args, role.m_block);
      auto* a_dst = smem.a + ring.stage * Cfg::kBlockM * Cfg::kBlockK;
      if (a_groups == Cfg::kRowGroups) {
        cute::SM90_TMA_LOAD_2D::copy(tmap_a, full, kHint, a_dst, k0, a_row);
      } else {  // (no groups with direct rows)
        for (int g = 0; g < a_groups; ++g) {
          cute::SM90_TMA_LOAD_2D::copy(tmap_a_group, full, kHint, a_dst + g * Cfg::kBoxRowsA * Cfg::kBlockK, k0,
                                       a_row + g * Cfg::kBoxRowsA);
        }
      }
      ring.advance();
    }
  }
}

// A cluster-wide barrier that threads may reach from divergent paths (the producer warp's thread 0 arrives late).
__device__ __forceinline__ void cluster_sync_unaligned() {
  asm volatile("barrier.cluster.arrive;\nbarrier.cluster.wait;" ::: "memory");
}

// The slots of the 16 sorted rows a consumer warp owns (wgmma gives warp w of a warpgroup rows [16 w, 16 w + 16)
// of its 64): lane j < 16 holds sorted_ids of row j, lanes 16..31 repeat lanes 0..15. A padding row holds a value
// outside [0, num_slots). Loaded when a tile starts so the latency hides behind the main loop.
__device__ __forceinline__ int load_warp_row_slot(const MoeGemmArgs& args, int row0, int lane) {
  return args.sorted_ids[row0 + lane % 16];  // a used block lies entirely below num_padded
}

// Whether the second warpgroup's 64 rows of the used M block at m0 are all padding. An expert's rows are padded at
// the end of its last block, so that holds exactly when row m0 + 64 is padding.
__device__ __forceinline__ bool upper_half_is_padding(const MoeGemmArgs& args, int m0) {
  return !is_real_slot(args.sorted_ids[m0 + 64], args.num_slots);
}

// Element offset of (m, n) in the staging tile: 16-byte chunk c = n / kChunkElems of row m moves to chunk
// c ^ (m % 8) (m % 4 for rows of only 4 chunks), so the 8 rows a warp's accumulator store touches hit different
// bank groups.
template <class Cfg>
__device__ __forceinline__ int staging_offset(int m, int n) {
  constexpr int kShift = Cfg::kChunkShift;  // shifts and masks, not / and %: n is a signed int
  constexpr int kRows = Cfg::kRowChunks < 8 ? Cfg::kRowChunks : 8;
  return m * Cfg::kBlockN + ((((n >> kShift) ^ (m & (kRows - 1))) << kShift) | (n & (Cfg::kChunkElems - 1)));
}

// Two neighbouring output elements (columns n, n + 1), converted and stored with one shared-memory store.
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float lo, float hi) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
}
__device__ __forceinline__ void store_pair(__half* dst, float lo, float hi) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
}
__device__ __forceinline__ void store_pair(__nv_fp8_e4m3* dst, float lo, float hi) {  // saturating at +-448
  *reinterpret_cast<__nv_fp8x2_storage_t*>(dst) =
      __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// fp32 epilogue math of this thread's accumulator elements, written as Out pairs into its warp's staging rows.
// A gated accumulator is [BM, 2 BN]: wgmma's C layout walks a thread's columns in groups of 8 along N, so its
// elements of columns [0, BN) (up) come first and the gate of element i is element i + half.
template <class Cfg, class Acc>
__device__ __forceinline__ void epilogue_to_staging(const MoeGemmArgs& args, const Acc& acc,
                                                    typename Cfg::Out* staging, int consumer_tid, int row_slot,
                                                    int n0, int e) {
  using namespace cute;
  using T = typename Cfg::Element;
  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(consumer_tid);
  Tensor tCcC = thr_mma.partition_C(make_identity_tensor(Shape<Int<Cfg::kBlockM>, Int<Cfg::kRowsB>>{}));
  constexpr int kHalf = decltype(size(acc))::value / Cfg::kHalves;  // elements of the up half
  static_assert(decltype(size(tCcC))::value == decltype(size(acc))::value, "accumulator / coordinate mismatch");
  static_assert(kHalf % 2 == 0, "accumulator elements come in column pairs");
  const T* bias = static_cast<const T*>(args.bias);  // [E, n_b]
  const int64_t bias_row = static_cast<int64_t>(e) * args.n * Cfg::kHalves;  // also w_scale's: [E, n_b]
  ActParams params;
  if constexpr (!Cfg::kGemm2) params = load_act_params<Cfg::kAct>(args, e);
  // FP8: the accumulator's dequantization, and (GEMM1) the quantization scale of GEMM2's input.
  float acc_scale = 1.f, out_scale = 1.f;
  if constexpr (Cfg::kFp8) {
    acc_scale = args.acc_scale[e];
    if constexpr (!Cfg::kGemm2) out_scale = args.out_scale[e * args.out_scale_stride];
  }
  // wgmma's C layout gives a thread two rows, m_lo and m_lo + 8 (rows 16 w + lane / 4 and + 8 of its
  // warpgroup); GEMM2 needs their routing weights (1 for padding rows, which are never stored).
  const int m_lo = get<0>(tCcC(0));
  float scale_lo = 1.f, scale_hi = 1.f;
  if constexpr (Cfg::kGemm2) {
    const int lane = consumer_tid % 32;
    const int s_lo = __shfl_sync(0xffffffffu, row_slot, lane / 4);
    const int s_hi = __shfl_sync(0xffffffffu, row_slot, lane / 4 + 8);
    if (args.slot_weights != nullptr) {
      if (is_real_slot(s_lo, args.num_slots)) scale_lo = args.slot_weights[s_lo];
      if (is_real_slot(s_hi, args.num_slots)) scale_hi = args.slot_weights[s_hi];
    }
  }
  // int8: the weight scales of a column pair, up and gate (rows col, col + 1 and N + col, N + 1 + col of w_scale),
  // loaded when the pair's first row (m_lo) comes and kept for its second (m_lo + 8: wgmma's C layout gives a
  // thread elements 4g .. 4g + 3 = two columns of two rows). Columns >= N are never stored.
  float2 up_scale = make_float2(acc_scale, acc_scale), gate_scale = up_scale;
  CUTE_UNROLL
  for (int i = 0; i < kHalf; i += 2) {  // elements i, i + 1: columns n, n + 1 of row m
    const int m = get<0>(tCcC(i));
    const int n = get<1>(tCcC(i));
    const int col = n0 + n;
    const bool has_bias = bias != nullptr && col < args.n;  // N % 8 == 0: col + 1 < N too
    if constexpr (Cfg::kS8) {
      static_assert(decltype(size(acc))::value % 4 == 0, "column pairs of two rows");
      if (i % 4 == 0 && col < args.n) {
        // A compiler barrier: all the scale loads hoisted next to the accumulators made ptxas spill.
        asm volatile("" ::: "memory");
        up_scale = load_scale_pair<T>(args.w_scale, bias_row + col, args.w_scale_fp32);
        if constexpr (Cfg::kGated) gate_scale = load_scale_pair<T>(args.w_scale, bias_row + args.n + col,
                                                                   args.w_scale_fp32);
      }
    }
    float v[2];
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const float up = acc(i + j) * (j ? up_scale.y : up_scale.x) +
                       (has_bias ? to_float(bias[bias_row + col + j]) : 0.f);
      if constexpr (Cfg::kGemm2) {
        v[j] = up * (m == m_lo ? scale_lo : scale_hi);
      } else if constexpr (Cfg::kGated) {
        const float gate =
            acc(kHalf + i + j) * (j ? gate_scale.y : gate_scale.x) +
            (has_bias ? to_float(bias[bias_row + args.n + col + j]) : 0.f);
        v[j] = apply_act<Cfg::kAct>(up, gate, params) * out_scale;
      } else {
        v[j] = apply_act<Cfg::kAct>(up, 0.f, params) * out_scale;
      }
    }
    store_pair(staging + staging_offset<Cfg>(m, n), v[0], v[1]);
  }
}

// Copies a warp's 16 staged rows (tile rows row0 .. row0 + 15) to the output in 16-byte chunks, all of them issued
// back to back. GEMM1 writes inter[p] for each of the 16 rows (padding rows included: GEMM2 ignores them);
// GEMM2 scatters real rows to out_slots[slot] and skips padding. Columns >= N are never written.
template <class Cfg>
__device__ __forceinline__ void store_warp_rows(const MoeGemmArgs& args, const typename Cfg::Out* staging,
                                                int row0, int lane, int row_slot, int m0, int n0) {
  constexpr int kChunksN = Cfg::kRowChunks;
  constexpr int kC = Cfg::kChunkElems;
  auto* out = static_cast<typename Cfg::Out*>(args.out);  // GEMM1: [m_pad_max, N]; GEMM2: [num_slots, N]
  CUTE_UNROLL
  for (int i = 0; i < kChunksN / 2; ++i) {
    const int c = lane + 32 * i;
    const int r = c / kChunksN;
    const int chunk = c % kChunksN;
    const int col = n0 + chunk * kC;
    const int s = __shfl_sync(0xffffffffu, row_slot, r);
    int64_t out_row = m0 + row0 + r;
    if constexpr (Cfg::kGemm2) out_row = s;
    if (col >= args.n || (Cfg::kGemm2 && !is_real_slot(s, args.num_slots))) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(staging + staging_offset<Cfg>(row0 + r, chunk * kC));
    *reinterpret_cast<uint4*>(out + out_row * args.n + col) = v;
  }
}

// Issues one k-tile's wgmma batch on A's ring stage and B's stage (int8: B's 16-bit slot).
template <class Cfg, class FragA, class FragB, class Acc>
__device__ __forceinline__ void mma_stage(typename Cfg::TiledMma& mma, int stage, int b_stage, FragA& tCrA,
                                          FragB& tCrB, Acc& acc) {
  using namespace cute;
  cute::warpgroup_arrive();
  gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, b_stage), acc);
  cute::warpgroup_commit_batch();
}

// Named barriers of the two consumer warpgroups (id 0 is __syncthreads), int8 weights only.
enum ConsumerBarrier : int { kSlotConverted = 1, kSlotFree = 2 };

__device__ __forceinline__ void consumer_sync(ConsumerBarrier id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}

// int8 weights: this thread's share of converting ring stage `stage`'s int8 B tile ([kRowsB, 64], 64 bytes a row)
// into 16-bit slot `slot`, where 16-byte chunk j of row r goes to chunk j ^ (r % 8) of the row's 128 bytes: what a
// 16-bit TMA load with the 128-byte swizzle leaves, so the wgmma reads the slot as it reads a 16-bit stage. Thread t
// takes the 16-byte int8 chunks t, t + 256, ... (consecutive threads, consecutive bytes: no bank conflicts on the
// loads; the two stores of a chunk land in different 16-byte columns for the 8 rows of a store phase).
template <class Cfg>
__device__ __forceinline__ void convert_b_stage(const SmemPlan<Cfg>& smem, int stage, int slot, int consumer_tid) {
  constexpr int kThreads = 128 * Cfg::kConsumerWarpGroups;
  constexpr int kChunksPerRow = Cfg::kBlockK / 16;  // int8 chunks of 16 values
  constexpr int kPerThread = Cfg::kRowsB * kChunksPerRow / kThreads;
  const uint4* src = reinterpret_cast<const uint4*>(smem.b + stage * Cfg::kRowsB * Cfg::kBlockK);
  uint8_t* dst = reinterpret_cast<uint8_t*>(smem.cvt) + slot * Cfg::kBytesCvtSlot;
  CUTE_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const int q = consumer_tid + kThreads * i;
    const uint4 w = src[q];
    const int row = q / kChunksPerRow, chunk = 2 * (q % kChunksPerRow);  // its first 16-bit chunk
    uint4 lo, hi;
    s8x4_to_pairs<typename Cfg::Element>(w.x, lo.x, lo.y);
    s8x4_to_pairs<typename Cfg::Element>(w.y, lo.z, lo.w);
    s8x4_to_pairs<typename Cfg::Element>(w.z, hi.x, hi.y);
    s8x4_to_pairs<typename Cfg::Element>(w.w, hi.z, hi.w);
    uint8_t* row_dst = dst + row * 128;
    *reinterpret_cast<uint4*>(row_dst + ((chunk ^ (row & 7)) << 4)) = lo;
    *reinterpret_cast<uint4*>(row_dst + (((chunk + 1) ^ (row & 7)) << 4)) = hi;
  }
}

// One warp's share of releasing a stage: lane 0 arrives, once the warp's wgmma on it retired, on the stage's empty
// barrier in every CTA of the cluster (any of them may multicast into this CTA's stage next).
template <class Cfg>
__device__ __forceinline__ void release_stage(uint64_t* empty, int lane) {
  if constexpr (Cfg::kCluster == 1) {
    if (lane == 0) cutlass::arch::ClusterBarrier::arrive(empty);
  } else {
    CUTE_UNROLL
    for (int cta = 0; cta < Cfg::kCluster; ++cta) cutlass::arch::ClusterBarrier::arrive(empty, cta, lane == 0);
  }
}

// Consumer warpgroups: for every tile this CTA owns, accumulate A[BM, K] x B[BN, K]^T over the ring, then run
// the epilogue, each warp through its own 16 rows of the staging tile.
template <class Cfg>
__device__ __forceinline__ void consume(const MoeGemmArgs& args, const SmemPlan<Cfg>& smem) {
  using namespace cute;
  constexpr int S = Cfg::kStages;
  Tensor sA = make_tensor(make_smem_ptr(smem.a), typename Cfg::SmemLayoutA{});                  // (BM,BK,S)
  // What the wgmma reads as B: the ring's stages, or (int8) the two 16-bit slots the consumers convert into.
  Tensor sB = [&] {
    if constexpr (Cfg::kS8) return make_tensor(make_smem_ptr(smem.cvt), typename Cfg::SmemLayoutCvt{});  // (.., 2)
    else return make_tensor(make_smem_ptr(smem.b), typename Cfg::SmemLayoutB{});                      // (.., S)
  }();
  const int consumer_tid = static_cast<int>(threadIdx.x) - 128;
  const int warp_group = __shfl_sync(0xffffffff, consumer_tid / 128, 0);
  const int lane = consumer_tid % 32;
  const int warp = __shfl_sync(0xffffffff, consumer_tid / 32 % 4, 0);  // in its warpgroup
  typename Cfg::TiledMma mma;
  auto wg_mma = mma.get_slice(warp_group * 128);
  Tensor tCrA = wg_mma.make_fragment_A(wg_mma.partition_A(sA));     // (MMA,MMA_M,MMA_K,S) smem descriptors
  Tensor tCrB = wg_mma.make_fragment_B(wg_mma.partition_B(sB));     // (MMA,MMA_N,MMA_K,S)
  auto acc = partition_fragment_C(mma, Shape<Int<Cfg::kBlockM>, Int<Cfg::kRowsB>>{});

  TileScheduler<Cfg> sched(args);
  const ClusterCoord cluster = cluster_coord<Cfg>();
  const int k_tiles = (args.k + Cfg::kBlockK - 1) / Cfg::kBlockK;
  RingState<S> ring;
  int slot = 0;  // int8: the 16-bit B slot of the next k-tile (alternating across tiles too)
  int m_group, n_block;
  for (int u = cluster.id; sched.coords(args, u, m_group, n_block); u += cluster.count) {
    const UnitRole role = unit_role<Cfg>(args, sched, m_group, cluster.rank);
    if (role.skip) continue;
    const int e = role.expert;
    const int m0 = role.m_block * Cfg::kBlockM;
    const int n0 = n_block * Cfg::kBlockN;
    // This warp's rows in the tile (one row group of A) and their slots (GEMM2 scales and scatters by slot).
    const int warp_row0 = warp_group * 64 + warp * 16;
    const int row_slot = e >= 0 ? load_warp_row_slot(args, m0 + warp_row0, lane) : 0;
    // Idle: no tile for this CTA in the unit (its cluster peer has one), or this is the second warpgroup and its 64
    // rows are all padding (the tail of an expert's last block): then the first warpgroup has the tensor cores to
    // itself. An idle warpgroup keeps the ring in step, releasing each stage as soon as it lands.
    // The vote makes the branch visibly warp-uniform, so the main loop below stays free of divergence.
    // With int8 weights an idle warpgroup still converts its share of every B tile (in the main loop below).
    const bool idle = __all_sync(0xffffffffu, e < 0 || (warp_group == 1 && upper_half_is_padding(args, m0)));
    if (idle && !Cfg::kS8) {
      for (int kt = 0; kt < k_tiles; ++kt) {
        cutlass::arch::ClusterBarrier::wait(&smem.full[ring.stage], ring.phase);
        release_stage<Cfg>(&smem.empty[ring.stage], lane);
        ring.advance();
      }
      if (e >= 0) count_tile_stored<Cfg>(args, role.m_block, lane);
      continue;
    }
    clear(acc);
    cute::warpgroup_fence_operand(acc);
    int previous = -1;  // stage whose wgmma may still run
    for (int kt = 0; kt < k_tiles; ++kt) {
      cutlass::arch::ClusterBarrier::wait(&smem.full[ring.stage], ring.phase);
      int b_stage = ring.stage;
      if constexpr (Cfg::kS8) {
        // The slot's last reader, the wgmma of two k-tiles ago, retired in both warpgroups (kSlotFree below).
        convert_b_stage<Cfg>(smem, ring.stage, slot, consumer_tid);
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by the wgmma (async proxy)
        consumer_sync(kSlotConverted, 128 * Cfg::kConsumerWarpGroups);
        b_stage = slot;
        slot ^= 1;
      }
      if (!Cfg::kS8 || !idle) {
        cute::warpgroup_fence_operand(acc);
        mma_stage<Cfg>(mma, ring.stage, b_stage, tCrA, tCrB, acc);
        cute::warpgroup_wait<1>();  // the batch of k-tile kt-1 retired: its stage (and int8 slot) can be refilled
        cute::warpgroup_fence_operand(acc);
      }
      if (previous >= 0) release_stage<Cfg>(&smem.empty[previous], lane);
      previous = ring.stage;
      ring.advance();
      if constexpr (Cfg::kS8) consumer_sync(kSlotFree, 128 * Cfg::kConsumerWarpGroups);
    }
    cute::warpgroup_wait<0>();
    cute::warpgroup_fence_operand(acc);
    release_stage<Cfg>(&smem.empty[previous], lane);

    // An opaque copy of the thread index, made here: the epilogue's thread-dependent addresses are then computed
    // per tile instead of being hoisted out of the tile loop, where they would sit next to the accumulators
    // through the main loop and push ptxas (capped at 65536 / 384 registers) into spilling.
    int epilogue_tid = consumer_tid;
    asm volatile("" : "+r"(epilogue_tid));
    // A warp whose 16 rows are all padding stores nothing: the producer may not have loaded their row group of A,
    // and no GEMM keeps a padding row's result (GEMM2 may load inter rows that GEMM1 did not write: padding only).
    if (!is_real_slot(__shfl_sync(0xffffffffu, row_slot, 0), args.num_slots)) {
      count_tile_stored<Cfg>(args, role.m_block, lane);
      continue;
    }
    // The staging round trip is warp-local (a warp stages and stores only its own 16 rows), so __syncwarp orders
    // it: before, this warp's reads of the last tile are done; after, its writes of this tile are visible.
    __syncwarp();
    epilogue_to_staging<Cfg>(args, acc, smem.staging, epilogue_tid, row_slot, n0, e);
    __syncwarp();
    store_warp_rows<Cfg>(args, smem.staging, warp_row0, epilogue_tid % 32, row_slot, m0, n0);
    count_tile_stored<Cfg>(args, role.m_block, lane);
  }
}

// GEMM1 with direct rows leaves tmap_a and tmap_a_group unused (zeros); the other launches leave tmap_x_rows unused.
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    moe_gemm_sm90ws_kernel(const __grid_constant__ CUtensorMap tmap_a,        // A [m_pad_max, K], box [BM, BK]
                           const __grid_constant__ CUtensorMap tmap_a_group,  // the same A, box [16, BK]
                           const __grid_constant__ CUtensorMap tmap_x_rows,   // GEMM1's x [T, K], box [1, BK]
                           const __grid_constant__ CUtensorMap tmap_b,  // B [E * n_b, K], box [BN, BK]
                           const __grid_constant__ MoeGemmArgs args) {
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset on smem_raw, not by rounding an integer: the compiler then still knows every pointer
  // below is shared memory and accesses the staging tile with LDS/STS rather than generic loads and stores.
  const uint32_t misalign = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(smem_raw)) % Cfg::kSwizzleAlign;
  uint8_t* base = smem_raw + (Cfg::kSwizzleAlign - misalign) % Cfg::kSwizzleAlign;
  const SmemPlan<Cfg> smem(base);
  const bool direct = uses_direct_rows<Cfg>(args);
  if (threadIdx.x == 0) {
    for (int s = 0; s < Cfg::kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full[s], direct ? 2 : 1);  // + produce_direct_rows
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], Cfg::kEmptyArrivals);
    }
    cutlass::arch::fence_barrier_init();
  }
  // Every CTA of the cluster sees every barrier initialised before anyone arrives on it or multicasts to it. The
  // roles below never wait for each other's threads again until the exit.
  if constexpr (Cfg::kCluster == 1) {
    __syncthreads();
  } else {
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
  }
  // Launched with PDL (common/pdl.cuh): the set-up above overlapped the previous kernel; its outputs (the sorted
  // order, a_sorted or inter) are read only from here on. GEMM2 with block_done waits per A block instead (see the
  // top of this file).
  const bool per_block = Cfg::kGemm2 && args.block_done != nullptr;
  if (per_block) {
    pdl_launch_dependents();
  } else {
    pdl_start();
  }

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) {
      if (!direct) {
        cute::prefetch_tma_descriptor(&tmap_a);
        cute::prefetch_tma_descriptor(&tmap_a_group);
      }
      cute::prefetch_tma_descriptor(&tmap_b);
      produce<Cfg>(args, &tmap_a, &tmap_a_group, &tmap_b, smem);
    } else if (direct && threadIdx.x / 32 == 1) {
      if (threadIdx.x == 32) cute::prefetch_tma_descriptor(&tmap_x_rows);
      produce_direct_rows<Cfg>(args, &tmap_x_rows, smem, static_cast<int>(threadIdx.x) % 32);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    consume<Cfg>(args, smem);
  }
  if (per_block && threadIdx.x == 0) pdl_wait();  // this grid ends after GEMM1's, as with pdl_start
  if constexpr (Cfg::kCluster > 1) cluster_sync_unaligned();  // the peer may still arrive on this CTA's barriers
}

// Host side: GEMM1 given a_sorted first gathers x into it; then one persistent CTA per SM (at most one per tile).
// Never synchronises; bad arguments throw (pybind11 turns std::invalid_argument into ValueError).
template <typename T, typename Operand, typename Weight, Act A, GemmMode Mode, int BM, int BN, int BK, int Stages,
          int ClusterM>
void launch(const MoeGemmArgs& args, cudaStream_t stream) {
  static_assert(Mode == GemmMode::gemm1 || A == Act::Identity, "GEMM2 is rendered with act=Identity");
  using Cfg = Config<T, Operand, Weight, A, Mode, BM, BN, BK, Stages, ClusterM>;
  if (Cfg::kFp8 && (args.acc_scale == nullptr || (Mode == GemmMode::gemm1 && args.out_scale == nullptr))) {
    throw std::invalid_argument("moe_gemm sm90ws: FP8 needs acc_scale (and out_scale for GEMM1), got nullptr");
  }
  if (Cfg::kS8 && args.w_scale == nullptr) {
    throw std::invalid_argument("moe_gemm sm90ws: int8 weights need w_scale (per-channel scales), got nullptr");
  }
  if (args.k_splits > 1) {
    throw std::invalid_argument("moe_gemm sm90ws: k_splits: expected 1 (this kernel does not split K), got " +
                                std::to_string(args.k_splits));
  }
  if (Mode == GemmMode::gemm2 && args.block_done != nullptr && args.block_done_n_blocks <= 0) {
    throw std::invalid_argument("moe_gemm sm90ws: block_done_n_blocks: expected GEMM1's N blocks (> 0) with "
                                "block_done, got " + std::to_string(args.block_done_n_blocks));
  }
  const int64_t m_blocks = args.m_pad_max / BM;
  const int64_t n_blocks = (args.n + BN - 1) / BN;
  if (m_blocks <= 0 || n_blocks <= 0 || args.num_slots <= 0 || args.k <= 0) return;
  const int sms = sm_count();
  constexpr CUtensorMapDataType kDtype = tma_dtype<Operand>();
  // A: GEMM2's inter, GEMM1's gathered copy of x, or (GEMM1 without a_sorted: direct rows) x itself, row by row.
  CUtensorMap tmap_a{}, tmap_a_group{}, tmap_x_rows{};
  const void* a = args.a;
  if constexpr (Mode == GemmMode::gemm1) {
    if (args.a_sorted == nullptr) {
      tmap_x_rows = make_tma_map_2d(args.a, kDtype, Cfg::kOp, args.num_slots / args.topk, args.k, 1);
      a = nullptr;
    } else if (args.slot_rows == nullptr) {
      throw std::invalid_argument("moe_gemm sm90ws: slot_rows: expected a [num_slots] int32 tensor with a_sorted "
                                  "(GEMM1 gathers x through it), got None");
    } else {
      launch_gather(args.a, args.sorted_ids, args.num_padded, args.slot_rows, args.slot_rows_filled, args.a_sorted,
                    args.m_pad_max, args.num_slots, args.topk, args.k * Cfg::kOp, sms * 8, stream);
      a = args.a_sorted;
    }
  }
  if (a != nullptr) {
    tmap_a = make_tma_map_2d(a, kDtype, Cfg::kOp, args.m_pad_max, args.k, BM);
    tmap_a_group = make_tma_map_2d(a, kDtype, Cfg::kOp, args.m_pad_max, args.k, Cfg::kBoxRowsA);
  }
  const int64_t b_rows = static_cast<int64_t>(args.num_experts) * args.n * Cfg::kHalves;
  // int8 B: [kBoxRowsB, 64 bytes] boxes, unswizzled (the consumers convert them into swizzled 16-bit slots).
  const CUtensorMap tmap_b =
      Cfg::kS8 ? make_tma_map_2d(args.b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, b_rows, args.k, Cfg::kBoxRowsB, BK,
                                 CU_TENSOR_MAP_SWIZZLE_NONE)
               : make_tma_map_2d(args.b, kDtype, Cfg::kOp, b_rows, args.k, Cfg::kBoxRowsB);
  // One cluster per unit at most, and at most one CTA per SM (clusters that do not fit wait: no CTA waits on
  // another cluster, so this never deadlocks).
  const int64_t units = (m_blocks + Cfg::kCluster - 1) / Cfg::kCluster * n_blocks;
  const int64_t clusters = units < sms / Cfg::kCluster ? units : sms / Cfg::kCluster;
  // A failure here (tile too large for this GPU) makes the launch fail too; the binding reports it.
  set_max_dynamic_smem_once<&moe_gemm_sm90ws_kernel<Cfg>>(Cfg::kSmemBytes);
  const dim3 grid(static_cast<unsigned>((clusters > 0 ? clusters : 1) * Cfg::kCluster));
  launch_pdl(moe_gemm_sm90ws_kernel<Cfg>, {grid, Cfg::kThreads, Cfg::kSmemBytes, Cfg::kCluster}, stream, tmap_a,
             tmap_a_group, tmap_x_rows, tmap_b, args);
}

}  // namespace jitmoe::moe::sm90ws
