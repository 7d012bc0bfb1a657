"""Per-kernel device time of the EC key path (T=16384, E=256, bf16), torch profiler, L2 flushed; run with JITMOE_PDL=0."""
import sys, torch, jitmoe
from jitmoe.testing import l2_flush_buffer, evict_l2
T, E, k = 16384, 256, 8
x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
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
        times.setdefault(e.name.split("(")[0].split("::")[-1][:30], []).append(e.time_range.end - e.time_range.start)
print(sys.argv[1] if len(sys.argv) > 1 else "", " ".join(f"{n} {sorted(v)[len(v)//2]:.1f}" for n, v in times.items()))
