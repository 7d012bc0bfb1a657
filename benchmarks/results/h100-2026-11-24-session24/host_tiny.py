"""Host cost of eager cutlass_fused_moe on a tiny layer (GPU work of a few us, so the loop is host-bound):
per-call time (min over 15 batches of 300 calls) and, with an argument, a cProfile by cumulative time, for the
decode path (T=1) and the grouped path (T=64)."""
import cProfile, io, pstats, sys, time, torch
import jitmoe
from jitmoe import quant
dev = "cuda"
E, k, H, I = 16, 4, 256, 256
w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
(w1q, s1), (w2q, s2) = quant.quantize_fp8_per_expert(w1), quant.quantize_fp8_per_expert(w2)
def per_call(fn, n=300, batches=15):
    """Min over batches of the mean host time per call (the host is shared: the min is the undisturbed cost)."""
    for _ in range(100): fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, 1e6 * (time.perf_counter() - t0) / n)
        torch.cuda.synchronize()
    return best
profile = len(sys.argv) > 1
for T in (1, 64):
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    xq, xs = quant.quantize_fp8(x)
    qs = quant.fp8_quant_scales(s1, s2, xs, torch.tensor(0.05, device=dev))
    ids = torch.rand(T, E, device=dev).argsort(1)[:, :k].int().contiguous()
    sc = torch.softmax(torch.randn(T, k, device=dev), -1)
    out = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    for name, fn in {"bf16": lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w1, w2, torch.bfloat16, None, output=out),
                     "fp8": lambda: jitmoe.cutlass_fused_moe(xq, ids, sc, w1q, w2q, torch.bfloat16, qs, output=out)}.items():
        print(f"T={T} {name}: {per_call(fn):.1f} us/call host", flush=True)
        if profile:
            pr = cProfile.Profile(); pr.enable()
            for _ in range(1000): fn()
            pr.disable(); torch.cuda.synchronize()
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
            print(s.getvalue()[:7000])
