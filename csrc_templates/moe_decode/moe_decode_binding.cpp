// Torch binding of the decode path: tensors -> DecodeArgs -> launch. Python (jitmoe/ops/moe_decode.py) validates.
// The FP8 scales are None but for e4m3 operands, the weight scales None but for int8 weights.
#include "common/torch_binding.h"
#include "moe_decode/moe_decode_args.h"

#include <optional>

namespace {

using jitmoe::ptr_or_null;

void run(const at::Tensor& x, const at::Tensor& fc1, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& inter,
         const at::Tensor& fc2, const std::optional<at::Tensor>& fc2_bias, const at::Tensor& out,
         const at::Tensor& topk_ids, const at::Tensor& slot_weights, const std::optional<at::Tensor>& act_alpha,
         const std::optional<at::Tensor>& act_beta, const std::optional<at::Tensor>& act_limit,
         int64_t expert_offset, const std::optional<at::Tensor>& fc1_dequant,
         const std::optional<at::Tensor>& fc2_quant, const std::optional<at::Tensor>& fc2_dequant,
         const std::optional<at::Tensor>& fc1_wscale, const std::optional<at::Tensor>& fc2_wscale) {
  const c10::cuda::CUDAGuard guard(x.device());
  jitmoe::moe_decode::DecodeArgs a{};
  a.x = x.data_ptr();
  a.fc1 = fc1.data_ptr();
  a.fc1_bias = ptr_or_null<void>(fc1_bias);
  a.inter = inter.data_ptr();
  a.fc2 = fc2.data_ptr();
  a.fc2_bias = ptr_or_null<void>(fc2_bias);
  a.out = out.data_ptr();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.slot_weights = slot_weights.data_ptr<float>();
  a.act_alpha = ptr_or_null<float>(act_alpha);
  a.act_beta = ptr_or_null<float>(act_beta);
  a.act_limit = ptr_or_null<float>(act_limit);
  a.num_tokens = static_cast<int>(x.size(0));
  a.topk = static_cast<int>(topk_ids.size(1));
  a.hidden = static_cast<int>(x.size(1));
  a.inter_size = static_cast<int>(fc2.size(2));
  a.num_experts = static_cast<int>(fc2.size(0));
  a.expert_offset = static_cast<int>(expert_offset);
  jitmoe::moe_decode::DecodeScales f{};
  f.fc1_dequant = ptr_or_null<float>(fc1_dequant);
  f.fc2_quant = ptr_or_null<float>(fc2_quant);
  f.fc2_dequant = ptr_or_null<float>(fc2_dequant);
  f.fc2_quant_stride = fc2_quant.has_value() && fc2_quant->numel() > 1 ? 1 : 0;
  f.fc1_wscale = ptr_or_null<void>(fc1_wscale);
  f.fc2_wscale = ptr_or_null<void>(fc2_wscale);
  f.wscale_fp32 = fc1_wscale.has_value() && fc1_wscale->scalar_type() == at::kFloat ? 1 : 0;
  jitmoe::moe_decode::launch_decode(a, f, jitmoe::current_stream(x));
  JITMOE_CHECK_LAUNCH("moe_decode");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
