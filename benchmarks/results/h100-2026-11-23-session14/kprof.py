"""Per-kernel device time of cutlass_fused_moe (torch.profiler; run with JITMOE_PDL=0), a session-14 dev tool:
python kprof.py TAG shape:T ...   (env: GEMM1_WIDE, GEMM2_BN128, CLUSTER1, FORCE_KERNEL)"""
import sys, collections
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import contextlib, os
import jitmoe
from jitmoe.ops import fused_moe as _fm
force = os.environ.get("FORCE_KERNEL")
if os.environ.get("GEMM2_BN128") == "1":
    from jitmoe.ops import moe_gemm as _mg
    _mg._WIDE_BLOCK_N.clear()
    _mg._TILES[("sm90ws", 128)] = (128, 64, 6)
if os.environ.get("GEMM1_WIDE") == "1":  # run 1 only: the gated GEMM1 without the narrow tile tried then
    from jitmoe.ops import moe_gemm as _mg
    _mg._NARROW_TILES.pop(("sm90ws", 128, True), None)
if os.environ.get("CLUSTER1") == "1":
    from jitmoe.ops import moe_gemm as _mg
    _mg.SM90WS_CLUSTER_M[True] = 1
ctx = (lambda: _fm.force_kernel(force)) if force else contextlib.nullcontext

dev, dt = torch.device("cuda"), torch.bfloat16
tag = sys.argv[1]
for item in sys.argv[2:]:
    name, T = item.split(":"); T = int(T)
    if "," in name:
        shape = bench.MoEShape(*map(int, name.split(",")))
    else:
        shape = next(iter(bench.resolve_shapes(name, dev).values()))
    copies = bench.make_weights(shape, dev, dt, 2)
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    out = torch.empty_like(x)
    calls = 6
    for i in range(3):
      with ctx():
        jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
    torch.cuda.synchronize()
    with ctx(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            jitmoe.cutlass_fused_moe(x, ids, sc, *copies[i % 2], dt, None, output=out)
        torch.cuda.synchronize()
    acc = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.device_time / calls
    short = lambda n: ("gemm1 " if "GemmMode)0" in n or "GemmMode0" in n else "gemm2 " if "GemmMode)1" in n else "") + n.split("<")[0].split("(")[0][-40:]
    parts = ", ".join(f"{short(k)} {v:.1f}" for k, v in sorted(acc.items(), key=lambda kv: -kv[1]) if v > 0.5)
    print(f"{tag} {name} T={T}: total {sum(acc.values()):.1f} us | {parts}", flush=True)
    del copies
    torch.cuda.empty_cache()
