// Thin torch binding of the permute family. Python allocates and validates every tensor; this only unpacks them.
#include "common/torch_binding.h"

void moe_align_launch(const int32_t* topk_ids, int32_t* sorted_ids, int32_t* block_expert, int32_t* num_padded,
                      int32_t* expert_counts, int32_t* slot_rows, int32_t* block_done, int32_t* sync,
                      int32_t* scratch, int num_slots, int num_experts, int expert_offset, int block_m, int m_pad_max,
                      int num_chunks, cudaStream_t stream);
void moe_combine_launch(int dtype, const void* out_slots, const int32_t* topk_ids, void* out, int num_tokens,
                        int topk, int hidden, int expert_offset, int num_experts, cudaStream_t stream);

// topk_ids int32 [T, k]; sorted_ids int32 [m_pad_max]; block_expert int32 [m_pad_max / block_m];
// num_padded int32 [1]; expert_counts int32 [num_experts]; slot_rows int32 [T * k] (each slot's row, -1 when not
// local) or None; block_done int32 [m_pad_max / block_m] (zeroed) or None; num_chunks > 0 (the many-CTA path) also
// needs sync int32 [4] (zeros) and scratch int32 [(num_chunks + 1) * num_experts]; with num_chunks == 0 both are
// unused.
void align(at::Tensor topk_ids, at::Tensor sorted_ids, at::Tensor block_expert, at::Tensor num_padded,
           at::Tensor expert_counts, const std::optional<at::Tensor>& slot_rows,
           const std::optional<at::Tensor>& block_done, at::Tensor sync, at::Tensor scratch, int64_t num_experts,
           int64_t expert_offset, int64_t block_m, int64_t num_chunks) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  moe_align_launch(topk_ids.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                   num_padded.data_ptr<int32_t>(), expert_counts.data_ptr<int32_t>(),
                   slot_rows.has_value() ? slot_rows->data_ptr<int32_t>() : nullptr,
                   block_done.has_value() ? block_done->data_ptr<int32_t>() : nullptr, sync.data_ptr<int32_t>(),
                   scratch.data_ptr<int32_t>(), static_cast<int>(topk_ids.numel()), static_cast<int>(num_experts),
                   static_cast<int>(expert_offset), static_cast<int>(block_m),
                   static_cast<int>(sorted_ids.numel()), static_cast<int>(num_chunks),
                   jitmoe::current_stream(topk_ids));
  JITMOE_CHECK_LAUNCH("moe_align");
}

// out_slots [T * k, H]; topk_ids int32 [T, k]; out [T, H] (same dtype as out_slots).
void combine(at::Tensor out_slots, at::Tensor topk_ids, at::Tensor out, int64_t num_experts, int64_t expert_offset) {
  const c10::cuda::CUDAGuard guard(out.device());
  const auto st = out.scalar_type();
  const int dtype = st == at::kFloat ? 0 : st == at::kBFloat16 ? 1 : st == at::kHalf ? 2 : -1;
  TORCH_CHECK(dtype >= 0 && out_slots.scalar_type() == st, "moe_combine: unsupported dtype ", st);
  moe_combine_launch(dtype, out_slots.data_ptr(), topk_ids.data_ptr<int32_t>(), out.data_ptr(),
                     static_cast<int>(topk_ids.size(0)), static_cast<int>(topk_ids.size(1)),
                     static_cast<int>(out.size(1)), static_cast<int>(expert_offset), static_cast<int>(num_experts),
                     jitmoe::current_stream(out));
  JITMOE_CHECK_LAUNCH("moe_combine");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("align", &align);
  m.def("combine", &combine);
}
