"""Per-kernel times (torch profiler, PDL off) of jitmoe's layer and of dense cuBLAS bmm doing the same GEMMs.
python .devrun/diag.py TAG mixtral:1024 ...  ; env DENSE_ONLY / NCU_MODE=jit|dense runs one call of each for ncu."""
import sys, os, collections
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe

dev, dt = torch.device("cuda"), torch.bfloat16
tag = sys.argv[1]
ncu_mode = os.environ.get("NCU_MODE")
for item in sys.argv[2:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    E, k, H, I = shape.E, shape.k, shape.H, shape.I
    rows = T * k // E
    copies = bench.make_weights(shape, dev, dt, 2)
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    out = torch.empty_like(x)
    xs = torch.randn(E, rows, H, dtype=dt, device=dev)
    hs = torch.randn(E, rows, I, dtype=dt, device=dev)
    def jit(i):
        jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
    def dense(i):
        w13, w2 = copies[i % 2]
        torch.bmm(xs, w13.transpose(1, 2)); torch.bmm(hs, w2.transpose(1, 2))
    if ncu_mode:
        fn = jit if ncu_mode == "jit" else dense
        for i in range(4): fn(i)
        torch.cuda.synchronize(); continue
    for label, fn in (("jit", jit), ("dense", dense)):
        for i in range(3): fn(i)
        torch.cuda.synchronize()
        calls = 8
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(calls): fn(i)
            torch.cuda.synchronize()
        acc = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                acc[e.name] += e.device_time / calls
        print(f"{tag} {label} {name} T={T} rows/expert={rows}: total {sum(acc.values()):.1f} us", flush=True)
        for kname, v in sorted(acc.items(), key=lambda kv: -kv[1]):
            if v > 0.5: print(f"    {v:9.1f}  {kname[:230]}", flush=True)
    del copies, xs, hs
    torch.cuda.empty_cache()
