"""Kernel timeline of the bf16 layer in CUDA-graph replay (torch profiler, CUPTI): start offsets, durations and
gaps of each kernel, PDL on and off. python timeline.py shape:T ..."""
import os, sys, collections
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe

dev, dt = torch.device("cuda"), torch.bfloat16
for item in sys.argv[1:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    w = bench.make_weights(shape, dev, dt, 1)[0]
    torch.manual_seed(T)
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    out = torch.empty_like(x)
    for pdl in ("1", "0"):
        os.environ["JITMOE_PDL"] = pdl
        call = lambda: jitmoe.cutlass_fused_moe(x, ids, sc, *w, dt, None, output=out)
        for _ in range(3): call()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            call(); torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                call()
        torch.cuda.synchronize()
        for _ in range(5): g.replay()
        torch.cuda.synchronize()
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(30):
            st.record(); g.replay(); en.record(); en.synchronize(); ts.append(st.elapsed_time(en) * 1e3)
        ts.sort()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(6):
                g.replay(); torch.cuda.synchronize()
        ev = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                    key=lambda e: e.time_range.start)
        print(f"== {name} T={T} PDL={pdl}: replay median {ts[len(ts)//2]:.1f} us (min {ts[0]:.1f}); "
              f"{len(ev)} kernel records", flush=True)
        per = len(ev) // 6 if ev else 0
        for r in range(1, 6 if per else 0):
            group = ev[r * per:(r + 1) * per]
            t0 = group[0].time_range.start
            prev_end = None
            line = []
            for e in group:
                n = e.name
                key = "gemm1" if "GemmMode)0" in n else "gemm2" if "GemmMode)1" in n else n.split("(")[0].split("::")[-1][:22]
                gap = "" if prev_end is None else f" gap {e.time_range.start - prev_end:+.1f}"
                line.append(f"{key} @{e.time_range.start - t0:.1f} dur {e.time_range.end - e.time_range.start:.1f}{gap}")
                prev_end = e.time_range.end
            print(f"  replay {r}: span {group[-1].time_range.end - t0:.1f} | " + " | ".join(line), flush=True)
        del g
    del w
    torch.cuda.empty_cache()
