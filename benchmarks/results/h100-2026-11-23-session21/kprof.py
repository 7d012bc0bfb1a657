"""Per-kernel device time (torch profiler, JITMOE_PDL=0) of cutlass_fused_moe: python kab.py TAG shape:T ..."""
import sys, collections
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe

dev, dt = torch.device("cuda"), torch.bfloat16
tag = sys.argv[1]
for item in sys.argv[2:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    copies = bench.make_weights(shape, dev, dt, 2)
    torch.manual_seed(T)
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    out = torch.empty_like(x)
    calls = 6 if T >= 4096 else 10
    for i in range(3):
        jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
        torch.cuda.synchronize()
    acc = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n = e.name
            key = "gemm1" if "GemmMode)0" in n else "gemm2" if "GemmMode)1" in n else "other"
            acc[key] += e.device_time / calls
    print(f"{tag:5s} {name:14s} T={T:6d}: total {sum(acc.values()):9.1f} us | gemm1 {acc['gemm1']:9.1f} | "
          f"gemm2 {acc['gemm2']:9.1f} | other {acc['other']:7.1f}", flush=True)
    del copies
    torch.cuda.empty_cache()
