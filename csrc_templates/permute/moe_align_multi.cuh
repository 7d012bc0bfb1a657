// moe_align, many CTAs in one launch (large slot counts): the same output as the single-CTA kernel
// (moe_align.cuh), bit for bit.
//
// The slots are cut into num_chunks chunks of chunk_slots. The grid has 2 * num_chunks CTAs; each takes a
// ticket (atomicAdd at its start), and the ticket, not blockIdx, gives its role, so a CTA only ever waits for
// CTAs that took a lower ticket and are therefore already running: no deadlock whatever the residency.
//   counters (tickets [0, G)):  count chunk `ticket` into a shared histogram and store it as row `ticket` of
//       scratch [G][E]; then bump `counted`. The counter that bumps it last is the scanner: for every expert it
//       turns its column into exclusive prefixes over the chunks (the expert's slots before each chunk) and its
//       total; a block scan of the padded totals gives each expert's start row. It writes starts, expert_counts
//       and num_padded, then releases `scanned`.
//   placers (tickets [G, 2G)):  chunk c = ticket - G. Before waiting, each warp counts its slice of the chunk
//       into its own shared row and the columns become exclusive prefixes over the warps (that work overlaps the
//       counters). After `scanned`, cursor[w][e] += starts[e] + scratch[c][e], and the warps place their slices
//       with the walk they counted with (align_common.cuh): rows per expert follow slot order. Each placer then
//       fills its share of the padding rows, block_expert and the unused tail.
// Cross-CTA data is written before a fence + atomic (or release store) and read with ld.global.cg after the
// matching atomic (or acquire load), so no stale L1 line is ever read. The last CTA to leave zeroes the four
// sync words again, so the next launch (or graph replay) on the same workspace starts clean.
#pragma once
#include <cstdint>

#include "permute/align_common.cuh"

namespace jitmoe::permute {

constexpr int kMultiThreads = 512;
constexpr int kMultiWarps = kMultiThreads / 32;
constexpr int kColumnBatch = 8;  // column loads issued together (the scan walks columns of scratch in L2)

enum SyncWord { kTicket = 0, kCounted = 1, kScanned = 2, kExited = 3, kNumSyncWords = 4 };

struct MultiAlignArgs {
  AlignArgs a;       // count_warps <= kMultiWarps: placer warps with a slice (each needs E ints of shared memory)
  int32_t* sync;     // [kNumSyncWords] zero before the launch; zero again when it ends
  int32_t* scratch;  // [num_chunks + 1][num_experts]: chunk counts -> slots before the chunk; last row start rows
  int num_chunks;    // G; chunk c holds the slots [c * chunk_slots, (c + 1) * chunk_slots) below num_slots
  int chunk_slots;   // a multiple of 32
};

__device__ __forceinline__ int load_acquire(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(int32_t* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void chunk_range(const MultiAlignArgs& m, int c, int* begin, int* end) {
  const long long b = static_cast<long long>(c) * m.chunk_slots, e = b + m.chunk_slots;
  *begin = static_cast<int>(b < m.a.num_slots ? b : m.a.num_slots);
  *end = static_cast<int>(e < m.a.num_slots ? e : m.a.num_slots);
}

// v[i] = counts[g0 + i][e] for the kColumnBatch chunks from g0 (0 past g_end), loads issued together. From L2:
// other CTAs of this launch wrote them.
__device__ __forceinline__ void load_column_batch(const int32_t* counts, int num_experts, int e, int g0, int g_end,
                                                  int (&v)[kColumnBatch]) {
#pragma unroll
  for (int i = 0; i < kColumnBatch; ++i) {
    v[i] = g0 + i < g_end ? __ldcg(counts + static_cast<long long>(g0 + i) * num_experts + e) : 0;
  }
}

// Sum of column e of counts [G][E] over the chunks [g_begin, g_end).
__device__ __forceinline__ int column_sum(const int32_t* counts, int num_experts, int e, int g_begin, int g_end) {
  int sum = 0;
  for (int g0 = g_begin; g0 < g_end; g0 += kColumnBatch) {
    int v[kColumnBatch];
    load_column_batch(counts, num_experts, e, g0, g_end, v);
#pragma unroll
    for (int i = 0; i < kColumnBatch; ++i) sum += v[i];
  }
  return sum;
}

// Replaces column e of counts over [g_begin, g_end) by exclusive prefixes that start at `running`.
__device__ __forceinline__ void column_to_prefix(int32_t* counts, int num_experts, int e, int g_begin, int g_end,
                                                 int running) {
  for (int g0 = g_begin; g0 < g_end; g0 += kColumnBatch) {
    int v[kColumnBatch];
    load_column_batch(counts, num_experts, e, g0, g_end, v);
#pragma unroll
    for (int i = 0; i < kColumnBatch; ++i) {
      if (g0 + i < g_end) {
        counts[static_cast<long long>(g0 + i) * num_experts + e] = running;
        running += v[i];
      }
    }
  }
}

// The scanner (the last counter, whole block). `lanes` adjacent threads share one expert, each walking a
// contiguous run of chunks, so short columns of many experts and long columns of few both keep threads busy.
__device__ __forceinline__ void scan_chunks(const MultiAlignArgs& m, int* scan_scratch) {
  const AlignArgs& a = m.a;
  const int num_chunks = m.num_chunks, num_experts = a.num_experts;
  int32_t* counts = m.scratch;                                                // [G][E]
  int32_t* starts = m.scratch + static_cast<long long>(num_chunks) * num_experts;  // [E]
  int lanes = 1;
  while (lanes < 32 && lanes * 2 * num_experts <= kMultiThreads) lanes *= 2;
  const int part = threadIdx.x & (lanes - 1);
  const int per_part = (num_chunks + lanes - 1) / lanes;
  const int g_begin = min(num_chunks, part * per_part), g_end = min(num_chunks, g_begin + per_part);
  int carry = 0;
  for (int first = 0; first < num_experts; first += kMultiThreads / lanes) {  // uniform: every thread iterates
    const int e = first + static_cast<int>(threadIdx.x) / lanes;
    const bool valid = e < num_experts;
    const int mine = valid ? column_sum(counts, num_experts, e, g_begin, g_end) : 0;
    int incl = mine;
    for (int o = 1; o < lanes; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, incl, o, lanes);
      if (part >= o) incl += up;
    }
    const int total = __shfl_sync(kFullMask, incl, lanes - 1, lanes);
    if (valid) column_to_prefix(counts, num_experts, e, g_begin, g_end, incl - mine);
    int round_total;
    const int padded = part == 0 ? round_up(total, a.block_m) : 0;
    const int start = carry + block_exclusive_scan<kMultiWarps>(padded, scan_scratch, &round_total);
    if (valid && part == 0) {
      starts[e] = start;
      a.expert_counts[e] = total;
    }
    carry += round_total;
  }
  if (threadIdx.x == 0) *a.num_padded = carry;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) store_release(m.sync + kScanned, 1);
}

// A counter: histogram of chunk c into scratch row c. Returns (uniformly) whether this block counted last.
__device__ __forceinline__ bool count_chunk(const MultiAlignArgs& m, int c, int* hist /* [E] */, int* flag) {
  const AlignArgs& a = m.a;
  for (int e = threadIdx.x; e < a.num_experts; e += kMultiThreads) hist[e] = 0;
  __syncthreads();
  int begin, end, slice_begin, slice_end;
  chunk_range(m, c, &begin, &end);
  warp_slice(begin, end, kMultiWarps, threadIdx.x >> 5, &slice_begin, &slice_end);
  count_slice<true>(a, slice_begin, slice_end, hist);
  __syncthreads();
  int32_t* row = m.scratch + static_cast<long long>(c) * a.num_experts;  // [E]
  for (int e = threadIdx.x; e < a.num_experts; e += kMultiThreads) row[e] = hist[e];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    *flag = atomicAdd(m.sync + kCounted, 1) == m.num_chunks - 1;
    __threadfence();
  }
  __syncthreads();
  return *flag != 0;
}

// One thread of the block waits for the scanner; the barrier then releases the others.
__device__ __forceinline__ void wait_for_scan(const MultiAlignArgs& m) {
  if (threadIdx.x == 0) {
    while (load_acquire(m.sync + kScanned) == 0) __nanosleep(64);
  }
  __syncthreads();
}

// A placer's share of block_expert, the padding rows and the unused tail (needs the scanner's results): warp w of
// placer c fills every (num_chunks * kMultiWarps)-th expert from c * kMultiWarps + w. Its lanes first load the
// counts and starts of up to 32 of those experts together, so the warp waits on L2 once per 32 experts.
__device__ __forceinline__ void fill_share(const MultiAlignArgs& m, int c) {
  const AlignArgs& a = m.a;
  const int lane = threadIdx.x & 31;
  const int32_t* starts = m.scratch + static_cast<long long>(m.num_chunks) * a.num_experts;  // [E]
  const int all_warps = m.num_chunks * kMultiWarps;
  for (int first = c * kMultiWarps + static_cast<int>(threadIdx.x >> 5); first < a.num_experts;
       first += 32 * all_warps) {
    const long long mine = first + static_cast<long long>(lane) * all_warps;
    const bool valid = mine < a.num_experts;
    const int count = valid ? __ldcg(a.expert_counts + mine) : 0, start = valid ? __ldcg(starts + mine) : 0;
    for (int i = 0; i < 32; ++i) {
      const long long e = first + static_cast<long long>(i) * all_warps;
      if (e >= a.num_experts) break;  // uniform
      fill_expert(a, static_cast<int>(e), __shfl_sync(kFullMask, count, i), __shfl_sync(kFullMask, start, i));
    }
  }
  fill_tail(a, __ldcg(a.num_padded), c * kMultiThreads + threadIdx.x, m.num_chunks * kMultiThreads);
}

// A placer: chunk c, table [count_warps][E] in shared memory.
__device__ __forceinline__ void place_chunk(const MultiAlignArgs& m, int c, int* table) {
  const AlignArgs& a = m.a;
  const int w = threadIdx.x >> 5;
  const int cells = a.count_warps * a.num_experts;
  for (int i = threadIdx.x; i < cells; i += kMultiThreads) table[i] = 0;
  __syncthreads();
  int begin, end, slice_begin = 0, slice_end = 0;
  chunk_range(m, c, &begin, &end);
  if (w < a.count_warps) warp_slice(begin, end, a.count_warps, w, &slice_begin, &slice_end);
  int* row = table + static_cast<long long>(w) * a.num_experts;  // [E] this warp's counts -> cursors
  count_slice<false>(a, slice_begin, slice_end, row);
  __syncthreads();
  for (int e = threadIdx.x; e < a.num_experts; e += kMultiThreads) {
    warp_column_prefix(table, a.count_warps, a.num_experts, e);
  }
  wait_for_scan(m);
  const int32_t* before = m.scratch + static_cast<long long>(c) * a.num_experts;       // [E]
  const int32_t* starts = m.scratch + static_cast<long long>(m.num_chunks) * a.num_experts;  // [E]
  for (int e = threadIdx.x; e < a.num_experts; e += kMultiThreads) {
    const int base = __ldcg(starts + e) + __ldcg(before + e);
    for (int v = 0; v < a.count_warps; ++v) table[static_cast<long long>(v) * a.num_experts + e] += base;
  }
  __syncthreads();
  place_slice(a, slice_begin, slice_end, row);
  fill_share(m, c);
}

// Every CTA ends here; the last one to arrive zeroes the sync words for the next launch.
__device__ __forceinline__ void leave(const MultiAlignArgs& m) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(m.sync + kExited, 1) == static_cast<int>(gridDim.x) - 1) {
      for (int i = 0; i < kNumSyncWords; ++i) atomicExch(m.sync + i, 0);
    }
  }
}

__global__ void __launch_bounds__(kMultiThreads) moe_align_multi_kernel(MultiAlignArgs m) {
  extern __shared__ int table[];  // counter: [E] chunk histogram; placer: [count_warps][E] counts -> cursors
  __shared__ int scan_scratch[kMultiWarps + 1];
  __shared__ int word;  // the block's ticket, then whether it counted last
  pdl_start();  // common/pdl.cuh: launched with launch_pdl; the sync words are the last launch's too
  if (threadIdx.x == 0) word = atomicAdd(m.sync + kTicket, 1);
  __syncthreads();
  const int ticket = word;
  __syncthreads();  // everyone has read the ticket before `word` is reused
  if (ticket < m.num_chunks) {
    if (count_chunk(m, ticket, table, &word)) scan_chunks(m, scan_scratch);
  } else {
    place_chunk(m, ticket - m.num_chunks, table);
  }
  leave(m);
}

}  // namespace jitmoe::permute
