// Torch binding of one grouped-GEMM spec (shared by the SM80 and SM90 sources): tensors -> MoeGemmArgs -> launch.
// Python (jitmoe/ops/moe_gemm.py) validates shapes, dtypes, devices and alignment and preallocates `out`.
#include "common/torch_binding.h"
#include "moe/moe_gemm_args.cuh"

#include <optional>

namespace {

using jitmoe::ptr_or_null;

void run(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, const at::Tensor& out,
         const at::Tensor& sorted_ids, const at::Tensor& block_expert, const at::Tensor& num_padded,
         const std::optional<at::Tensor>& slot_weights, const std::optional<at::Tensor>& act_alpha,
         const std::optional<at::Tensor>& act_beta, const std::optional<at::Tensor>& act_limit, int64_t num_slots,
         int64_t topk, int64_t n, int64_t k, const std::optional<at::Tensor>& partials,
         const std::optional<at::Tensor>& a_sorted, const std::optional<at::Tensor>& slot_rows, bool slot_rows_filled,
         int64_t k_splits, const std::optional<at::Tensor>& acc_scale, const std::optional<at::Tensor>& out_scale,
         const std::optional<at::Tensor>& w_scale, const std::optional<at::Tensor>& block_done,
         int64_t block_done_n_blocks) {
  const c10::cuda::CUDAGuard guard(a.device());
  jitmoe::moe::MoeGemmArgs args{};
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.bias = ptr_or_null<void>(bias);
  args.out = out.data_ptr();
  args.sorted_ids = sorted_ids.data_ptr<int32_t>();
  args.block_expert = block_expert.data_ptr<int32_t>();
  args.num_padded = num_padded.data_ptr<int32_t>();
  args.slot_weights = ptr_or_null<float>(slot_weights);
  args.act_alpha = ptr_or_null<float>(act_alpha);
  args.act_beta = ptr_or_null<float>(act_beta);
  args.act_limit = ptr_or_null<float>(act_limit);
  args.acc_scale = ptr_or_null<float>(acc_scale);
  args.out_scale = ptr_or_null<float>(out_scale);
  args.out_scale_stride = out_scale.has_value() && out_scale->numel() > 1 ? 1 : 0;
  args.w_scale = ptr_or_null<void>(w_scale);
  args.w_scale_fp32 = w_scale.has_value() && w_scale->scalar_type() == at::kFloat;
  args.partials = partials.has_value() ? partials->data_ptr<float>() : nullptr;
  args.a_sorted = a_sorted.has_value() ? a_sorted->data_ptr() : nullptr;
  args.slot_rows = slot_rows.has_value() ? slot_rows->data_ptr<int32_t>() : nullptr;
  args.slot_rows_filled = slot_rows_filled;
  args.block_done = block_done.has_value() ? block_done->data_ptr<int32_t>() : nullptr;
  args.block_done_n_blocks = static_cast<int>(block_done_n_blocks);
  args.num_slots = static_cast<int>(num_slots);
  args.topk = static_cast<int>(topk);
  args.m_pad_max = static_cast<int>(sorted_ids.numel());
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.num_experts = static_cast<int>(b.size(0));
  args.k_splits = static_cast<int>(k_splits);
  jitmoe::moe::moe_gemm_launch(args, jitmoe::current_stream(a));
  JITMOE_CHECK_LAUNCH("moe_gemm");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
