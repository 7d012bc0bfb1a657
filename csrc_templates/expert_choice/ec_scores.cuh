// Expert Choice scores, computed with a fixed fp32 recipe that the pure-torch reference
// (jitmoe/reference/expert_choice.py) reproduces bit for bit, so that GPU and CPU routings are identical even when
// two tokens' scores differ in the last bit (an expert compares scores of different tokens, whose softmax
// denominators differ; any unspecified rounding would flip such near-ties between implementations).
//   exp(x), x <= 0:  0 when x < -87 or NaN; else n = floor(x * log2e + 1/2), r = (x - n * ln2_hi) - n * ln2_lo,
//                    a degree-7 Taylor polynomial of e^r in Horner form, times 2^n (exact). Every multiply and add
//                    is rounded on its own (the _rn intrinsics are never contracted into FMAs), as torch's
//                    elementwise float32 ops are. Error <= 2 ulp of the true exp.
//   sums:            lane-strided partial sums in index order, then a halving tree over the lanes
//                    (kExpertLanes = 32 lanes over a token's experts, kTokenLanes = 1024 over an expert's tokens).
//   score:           exp(logit - max) * (1 / sum), the reciprocal rounded to nearest.
#pragma once
#include "expert_choice/ec_block.cuh"

namespace jitmoe::ec {

constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e4p-1f;     // 15 significant bits: n * kLn2Hi is exact for |n| <= 126
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kExpUnderflow = -87.0f;    // below this the result would not be a normal float

// Branch-free (the row passes call it for every score).
__device__ __forceinline__ float fixed_exp(float x) {
  const bool in_range = x >= kExpUnderflow;  // false for NaN
  x = in_range ? x : 0.0f;
  const float n = floorf(__fadd_rn(__fmul_rn(x, kLog2e), 0.5f));  // in [-126, 0] for x in [-87, 0]
  const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, kLn2Hi)), __fmul_rn(n, kLn2Lo));
  float poly = 0x1.a01a02p-13f;                                   // 1/7!
  poly = __fadd_rn(__fmul_rn(poly, r), 0x1.6c16c2p-10f);          // 1/6!
  poly = __fadd_rn(__fmul_rn(poly, r), 0x1.111112p-7f);           // 1/5!
  poly = __fadd_rn(__fmul_rn(poly, r), 0x1.555556p-5f);           // 1/4!
  poly = __fadd_rn(__fmul_rn(poly, r), 0x1.555556p-3f);           // 1/3!
  poly = __fadd_rn(__fmul_rn(poly, r), 0.5f);
  poly = __fadd_rn(__fmul_rn(poly, r), 1.0f);
  poly = __fadd_rn(__fmul_rn(poly, r), 1.0f);
  // Out of range the scale is 0 (x was replaced by 0, so poly is 1): a select on the scale, where a select on the
  // result let the compiler branch around the polynomial, one branch per score, and serialise a row's exps.
  const float scale = in_range ? __int_as_float((static_cast<int>(n) + 127) << 23) : 0.0f;
  return __fmul_rn(poly, scale);
}

// One softmax term exp(logit - max) of a row or column whose maximum is max_logit.
__device__ __forceinline__ float softmax_term(float logit, float max_logit) {
  return fixed_exp(__fsub_rn(logit, max_logit));
}

__device__ __forceinline__ float score_of(float logit, float max_logit, float rcp_sum) {
  return __fmul_rn(softmax_term(logit, max_logit), rcp_sum);
}

// (max logit, 1 / softmax denominator) of a token's row, on every lane of the warp, in the sum order above.
template <typename In>
__device__ float2 row_softmax_stats(const In* row, int E) {
  const int lane = lane_id();
  float mx = -INFINITY;
  for (int e = lane; e < E; e += kExpertLanes) mx = fmaxf(mx, to_float(__ldg(row + e)));
  mx = warp_max_f32(mx);
  float sum = 0.0f;  // lane `lane` of kExpertLanes: experts lane, lane + 32, ... in order
  for (int e = lane; e < E; e += kExpertLanes) sum = __fadd_rn(sum, softmax_term(to_float(__ldg(row + e)), mx));
  sum = warp_sum_tree_f32(sum);
  return make_float2(mx, __frcp_rn(sum));
}

// Row statistics of token t, for the selectors and finalizers that recompute its scores.
template <typename In>
__device__ __forceinline__ void store_row_stats(const Params<In>& p, long long t, float mx, float rcp) {
  if (lane_id() == 0) {
    p.row_max[t] = mx;
    p.row_rcp[t] = rcp;
  }
}

// Row of token t for E <= 32 * NCH: lane holds experts lane + 32j (-inf past E; kFull: E == 32 * NCH, no checks,
// and every load an immediate offset from one address).
template <typename In, int NCH, bool kFull = false>
__device__ __forceinline__ void load_row(const Params<In>& p, int t, float (&v)[NCH]) {
  const In* row = p.logits + static_cast<size_t>(t) * p.E + lane_id();  // [E] row of token t, from this lane's expert
#pragma unroll
  for (int j = 0; j < NCH; ++j)
    v[j] = kFull || lane_id() + 32 * j < p.E ? to_float(__ldg(row + 32 * j)) : -INFINITY;
}

// R loaded rows' softmax statistics (stored for token t[r] when store[r]) and scores, each step over all the rows
// before the next (independent chains for the scheduler): v[r] becomes row r's scores (0 past E), in the order of
// row_softmax_stats.
template <typename In, int NCH, int R>
__device__ __forceinline__ void score_loaded_rows(const Params<In>& p, const int (&t)[R], float (&v)[R][NCH],
                                                  const bool (&store)[R]) {
  float mx[R], sum[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    mx[r] = -INFINITY;
#pragma unroll
    for (int j = 0; j < NCH; ++j) mx[r] = fmaxf(mx[r], v[r][j]);
  }
  warp_max_f32_rows<R>(mx);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    sum[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      v[r][j] = softmax_term(v[r][j], mx[r]);  // now the term (0 past E, where v is -inf)
      sum[r] = __fadd_rn(sum[r], v[r][j]);
    }
  }
  warp_sum_tree_f32_rows<R>(sum);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float rcp = __frcp_rn(sum[r]);
    if (store[r]) store_row_stats(p, t[r], mx[r], rcp);
#pragma unroll
    for (int j = 0; j < NCH; ++j) v[r][j] = __fmul_rn(v[r][j], rcp);  // now the score
  }
}

// One loaded row's statistics (stored for token t when store_stats) and scores.
template <typename In, int NCH>
__device__ __forceinline__ void score_loaded_row(const Params<In>& p, int t, float (&v)[NCH], bool store_stats = true) {
  const int ts[1] = {t};
  const bool store[1] = {store_stats};
  score_loaded_rows<In, NCH, 1>(p, ts, reinterpret_cast<float (&)[1][NCH]>(v), store);
}

}  // namespace jitmoe::ec
