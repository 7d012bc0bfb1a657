"""Where the time of one cutlass_fused_moe call goes: per-kernel device time (torch.profiler) for the model shapes
of bench_fused_moe.py, averaged over several calls. Diagnostic only (bench_fused_moe.py is the measurement).

    python benchmarks/profile_fused_moe.py [--shapes qwen3,mixtral] [--tokens 1,4096] [--iters 20]
"""
from __future__ import annotations

import argparse
import collections
import re

import torch
from torch.profiler import ProfilerActivity, profile

import _common as common
import bench_fused_moe as bench
import jitmoe


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Mean device microseconds per call of every kernel fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[short_name(event.name)] += event.device_time / iters
    return dict(totals.most_common())


def short_name(name: str) -> str:
    """A kernel's name without 'void', namespaces and argument list, keeping the template arguments (GEMM1 and
    GEMM2 differ only there)."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\b(?:[A-Za-z_]\w*::)+", "", name)
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut the argument list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    return name[:end][:140]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="mixtral,qwen3,olmoe,deepseek-v3")
    parser.add_argument("--tokens", default="1,1024,4096")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    for name, shape in bench.resolve_shapes(args.shapes, device).items():
        weights = bench.make_weights(shape, device, dtype, 1)[0]
        for T in common.parse_ints(args.tokens):
            x, ids, scales = bench.make_routing(shape, T, device, dtype)
            out = torch.empty(T, shape.H, device=device, dtype=dtype)

            def call():
                jitmoe.cutlass_fused_moe(x, ids, scales, *weights, dtype, None, output=out)

            times = kernel_times(call, args.iters)
            print(f"\n{name} T={T}: {sum(times.values()):.1f} us of kernels per call")
            for kernel, us in times.items():
                print(f"  {us:9.1f} us  {kernel}")
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
