"""EC key path A/B: CUDA-event medians (L2 flushed, 4 rotating inputs) of the public call, token-major key path, and
top-k softmax, for whichever jitmoe is first on PYTHONPATH; then per-kernel times (torch profiler, PDL off if set)."""
import sys, os
import torch
import jitmoe
from jitmoe.ops import expert_choice as ops
from jitmoe.testing import bench_events, l2_flush_buffer, evict_l2

TAG = sys.argv[1]
SHAPES = [(16384, 256, 8, torch.bfloat16), (16384, 256, 8, torch.float32), (4096, 256, 8, torch.bfloat16),
          (16384, 64, 8, torch.bfloat16), (16384, 1024, 8, torch.bfloat16), (32768, 160, 6, torch.bfloat16),
          (16384, 512, 32, torch.bfloat16), (1024, 256, 8, torch.bfloat16), (8192, 128, 2, torch.bfloat16)]
if os.environ.get("EC_SHAPES") == "main":
    SHAPES = SHAPES[:1]
for T, E, k, dtype in SHAPES:
    torch.manual_seed(T + E)
    xs = [torch.randn(T, E, device="cuda", dtype=dtype) for _ in range(4)]
    cap = jitmoe.expert_choice_capacity(T, E, k, 1.25)
    cur = {"x": xs[0]}
    setup = lambda i: cur.__setitem__("x", xs[i % 4])
    tk = bench_events(lambda: jitmoe.topk_softmax(cur["x"], k), setup=setup, iters=60)["median_ms"] * 1e3
    outs = ops.new_outputs(xs[0], k, cap, False)
    keys = bench_events(lambda: ops.launch_expert_choice(cur["x"], None, k, cap, "experts", "topk", False, outs, "keys"),
                        setup=setup, iters=60)["median_ms"] * 1e3
    api = bench_events(lambda: jitmoe.expert_choice(cur["x"], k, 1.25), setup=setup, iters=60)["median_ms"] * 1e3
    print(f"{TAG} T={T:6d} E={E:5d} k={k:2d} {str(dtype)[6:]:9s} topk {tk:6.1f} keysTM {keys:6.1f} api {api:6.1f} "
          f"ratio {api / tk:4.2f}", flush=True)

T, E, k = 16384, 256, 8
x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
flush = l2_flush_buffer()
for _ in range(3):
    jitmoe.expert_choice(x, k, 1.25); jitmoe.topk_softmax(x, k)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        evict_l2(flush); jitmoe.expert_choice(x, k, 1.25)
        evict_l2(flush); jitmoe.topk_softmax(x, k)
    torch.cuda.synchronize()
times = {}
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA and ("ec::" in e.name or "topk" in e.name):
        times.setdefault(e.name.split("(")[0].split("::")[-1][:30], []).append(e.time_range.end - e.time_range.start)
print(TAG, "kernels(us):", " ".join(f"{n} {sorted(v)[len(v)//2]:.1f}" for n, v in times.items()), flush=True)
