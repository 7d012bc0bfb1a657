"""What dense cuBLAS reaches on the fused-MoE grid's compute-heavy rows (issue 6: why a row misses the floor).

The floor of bench_fused_moe divides the layer's FLOPs by a GEMM peak measured on one 8192^3 matmul for 23 calls;
this script asks how fast the same GEMM work runs when nothing about MoE is in the way. For each (shape, T) with at
least --min-rows rows per expert it times, alternately on the same GPU and the same way (CUDA-event medians, L2
flushed, two weight copies rotated):
  - dense: the two GEMMs of the layer as torch.bmm over the experts, each with exactly T*k/E rows (uniform load, no
    gather, no activation, no routing weights, no combine): cuBLAS's best case for this work;
  - jitmoe: cutlass_fused_moe on random softmax-top-k routing (as in bench_fused_moe).
It also measures the 8192^3 ceiling twice: as bench_fused_moe does (cold), and after --hot-seconds of back-to-back
GEMMs, since long compute-bound rows run at the clocks a sustained load settles at.

    python benchmarks/bench_dense_reference.py [--shapes mixtral,qwen3] [--tokens 1024,4096] [--device cpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import time

import torch

import _common as common
import bench_fused_moe as bench
import jitmoe


def hot_gemm_tflops(device: torch.device, seconds: float) -> float:
    """The 8192^3 bf16 matmul rate after ``seconds`` of the same matmuls back to back."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(device)
    ms = common.time_fn(lambda: a @ b, device, warmup=3, iters=20, flush_l2=False)["median_ms"]
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def measure(name: str, shape: bench.MoEShape, T: int, device: torch.device, rounds: int) -> dict:
    E, k, H, I = shape.E, shape.k, shape.H, shape.I  # noqa: E741
    rows = T * k // E
    dtype = torch.bfloat16
    weights = bench.make_weights(shape, device, dtype, 2)
    x, ids, scales = bench.make_routing(shape, T, device, dtype)
    out = torch.empty_like(x)
    xs = torch.randn(E, rows, H, dtype=dtype, device=device)
    hs = torch.randn(E, rows, I, dtype=dtype, device=device)
    current = {"copy": 0}

    def rotate(i: int) -> None:
        current["copy"] = i % len(weights)

    def dense():
        w13, w2 = weights[current["copy"]]
        torch.bmm(xs, w13.transpose(1, 2))
        torch.bmm(hs, w2.transpose(1, 2))

    def layer():
        jitmoe.cutlass_fused_moe(x, ids, scales, *weights[current["copy"]], dtype, None, output=out)

    layer()  # JIT load outside the timing
    estimate = common.one_call_ms(dense, device)
    iters = common.iterations_for(estimate, 400.0, low=10, high=50)
    times = {"dense_ms": [], "jitmoe_ms": []}
    for _ in range(rounds):  # alternate, so both see the same clocks
        for key, fn in (("dense_ms", dense), ("jitmoe_ms", layer)):
            times[key].append(common.time_fn(fn, device, warmup=3, iters=iters, setup=rotate)["median_ms"])
    flops = bench.moe_flops(T, k, H, I)
    dense_ms, jitmoe_ms = min(times["dense_ms"]), min(times["jitmoe_ms"])
    del weights, xs, hs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"shape": name, "T": T, "rows_per_expert": rows, "flops": flops, **times,
            "dense_TFLOPs": flops / (dense_ms * 1e-3) / 1e12, "jitmoe_TFLOPs": flops / (jitmoe_ms * 1e-3) / 1e12,
            "jitmoe_over_dense": jitmoe_ms / dense_ms}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list (default: the grid's four shapes)")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--min-rows", type=int, default=128, help="skip rows with fewer rows per expert")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hot-seconds", type=float, default=3.0)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (a smoke run: tiny shapes)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    ceil = common.ceilings(device)
    hot = hot_gemm_tflops(device, args.hot_seconds) if device.type == "cuda" else None
    print(f"device {common.device_name(device)}; bf16 8192^3: {ceil['bf16_TFLOPs']:.0f} TFLOP/s cold, {hot} after "
          f"{args.hot_seconds:g} s of GEMMs", flush=True)
    rows = []
    for name, shape in bench.resolve_shapes(args.shapes, device).items():
        for T in common.parse_ints(args.tokens):
            if T * shape.k // shape.E < args.min_rows:
                continue
            r = measure(name, shape, T, device, args.rounds)
            r["floor_ms"] = r["flops"] / (ceil["bf16_TFLOPs"] * 1e12) * 1e3  # compute term of the grid's floor
            rows.append(r)
            print(f"  {name} T={T} ({r['rows_per_expert']} rows/expert): dense {min(r['dense_ms']):.4g} ms "
                  f"({r['dense_TFLOPs']:.0f} TFLOP/s), jitmoe {min(r['jitmoe_ms']):.4g} ms "
                  f"({r['jitmoe_TFLOPs']:.0f}); jitmoe/dense {r['jitmoe_over_dense']:.3f}, "
                  f"compute floor / dense {r['floor_ms'] / min(r['dense_ms']):.3f}", flush=True)
    payload = {"meta": common.environment(device, "bench_dense_reference", ceil), "hot_bf16_TFLOPs": hot,
               "rows": rows}
    common.write_json(common.result_path("bench_dense_reference", device, args.out, "json"), payload)
    return payload


if __name__ == "__main__":
    main()
