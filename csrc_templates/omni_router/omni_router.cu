// Omni router launchers for one specialization: logits ${dtype}, top-k bucket ${kb} (any k <= ${kb}).
#include "omni_router/omni_router.cuh"

using OmniElem = jitmoe::dtype_${dtype};
constexpr int kOmniKBucket = ${kb};

void omni_router_forward_launch(const void* x,     // [T, N]
                                const void* y,     // [T, N]
                                void* scores,      // [T, k]
                                int32_t* indices,  // [T, k]
                                int64_t num_tokens, int n, int top_k, cudaStream_t stream) {
  jitmoe::omni::launch_forward<OmniElem, kOmniKBucket>(x, y, scores, indices, num_tokens, n, top_k, stream);
}

void omni_router_backward_launch(const void* grad_scores,  // [T, k]
                                 const int32_t* indices,   // [T, k]
                                 void* grad_x,             // [T, N]
                                 void* grad_y,             // [T, N]
                                 int64_t num_tokens, int n, int top_k, cudaStream_t stream) {
  jitmoe::omni::launch_backward<OmniElem, kOmniKBucket>(grad_scores, indices, grad_x, grad_y, num_tokens, n, top_k,
                                                         stream);
}
