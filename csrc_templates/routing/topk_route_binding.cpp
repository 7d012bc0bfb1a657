// Thin torch binding of topk_route_launch: outputs are allocated and every argument is validated in Python
// (jitmoe/ops/routing.py); data_ptr<T>() still rejects a wrong output dtype.
#include "common/torch_binding.h"

void topk_route_launch(const void* logits, const float* bias, float* weights, int32_t* ids,
                       int32_t* token_expert_indices, int64_t num_tokens, int num_experts, int k, int scoring,
                       bool renormalize, cudaStream_t stream);

namespace {

void run(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& weights,
         const at::Tensor& ids, const std::optional<at::Tensor>& token_expert_indices, int64_t topk, int64_t scoring,
         bool renormalize) {
  const c10::cuda::CUDAGuard guard(logits.device());
  topk_route_launch(logits.data_ptr(), bias ? bias->data_ptr<float>() : nullptr, weights.data_ptr<float>(),
                    ids.data_ptr<int32_t>(), token_expert_indices ? token_expert_indices->data_ptr<int32_t>() : nullptr,
                    logits.size(0), static_cast<int>(logits.size(1)), static_cast<int>(topk),
                    static_cast<int>(scoring), renormalize, jitmoe::current_stream(logits));
  JITMOE_CHECK_LAUNCH("topk_route");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run, "top-k softmax/sigmoid routing into given outputs"); }
