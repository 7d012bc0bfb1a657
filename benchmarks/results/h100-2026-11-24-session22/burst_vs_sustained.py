"""Burst against sustained speed on the H100: the bf16 GEMM ceiling's matmul (8192^3), jitmoe, the torch loop and
cuBLAS doing the layer's two GEMMs densely (torch.bmm, equal rows per expert), Mixtral T = 4096 and 16384.
Burst: after 2 s idle, the median of the first few calls. Sustained: after ~3 s of back-to-back calls, the median
of the next ones. SM clock and power read by nvidia-smi right after each window."""
import subprocess, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe

dev, dt = torch.device("cuda"), torch.bfloat16


def smi():
    q = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()


def window(fn, n):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record(); fn(); e.record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in ev)
    return t[len(t) // 2]


def burst_sustained(name, fn, flops, burst_n=5, sustain_s=3.0):
    fn(); torch.cuda.synchronize(); time.sleep(2.0)
    b = window(fn, burst_n); sb = smi()
    t0 = time.time()
    while time.time() - t0 < sustain_s:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    s = window(fn, 3 * burst_n); ss = smi()
    print(f"{name:34s} burst {b:8.3f} ms {flops / b / 1e9:6.0f} TF/s [{sb}] | sustained {s:8.3f} ms "
          f"{flops / s / 1e9:6.0f} TF/s [{ss}] | x{s / b:.3f}", flush=True)


print("idle:", smi(), flush=True)
a = torch.randn(8192, 8192, dtype=dt, device=dev); b = torch.randn_like(a)
burst_sustained("matmul 8192^3 (the ceiling's GEMM)", lambda: a @ b, 2 * 8192**3, burst_n=20)
del a, b
shape = bench.SHAPES["mixtral-8x7b"]
w13, w2 = bench.make_weights(shape, dev, dt, 1)[0]
for T in (4096, 16384):
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    out = torch.empty_like(x)
    flops = bench.moe_flops(T, shape.k, shape.H, shape.I)
    burst_sustained(f"jitmoe Mixtral T={T}",
                    lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, None, output=out), flops)
    burst_sustained(f"torch loop Mixtral T={T}", lambda: bench.torch_loop_moe(x, ids, sc, w13, w2), flops)
    rows = T * shape.k // shape.E
    xa = torch.randn(shape.E, rows, shape.H, device=dev, dtype=dt)
    ia = torch.randn(shape.E, rows, shape.I, device=dev, dtype=dt)
    burst_sustained(f"cuBLAS bmm GEMM1+GEMM2 T={T}",
                    lambda: (torch.bmm(xa, w13.transpose(1, 2)), torch.bmm(ia, w2.transpose(1, 2))), flops)
    del xa, ia
    torch.cuda.empty_cache()
