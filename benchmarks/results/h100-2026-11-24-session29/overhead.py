"""Where the bf16 layer's event time goes beyond its kernel span: graph replays round-robin over the benchmark's
rotated sets (as bench_fused_moe's time_graphs does), timed with events, and the same replays under the profiler
(span of each replay's kernels, gap from one replay's last kernel to the next one's first). Also an empty graph."""
import os, sys, statistics
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import _common as common
import jitmoe
from jitmoe.testing import capture_graph, l2_flush_buffer, evict_l2

dev, dt = torch.device("cuda"), torch.bfloat16
tiny = torch.zeros(16, device=dev)

def event_times(graphs, iters, flush):
    buf = l2_flush_buffer() if flush else None
    for i in range(6): graphs[i % len(graphs)].replay()
    torch.cuda.synchronize()
    st = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    en = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if buf is not None: evict_l2(buf)
        st[i].record(); graphs[i % len(graphs)].replay(); en[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(st, en))

def profile_spans(graphs, reps, flush):
    buf = l2_flush_buffer() if flush else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            if buf is not None: evict_l2(buf)
            graphs[i % len(graphs)].replay()
        torch.cuda.synchronize()
    ev = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and "reduce" not in e.name and "Reduce" not in e.name], key=lambda e: e.time_range.start)
    per = len(ev) // reps
    spans, between, kern = [], [], []
    for r in range(reps):
        g = ev[r * per:(r + 1) * per]
        spans.append(g[-1].time_range.end - g[0].time_range.start)
        kern.append(sum(e.time_range.end - e.time_range.start for e in g))
        if r: between.append(g[0].time_range.start - ev[r * per - 1].time_range.end)
    return per, statistics.median(spans), statistics.median(between) if between else 0.0, [e.name[:40] for e in ev[:per]]

print("empty-ish graph (one tiny kernel):", end=" ")
g0 = capture_graph(lambda: tiny.add_(1.0))
print(f"event {event_times([g0], 200, False):.1f} us", flush=True)

for item in sys.argv[1:]:
    name, T = item.split(":"); T = int(T)
    shape = next(iter(bench.resolve_shapes(name, dev).values()))
    copies = bench.rotation_copies(shape, dev, 4)
    weights = bench.make_weights(shape, dev, dt, copies)
    torch.manual_seed(T)
    sets = [bench.make_routing(shape, T, dev, dt) + w for w in weights]
    out = torch.empty(T, shape.H, device=dev, dtype=dt)
    calls = [lambda s=s: jitmoe.cutlass_fused_moe(s[0], s[1], s[2], s[3], s[4], dt, None, output=out) for s in sets]
    flush = len(calls) < 2
    for pdl in ("1", "0"):
        os.environ["JITMOE_PDL"] = pdl
        graphs = [capture_graph(c) for c in calls]
        ev_med = event_times(graphs, 60, flush)
        ev_one = event_times(graphs[:1], 60, flush)
        per, span, gap, names = profile_spans(graphs, 4 * len(graphs) + 1, flush)
        print(f"{name} T={T} copies={len(calls)} PDL={pdl}: event median {ev_med:.1f} us (one set {ev_one:.1f}) | "
              f"profiled span {span:.1f} us, {per} kernels, gap to next replay {gap:.1f} us", flush=True)
        del graphs
    print("  kernels:", names, flush=True)
    del weights, sets, calls
    torch.cuda.empty_cache()
