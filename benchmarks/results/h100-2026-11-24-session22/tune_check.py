"""at.tune restricted to sm90ws on three rows: which (GEMM1, GEMM2) it picks, then the layer with that stored choice
against the heuristic (JITMOE_TUNING=0), CUDA-event medians with the L2 flushed."""
import os, sys
sys.path.insert(0, "benchmarks")
import torch
import _common as common
import bench_fused_moe as bench
import jitmoe
from jitmoe.ops import moe_autotune as at

dev, dt = torch.device("cuda"), torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
for name, T in [("deepseek-v2", 4096), ("deepseek-v3", 4096), ("mixtral-8x22b", 1024)]:
    shape = bench.resolve_shapes(name, dev)[name]
    w13, w2 = bench.make_weights(shape, dev, dt, 1)[0]
    x, ids, sc = bench.make_routing(shape, T, dev, dt)
    key = at.problem_key(arch="90a", num_sms=sms, dtype=dt, gated=True, hidden=shape.H, inter=shape.I,
                         num_local_experts=shape.E, topk=shape.k, num_tokens=T)
    work = at.Workload(x, ids, sc.reshape(-1).contiguous(), w13, w2, None, None, {}, "Swiglu", 0)
    choice = at.tune(work, key, kernels=("sm90ws",))
    print(f"{name} T={T}: picked gemm1 {choice.gemm1} {choice.gemm1_ms:.4f} ms, gemm2 {choice.gemm2} "
          f"{choice.gemm2_ms:.4f} ms", flush=True)
    at.store().put(key.text, at.encode(choice))
    out = torch.empty_like(x)
    fn = lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, None, output=out)
    for rnd in range(2):
        res = {}
        for mode in ("heuristic", "tuned"):
            if mode == "heuristic":
                os.environ["JITMOE_TUNING"] = "0"
            else:
                os.environ.pop("JITMOE_TUNING", None)
            fn()
            res[mode] = common.time_fn(fn, dev, warmup=5, iters=30)["median_ms"]
        print(f"  round {rnd}: layer heuristic {res['heuristic']:.4f} ms, tuned {res['tuned']:.4f} ms "
              f"({res['tuned'] / res['heuristic'] - 1:+.1%})", flush=True)
    del w13, w2
    torch.cuda.empty_cache()
