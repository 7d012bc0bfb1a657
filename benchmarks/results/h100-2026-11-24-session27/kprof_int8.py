"""Per-kernel device time (torch profiler, run with JITMOE_PDL=0) of the bf16 and int8-weight layers, with each GEMM's
weight stream rate (weight bytes of the touched experts / kernel time). MODES (default bf16,int8,int8ws): int8ws
forces the int8 layer onto sm90ws. From the repository root: python kprof_int8.py TAG shape:T ..."""
import os, sys, collections
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe
from jitmoe import quant
from jitmoe.ops import fused_moe as fm
import contextlib

dev, dt = torch.device("cuda"), torch.bfloat16
tag = sys.argv[1]
for item in sys.argv[2:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    copies = bench.make_weights(shape, dev, dt, 2)
    q = [(quant.quantize_int8_per_channel(a), quant.quantize_int8_per_channel(b)) for a, b in copies]
    torch.manual_seed(T)
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    touched = torch.unique(ids).numel()
    E, H, I = copies[0][1].shape[0], copies[0][1].shape[1], copies[0][1].shape[2]
    out = torch.empty_like(x)
    calls = 6 if T >= 4096 else 10
    for mode in os.environ.get("MODES", "bf16,int8,int8ws").split(","):
        def call(i):
            if mode == "bf16":
                jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
            else:
                (w13, s1), (w2, s2) = q[i % 2]
                with (fm.force_kernel("sm90ws") if mode == "int8ws" else contextlib.nullcontext()):
                    jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, [s1, s2], output=out,
                                             use_int8_woq_per_channel=True)
        for i in range(3):
            call(i)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                call(i)
            torch.cuda.synchronize()
        acc = collections.defaultdict(float)
        names = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                n = e.name
                key = "gemm1" if "GemmMode)0" in n else "gemm2" if "GemmMode)1" in n else n.split("(")[0][-28:]
                acc[key] += e.device_time / calls
                names[key] = n[:90]
        wb = 1 if mode.startswith("int8") else 2
        g1b, g2b = touched * 2 * I * H * wb, touched * H * I * wb
        rate = lambda b, t: b / (t * 1e-6) / 1e12 if t else 0.0
        others = " ".join(f"{k} {v:.1f}" for k, v in acc.items() if k not in ("gemm1", "gemm2"))
        print(f"{tag} {mode} {name:8s} T={T:6d} touched {touched:3d}: total {sum(acc.values()):8.1f} us | gemm1 "
              f"{acc['gemm1']:8.1f} ({rate(g1b, acc['gemm1']):.2f} TB/s) | gemm2 {acc['gemm2']:8.1f} "
              f"({rate(g2b, acc['gemm2']):.2f} TB/s) | {others}", flush=True)
        for k in ("gemm1", "gemm2"):
            if k in names: print("   ", k, names[k], flush=True)
    del copies, q
    torch.cuda.empty_cache()
