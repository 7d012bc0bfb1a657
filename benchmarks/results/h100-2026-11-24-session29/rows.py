"""Times the bf16 layer (graph replay on the benchmark's rotated sets) for shape:T,... rows; prints one line per row
tagged with argv[1]. Run once per source tree (PYTHONPATH) to A/B two trees in separate processes."""
import sys, json, os
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import _common as common
import jitmoe

tag = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16
for item in sys.argv[2:]:
    name, Ts = item.split(":")
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    weights = bench.make_weights(shape, dev, dt, bench.rotation_copies(shape, dev, 4))
    for T in map(int, Ts.split(",")):
        torch.manual_seed(2000 + T)
        sets = [bench.make_routing(shape, T, dev, dt) + w for w in weights]
        out = torch.empty(T, shape.H, device=dev, dtype=dt)
        calls = [lambda s=s: jitmoe.cutlass_fused_moe(s[0], s[1], s[2], s[3], s[4], dt, None, output=out)
                 for s in sets]
        calls[0](); torch.cuda.synchronize()
        ref = bench.torch_loop_moe(*sets[0], compute_dtype=torch.float32)
        err = bench.device_rel_error(out, ref)
        t = common.time_graphs(calls, iters=300, flush_l2=len(calls) < 2)["median_ms"] * 1e3
        print(f"{tag:5s} {name:14s} T={T:5d} {t:8.2f} us  err {err:.2e}", flush=True)
        del sets, calls
    del weights
    torch.cuda.empty_cache()
