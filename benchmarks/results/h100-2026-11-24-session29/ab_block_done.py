"""A/B of GEMM2 starting on GEMM1's counted blocks (JITMOE_BLOCK_DONE unset) against waiting for all of GEMM1
(JITMOE_BLOCK_DONE=0): the bf16 layer in CUDA-graph replay on the benchmark's rotated sets, rounds interleaved.
python ab_block_done.py shape:T,T,... ..."""
import os, sys, statistics, json
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import _common as common
import jitmoe

dev, dt = torch.device("cuda"), torch.bfloat16
rows = []
for item in sys.argv[1:]:
    name, Ts = item.split(":")
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    weights = bench.make_weights(shape, dev, dt, bench.rotation_copies(shape, dev, 4))
    for T in map(int, Ts.split(",")):
        torch.manual_seed(1000 + T)
        sets = [bench.make_routing(shape, T, dev, dt) + w for w in weights]
        out = torch.empty(T, shape.H, device=dev, dtype=dt)
        calls = [lambda s=s: jitmoe.cutlass_fused_moe(s[0], s[1], s[2], s[3], s[4], dt, None, output=out)
                 for s in sets]
        res = {"base": [], "new": []}
        for rnd in range(2):
            for mode in ("base", "new"):
                if mode == "base":
                    os.environ["JITMOE_BLOCK_DONE"] = "0"
                else:
                    os.environ.pop("JITMOE_BLOCK_DONE", None)
                outs = []
                for c in calls[:1]:
                    c(); torch.cuda.synchronize(); outs.append(out.clone())
                res[mode + "_out"] = outs[0]
                iters = 200 if T <= 256 else 60 if T <= 4096 else 20
                res[mode].append(common.time_graphs(calls, iters=iters, flush_l2=len(calls) < 2)["median_ms"] * 1e3)
        same = torch.equal(res["base_out"], res["new_out"])
        b, n = min(res["base"]), min(res["new"])
        print(f"{name:14s} T={T:6d} base {' / '.join(f'{v:.1f}' for v in res['base'])} us | new "
              f"{' / '.join(f'{v:.1f}' for v in res['new'])} us | best-of {b:.1f} -> {n:.1f} ({(n / b - 1) * 100:+.1f}%)"
              f" | bits equal {same}", flush=True)
        rows.append(dict(shape=name, T=T, base_us=res["base"], new_us=res["new"], bits_equal=same))
        del sets, calls
        torch.cuda.empty_cache()
    del weights
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "ab_block_done.json"), "w"), indent=1)
