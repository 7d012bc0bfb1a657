"""Host time of one eager cutlass_fused_moe call (Qwen3 T=1, bf16 and FP8), and where it goes (cProfile)."""
import cProfile, pstats, sys, time, io
import torch
sys.path.insert(0, "benchmarks")
import jitmoe
from jitmoe import quant

dev = "cuda"
E, k, H, I, T = 128, 8, 2048, 768, 1
x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
ids = torch.rand(T, E, device=dev).argsort(1)[:, :k].int().contiguous()
sc = torch.softmax(torch.randn(T, k, device=dev), -1)
out = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
(xq, xs), (w1q, s1), (w2q, s2) = quant.quantize_fp8(x), quant.quantize_fp8_per_expert(w1), quant.quantize_fp8_per_expert(w2)
qs = quant.fp8_quant_scales(s1, s2, xs, torch.tensor(0.05, device=dev))
calls = {"bf16": lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w1, w2, torch.bfloat16, None, output=out),
         "fp8": lambda: jitmoe.cutlass_fused_moe(xq, ids, sc, w1q, w2q, torch.bfloat16, qs, output=out)}
for name, fn in calls.items():
    for _ in range(20): fn()
    torch.cuda.synchronize()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"{name}: host {1e6 * (t1 - t0) / n:.1f} us/call (enqueue only)", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n): fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])
