"""Session-18 dev tool: run a benchmark script with another direct-rows threshold (and a fixed torch seed).

    DIRECT_ROWS=N SEED=S python ab.py SCRIPT ARGS...

sets jitmoe.ops.moe_gemm.DIRECT_A_MAX_ROWS_PER_EXPERT = N (0: GEMM1 always gathers x first) and torch.manual_seed(S),
then runs SCRIPT as __main__ with benchmarks/ on sys.path (kprof.py of session 14, bench_fused_moe.py).
"""
import os
import runpy
import sys

import torch

from jitmoe.ops import moe_gemm

moe_gemm.DIRECT_A_MAX_ROWS_PER_EXPERT = int(os.environ.get("DIRECT_ROWS", moe_gemm.DIRECT_A_MAX_ROWS_PER_EXPERT))
torch.manual_seed(int(os.environ.get("SEED", "0")))
sys.argv = sys.argv[1:]
sys.path.insert(0, "benchmarks")
runpy.run_path(sys.argv[0], run_name="__main__")
