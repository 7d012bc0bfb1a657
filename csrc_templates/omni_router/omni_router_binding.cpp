// Thin torch binding of the Omni router launchers: inputs are validated and outputs allocated in Python
// (jitmoe/ops/omni_router.py); the checks here only guard the kernels against out-of-bounds reads and writes.
#include "common/torch_binding.h"

void omni_router_forward_launch(const void* x, const void* y, void* scores, int32_t* indices, int64_t num_tokens,
                                int n, int top_k, cudaStream_t stream);
void omni_router_backward_launch(const void* grad_scores, const int32_t* indices, void* grad_x, void* grad_y,
                                 int64_t num_tokens, int n, int top_k, cudaStream_t stream);

namespace {

void check_contiguous(std::initializer_list<at::Tensor> tensors, const char* what) {
  for (const auto& t : tensors) TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
}

void forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scores, const at::Tensor& indices) {
  check_contiguous({x, y, scores, indices}, "omni_router forward");
  TORCH_CHECK(y.sizes() == x.sizes() && scores.size(0) == x.size(0) && indices.sizes() == scores.sizes() &&
                  x.dtype() == y.dtype() && scores.dtype() == x.dtype(),
              "omni_router forward: shape or dtype mismatch");
  const c10::cuda::CUDAGuard guard(x.device());
  omni_router_forward_launch(x.data_ptr(), y.data_ptr(), scores.data_ptr(), indices.data_ptr<int32_t>(), x.size(0),
                             static_cast<int>(x.size(1)), static_cast<int>(scores.size(1)),
                             jitmoe::current_stream(x));
  JITMOE_CHECK_LAUNCH("omni_router_forward");
}

void backward(const at::Tensor& grad_scores, const at::Tensor& indices, const at::Tensor& grad_x,
              const at::Tensor& grad_y) {
  check_contiguous({grad_scores, indices, grad_x, grad_y}, "omni_router backward");
  TORCH_CHECK(indices.sizes() == grad_scores.sizes() && grad_y.sizes() == grad_x.sizes() &&
                  grad_x.size(0) == grad_scores.size(0) && grad_x.dtype() == grad_scores.dtype() &&
                  grad_y.dtype() == grad_scores.dtype(),
              "omni_router backward: shape or dtype mismatch");
  const c10::cuda::CUDAGuard guard(grad_scores.device());
  omni_router_backward_launch(grad_scores.data_ptr(), indices.data_ptr<int32_t>(), grad_x.data_ptr(),
                              grad_y.data_ptr(), grad_scores.size(0), static_cast<int>(grad_x.size(1)),
                              static_cast<int>(grad_scores.size(1)), jitmoe::current_stream(grad_scores));
  JITMOE_CHECK_LAUNCH("omni_router_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Omni router forward into given outputs");
  m.def("backward", &backward, "Omni router backward into given gradients");
}
