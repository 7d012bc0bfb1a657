"""Layer A/B in CUDA-graph replay: input sets (routing + weight copies) rotated as in bench_fused_moe, settings
interleaved over three rounds, then per-kernel spans of one replay per setting. Each setting is a value of
JITMOE_GEMM2_PREFETCH_KB, read when the graphs are captured (only dev_gemm2_l2_prefetch.patch reads it; on any other
tree a setting is just a label, which is how layer_direct_rows_m_fastest_ab.log ran it once per tree).
From the repository root: python ab_prefetch.py KB,KB,... shape:T ..."""
import os, sys, functools
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import _common as common
import jitmoe
from jitmoe.testing import capture_graph, bench_events

dev, dt = torch.device("cuda"), torch.bfloat16
settings = sys.argv[1].split(",")
ceil = {"copy_TBps": 3.0, "bf16_TFLOPs": 799.0}
for item in sys.argv[2:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    copies = bench.rotation_copies(shape, dev, 4)
    weights = bench.make_weights(shape, dev, dt, copies)
    torch.manual_seed(1000 + T)
    sets = [bench.make_routing(shape, T, dev, dt) + w for w in weights]
    out = torch.empty(T, shape.H, device=dev, dtype=dt)
    def layer(x, ids, sc, w13, w2):
        jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, None, output=out)
    graphs = {}
    for kb in settings:
        os.environ["JITMOE_GEMM2_PREFETCH_KB"] = kb
        graphs[kb] = [capture_graph(functools.partial(layer, *s)) for s in sets]
    torch.cuda.synchronize()
    est = common.one_call_ms(graphs[settings[0]][0].replay, dev)
    iters = common.iterations_for(est, 300.0, high=50)
    res = {kb: [] for kb in settings}
    for rnd in range(3):
        for kb in (settings if rnd % 2 == 0 else settings[::-1]):
            gs = graphs[kb]; cur = {"g": gs[0]}
            r = bench_events(lambda: cur["g"].replay(), warmup=3, iters=iters, flush_l2=len(gs) < 2,
                             setup=lambda i: cur.__setitem__("g", gs[i % len(gs)]))
            res[kb].append(r["median_ms"] * 1e3)
    distinct = sum(torch.unique(s[1]).numel() for s in sets) / len(sets)
    floor = common.floor_ms(bench.moe_bytes(distinct, T, shape.H, shape.I), bench.moe_flops(T, shape.k, shape.H, shape.I), ceil)[0] * 1e3
    print(f"{name:8s} T={T:6d} copies {copies} floor(3.0 TB/s) {floor:8.1f} us | " +
          " | ".join(f"KB={kb}: " + " ".join(f"{v:8.1f}" for v in res[kb]) + f" (min {min(res[kb]):.1f})" for kb in settings), flush=True)
    # per-kernel spans of one replay of set 0 per setting
    for kb in settings:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graphs[kb][0].replay(); torch.cuda.synchronize()
        ev = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], key=lambda e: e.time_range.start)
        per = len(ev) // 3
        g = ev[2 * per:]
        t0 = g[0].time_range.start
        parts = []
        for e in g:
            n = e.name
            key = "gemm1" if "GemmMode)0" in n else "gemm2" if "GemmMode)1" in n else n.split("(")[0].split("::")[-1][:14]
            parts.append(f"{key} {e.time_range.start - t0:.1f}-{e.time_range.end - t0:.1f}")
        print(f"    KB={kb}: span {g[-1].time_range.end - t0:.1f} | " + " | ".join(parts), flush=True)
    del graphs, weights, sets
    torch.cuda.empty_cache()
