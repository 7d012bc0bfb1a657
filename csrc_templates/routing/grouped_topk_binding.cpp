// Thin torch binding of grouped_topk_launch: outputs are allocated and every argument is validated in Python
// (jitmoe/ops/routing.py); data_ptr<T>() still rejects a wrong output dtype.
#include "common/torch_binding.h"

void grouped_topk_launch(const void* logits, const float* bias, float* weights, int32_t* ids, int64_t num_tokens,
                         int num_experts, int k, int n_group, int topk_group, int scoring, bool renormalize,
                         float routed_scaling_factor, cudaStream_t stream);

namespace {

void run(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& weights,
         const at::Tensor& ids, int64_t topk, int64_t n_group, int64_t topk_group, int64_t scoring, bool renormalize,
         double routed_scaling_factor) {
  const c10::cuda::CUDAGuard guard(logits.device());
  grouped_topk_launch(logits.data_ptr(), bias ? bias->data_ptr<float>() : nullptr, weights.data_ptr<float>(),
                      ids.data_ptr<int32_t>(), logits.size(0), static_cast<int>(logits.size(1)),
                      static_cast<int>(topk), static_cast<int>(n_group), static_cast<int>(topk_group),
                      static_cast<int>(scoring), renormalize, static_cast<float>(routed_scaling_factor),
                      jitmoe::current_stream(logits));
  JITMOE_CHECK_LAUNCH("grouped_topk");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run, "DeepSeek-style grouped top-k into given outputs"); }
