"""Run one op a few times so `ncu` can profile its kernels. Usage (on the GPU machine):

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:topk_route --launch-skip 3 --launch-count 1 \
        python3 benchmarks/profile_kernels.py topk_softmax
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


if __name__ == "__main__":
    for name in sys.argv[1:]:
        for _ in range(5):
            CASES[name]()
        torch.cuda.synchronize()
