// Thin torch binding of the Expert Choice launcher; Python validated every argument and allocated the outputs.
#include <optional>

#include "common/torch_binding.h"
#include <ATen/ops/empty.h>

int64_t expert_choice_workspace_words(int64_t T, int64_t E, int64_t capacity, int64_t top_k, bool tokens_softmax,
                                      bool expert_major, int64_t path, const char** error);
const char* expert_choice_launch(const void* logits, const bool* token_mask, int64_t T, int64_t E, int64_t capacity,
                                 int64_t top_k, bool tokens_softmax, bool fallback_topk, bool expert_major,
                                 int64_t path, int32_t* workspace, float* weights, int32_t* ids, int32_t* counts,
                                 cudaStream_t stream);

// Token-major: weights [T, top_k] fp32, ids [T, top_k] int32; expert-major: weights / ids [E, capacity];
// counts [E] int32. path: 0 = auto, 1 = whole columns, 2 = candidates (tests and benchmarks force one).
void run(const at::Tensor& logits, const std::optional<at::Tensor>& token_mask, at::Tensor& weights,
         at::Tensor& ids, at::Tensor& counts, int64_t capacity, int64_t top_k, bool tokens_softmax,
         bool fallback_topk, bool expert_major, int64_t path) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  const char* error = nullptr;
  const int64_t words =
      expert_choice_workspace_words(T, E, capacity, top_k, tokens_softmax, expert_major, path, &error);
  TORCH_CHECK_VALUE(error == nullptr, "jitmoe expert_choice: ", error);
  at::Tensor workspace = at::empty({words}, logits.options().dtype(at::kInt));
  error = expert_choice_launch(
      logits.data_ptr(), token_mask.has_value() ? token_mask->data_ptr<bool>() : nullptr, T, E, capacity, top_k,
      tokens_softmax, fallback_topk, expert_major, path, workspace.data_ptr<int32_t>(), weights.data_ptr<float>(),
      ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), jitmoe::current_stream(logits));
  TORCH_CHECK(error == nullptr, "jitmoe expert_choice: ", error);
  JITMOE_CHECK_LAUNCH("expert_choice");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
