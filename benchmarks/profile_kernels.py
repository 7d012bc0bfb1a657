"""Run one op a few times so `ncu` can profile its kernels. Usage (on the GPU machine):

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:topk_route --launch-skip 3 --launch-count 1 \
        python3 benchmarks/profile_kernels.py topk_softmax

A fused-MoE layer of bench_fused_moe.py's shapes is named fused_moe:<shape>:<T>, e.g. fused_moe:qwen3:16384.
"""
from __future__ import annotations

import sys

import torch

import jitmoe

CASES = {
    "topk_softmax": lambda: jitmoe.topk_softmax(torch.randn(65536, 256, device="cuda"), 8),
    "expert_choice": lambda: jitmoe.expert_choice(torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16), 8),
    "omni_fwd": lambda: jitmoe.omni_router(torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16),
                                           torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16), 32),
    "omni_bwd": lambda: _omni_backward(),
}


def _omni_backward():
    x = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scores, _ = jitmoe.omni_router(x, y, 32)
    scores.backward(torch.randn_like(scores))


def _fused_moe_case(name: str):
    """fused_moe:<shape>:<T> -> a call of cutlass_fused_moe on bench_fused_moe's weights and routing."""
    import bench_fused_moe as bench

    _, shape_name, tokens = name.split(":")
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = next(iter(bench.resolve_shapes(shape_name, device).values()))
    fc1, fc2 = bench.make_weights(shape, device, dtype, 1)[0]
    x, ids, scales = bench.make_routing(shape, int(tokens), device, dtype)
    out = torch.empty_like(x)
    return lambda: jitmoe.cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, None, output=out)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        call = _fused_moe_case(name) if name.startswith("fused_moe:") else CASES[name]
        for _ in range(5):
            call()
        torch.cuda.synchronize()
