"""INT8 weight-only fused MoE (W8A16, per-channel scales): jitmoe's int8-weight layer against its own bf16 layer and
the INT8 floor, on the DESIGN.md section 5 shapes.

For each shape and T, in one run: the ceilings (copy bandwidth, bf16 GEMM peak), the INT8 floor (activated experts'
int8 weights read once + the bf16 input and output at copy BW, or 6*T*k*H*I FLOPs at the bf16 peak, whichever is
larger: the products are bf16), and CUDA-event medians of cutlass_fused_moe in bf16 and with int8 weights
(``use_int8_woq_per_channel=True``; weights rotated among copies, or the L2 flushed), with each one's relative error
against the fp32 layer of the unquantized weights. The measuring code is bench_fused_moe_fp8's.

With ``--paths`` each row also times the int8 layer forced onto the decode path and onto each grouped kernel: sm90ws
(the default on sm_90a) and sm80.

    python benchmarks/bench_fused_moe_int8.py [--shapes mixtral,qwen3] [--tokens 16,4096] [--paths] [--out DIR]
"""
from __future__ import annotations

import torch

import _common as common
import bench_fused_moe as bf
import bench_fused_moe_fp8 as quantized


def int8_sets(shape, T: int, weights: list, device) -> tuple[list, list, torch.Tensor]:
    """(bf16 sets, INT8 weight-only sets, fp32 reference of set 0): the same routing and weights, quantized per
    channel with bf16 scales."""
    quant = common.jitmoe_attr("quant")
    bf16_sets, int8_sets_ = [], []
    for w13, w2 in weights:
        x, ids, scales = bf.make_routing(shape, T, device, torch.bfloat16)
        (w13q, s1), (w2q, s2) = quant.quantize_int8_per_channel(w13), quant.quantize_int8_per_channel(w2)
        bf16_sets.append((x, ids, scales, w13, w2))
        int8_sets_.append((x, ids, scales, w13q, w2q, [s1, s2]))
    ref = bf.torch_loop_moe(*bf16_sets[0], compute_dtype=torch.float32)
    return bf16_sets, int8_sets_, ref


INT8_MODE = quantized.QuantMode("int8", int8_sets, 2, "bf16_TFLOPs", ("decode", "sm90ws", "sm80"),
                                extra={"use_int8_woq_per_channel": True})

if __name__ == "__main__":
    quantized.main(mode=INT8_MODE, doc=__doc__)
