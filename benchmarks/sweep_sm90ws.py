"""Tile sweep of the persistent SM90 grouped GEMM ('sm90ws') on the model shapes of bench_fused_moe.py: each
GEMM of the layer alone (GEMM1 with SwiGLU and, as in the pipeline, the gather pre-pass or, at few rows per expert,
direct rows: moe_gemm.gathers_a; GEMM2 with the routing-weight scatter), for every variant given, with its achieved
TFLOP/s on the real rows. It decides the tiles of moe_gemm's heuristic (block_n, stages, cluster size); the
layer-level numbers come from bench_fused_moe.py.

    python benchmarks/sweep_sm90ws.py [--shapes qwen3,deepseek-v3] [--tokens 1024,4096] [--out DIR]

A variant is MODE:BLOCK_N:STAGES:CLUSTER_M, e.g. gemm2:256:3:2. CUDA-event medians after warm-up with the L2
flushed before every call; random data; the routing is the benchmark's softmax top-k.
"""
from __future__ import annotations

import argparse

import torch

import _common as common
import bench_fused_moe as bench
from jitmoe.jit import KernelSpec, load_module
from jitmoe.ops import moe_gemm, permute

BLOCK_M = 128
DEFAULT_VARIANTS = ("gemm1:128:4:1", "gemm1:128:4:2", "gemm2:128:4:1", "gemm2:128:6:1", "gemm2:128:6:2",
                    "gemm2:256:3:1", "gemm2:256:3:2")
DEFAULT_TOKENS = (256, 1024, 4096, 16384)


def module(mode: str, block_n: int, stages: int, cluster_m: int):
    params = {"kernel": "sm90ws", "dtype": "bf16", "operand": "bf16", "weight": "bf16",
              "act": "Swiglu" if mode == "gemm1" else "Identity", "mode": mode, "block_m": BLOCK_M,
              "block_n": block_n, "block_k": 64, "stages": stages, "cluster_m": cluster_m}
    return load_module(KernelSpec.create("moe_gemm", "moe", ("sm90ws/gemm.cu", "moe_gemm_binding.cpp"), params,
                                         ("90a",), cutlass=True))


def parse_variant(text: str) -> tuple[str, int, int, int]:
    mode, block_n, stages, cluster_m = text.split(":")
    if mode not in ("gemm1", "gemm2"):
        raise SystemExit(f"variant {text!r}: mode must be gemm1 or gemm2")
    return mode, int(block_n), int(stages), int(cluster_m)


def gemm_call(mode: str, mod, shape, x, ids, fc1, fc2, routing, bufs, gathers: bool):
    """A closure running one GEMM of the layer on the row's data (outputs are scratch); ``gathers``: GEMM1 first
    gathers x into a sorted copy, else it loads its rows from x (direct rows)."""
    sorted_ids, block_expert, num_padded = routing
    T, k = ids.shape
    if mode == "gemm1":
        a_sorted, slot_rows = (bufs["a_sorted"], bufs["slot_rows"]) if gathers else (None, None)
        return lambda: mod.run(x, fc1, None, bufs["inter"], sorted_ids, block_expert, num_padded, None, None, None,
                               None, T * k, k, shape.I, shape.H, None, a_sorted, slot_rows, False, 1,
                               None, None, None, None, 0)
    return lambda: mod.run(bufs["inter"], fc2, None, bufs["out"], sorted_ids, block_expert, num_padded,
                           bufs["weights"], None, None, None, T * k, 1, shape.H, shape.I, None, None, None, False, 1,
                           None, None, None, None, 0)


def sweep_row(shape, T: int, variants, device) -> list[dict]:
    x, ids, scales = bench.make_routing(shape, T, device, torch.bfloat16)
    fc1, fc2 = bench.make_weights(shape, device, torch.bfloat16, 1)[0]
    outputs = permute.empty_align_outputs(ids.numel(), shape.E, BLOCK_M, device)
    permute.align_into(ids, shape.E, BLOCK_M, 0, outputs)
    routing = outputs[:3]
    m_pad_max = routing[0].numel()
    bufs = {"inter": torch.randn(m_pad_max, shape.I, device=device, dtype=torch.bfloat16),
            "a_sorted": torch.empty(m_pad_max, shape.H, device=device, dtype=torch.bfloat16),
            "slot_rows": torch.empty(T * shape.k, device=device, dtype=torch.int32),
            "out": torch.empty(T * shape.k, shape.H, device=device, dtype=torch.bfloat16),
            "weights": scales.reshape(-1).contiguous()}
    padded = int(routing[2].item())
    rows = []
    for text in variants:
        mode, block_n, stages, cluster_m = parse_variant(text)
        config = moe_gemm.GemmConfig("sm90ws", BLOCK_M, block_n, 64, stages, cluster_m=cluster_m)
        gathers = moe_gemm.gathers_a(config, T * shape.k, shape.E)  # as the pipeline decides
        fn = gemm_call(mode, module(mode, block_n, stages, cluster_m), shape, x, ids, fc1, fc2, routing, bufs,
                       gathers)
        fn()
        est = common.one_call_ms(fn, device)
        stats = common.time_fn(fn, device, warmup=3, iters=common.iterations_for(est, 3000.0, low=5, high=30))
        flops = 2 * T * shape.k * shape.H * shape.I * (2 if mode == "gemm1" else 1)
        rows.append({"variant": text, "T": T, "padded_rows": padded, "median_ms": stats["median_ms"],
                     "TFLOPs": flops / (stats["median_ms"] * 1e-3) / 1e12})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral,qwen3,olmoe,deepseek-v3")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    variants = args.variants.split(",")
    results = {}
    for name, shape in bench.resolve_shapes(args.shapes, device).items():
        results[name] = []
        for T in common.parse_ints(args.tokens):
            rows = sweep_row(shape, T, variants, device)
            results[name] += rows
            for r in rows:
                print(f"{name:15s} T={T:6d} {r['variant']:15s} {r['median_ms']:9.4f} ms {r['TFLOPs']:7.1f} TFLOP/s",
                      flush=True)
            torch.cuda.empty_cache()
    payload = {**common.environment(device, "sweep_sm90ws", None), "results": results}
    print(common.write_json(common.result_path("sweep_sm90ws", device, args.out, "json"), payload))


if __name__ == "__main__":
    main()
