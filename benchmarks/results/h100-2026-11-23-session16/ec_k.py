"""Per-kernel times (torch profiler, L2 flushed), EC T=16384 E=256 k=8 bf16 + public-call event median."""
import sys, torch, jitmoe
from jitmoe.testing import l2_flush_buffer, evict_l2, bench_events
T, E, k = 16384, int(sys.argv[2]) if len(sys.argv) > 2 else 256, 8
xs = [torch.randn(T, E, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
cur = {"x": xs[0]}
api = bench_events(lambda: jitmoe.expert_choice(cur["x"], k, 1.25), setup=lambda i: cur.__setitem__("x", xs[i % 4]), iters=60)["median_ms"] * 1e3
x = xs[0]
flush = l2_flush_buffer()
for _ in range(3):
    jitmoe.expert_choice(x, k, 1.25)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        evict_l2(flush); jitmoe.expert_choice(x, k, 1.25)
    torch.cuda.synchronize()
times = {}
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA and "ec::" in e.name:
        times.setdefault(e.name.split("(")[0].split("::")[-1][:14], []).append(e.time_range.end - e.time_range.start)
print(f"{sys.argv[1]} E={E} api {api:.1f} |", " ".join(f"{n} {sorted(v)[len(v)//2]:.1f}" for n, v in times.items()), flush=True)
