// Rendered per spec (dtype ${dtype}, top-k bucket ${kmax}): the plain C++ launcher the binding calls. No torch here.
#include <cstdint>
#include "routing/topk_route.cuh"

void topk_route_launch(const void* logits /* [T, E] */, const float* bias /* [E] or null */,
                       float* weights /* [T, k] */, int32_t* ids /* [T, k] */,
                       int32_t* token_expert_indices /* [T, k] or null */, int64_t num_tokens, int num_experts,
                       int k, int scoring, bool renormalize, cudaStream_t stream) {
  using Elem = jitmoe::dtype_${dtype};
  jitmoe::routing::TopkParams p{};
  p.logits = logits;
  p.bias = bias;
  p.weights = weights;
  p.ids = ids;
  p.token_expert_indices = token_expert_indices;
  p.num_tokens = num_tokens;
  p.num_experts = num_experts;
  p.k = k;
  p.scoring = scoring;
  p.renormalize = renormalize;
  p.vec16 = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && num_experts % (16 / sizeof(Elem)) == 0;
  jitmoe::routing::launch_topk_route<Elem, ${kmax}>(p, stream);
}
