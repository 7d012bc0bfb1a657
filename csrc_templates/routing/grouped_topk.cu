// Rendered per spec (dtype ${dtype}): the plain C++ launcher the binding calls. No torch here.
#include <cstdint>
#include "routing/grouped_topk.cuh"

void grouped_topk_launch(const void* logits /* [T, E] */, const float* bias /* [E] or null */,
                         float* weights /* [T, k] */, int32_t* ids /* [T, k] */, int64_t num_tokens,
                         int num_experts, int k, int n_group, int topk_group, int scoring, bool renormalize,
                         float routed_scaling_factor, cudaStream_t stream) {
  using Elem = jitmoe::dtype_${dtype};
  jitmoe::routing::GroupedParams p{};
  p.logits = logits;
  p.bias = bias;
  p.weights = weights;
  p.ids = ids;
  p.num_tokens = num_tokens;
  p.num_experts = num_experts;
  p.k = k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.scoring = scoring;
  p.renormalize = renormalize;
  p.vec16 = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && num_experts % (16 / sizeof(Elem)) == 0;
  p.routed_scaling_factor = routed_scaling_factor;
  jitmoe::routing::launch_grouped_topk<Elem>(p, stream);
}
