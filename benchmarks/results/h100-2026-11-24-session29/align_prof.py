"""moe_align alone: per-launch duration (profiler, graph of 20 launches) at the T = 16/64 shapes, and a one-element
fill as the floor of a launch."""
import sys, statistics, os
import torch
from jitmoe.ops import permute as P

dev = torch.device("cuda")
cases = [("mixtral", 8, 2, 16), ("olmoe", 64, 8, 16), ("qwen3", 128, 8, 16), ("deepseek", 256, 8, 16),
         ("olmoe", 64, 8, 64), ("qwen3", 128, 8, 64)]
only = sys.argv[1] if len(sys.argv) > 1 else None
def durations(fn, n=20):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(); torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(n): fn()
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        g.replay(); torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return statistics.median(e.time_range.end - e.time_range.start for e in ev)

one = torch.zeros(1, device=dev)
if not only: print(f"fill of one element: {durations(lambda: one.fill_(1.0)):.2f} us")
for name, E, k, T in cases:
    if only and name + str(T) != only: continue
    probs = torch.softmax(torch.randn(T, E, device=dev), -1)
    ids = probs.topk(k, -1).indices.to(torch.int32)
    outs = P.empty_align_outputs(T * k, E, 128, dev)
    rows = torch.empty(T * k, dtype=torch.int32, device=dev)
    fn = lambda: P.align_into(ids, E, 128, 0, outs, slot_rows=rows)
    if only:
        for _ in range(3): fn()
        torch.cuda.synchronize(); continue
    print(f"{name} T={T} E={E} slots={T*k}: align {durations(fn):.2f} us (m_pad_max {outs[0].numel()})", flush=True)
