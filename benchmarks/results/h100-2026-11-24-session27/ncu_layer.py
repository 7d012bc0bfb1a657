"""Three warm-up calls, then one call (ncu picks its GEMM launches with --launch-skip 6 --launch-count 2):
python ncu_layer.py bf16|int8 shape T [ws]   (ws: the layer forced onto sm90ws)"""
import sys
sys.path.insert(0, "benchmarks")
import torch
import bench_fused_moe as bench
import jitmoe
from jitmoe import quant
dev, dt = torch.device("cuda"), torch.bfloat16
mode, name, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
shape = next(iter(bench.resolve_shapes(name, dev).values()))
(w13, w2), = bench.make_weights(shape, dev, dt, 1)
torch.manual_seed(T)
x, ids, sc = bench.make_routing(shape, T, dev, dt)
out = torch.empty_like(x)
if mode == "int8":
    (w13, s1), (w2, s2) = quant.quantize_int8_per_channel(w13), quant.quantize_int8_per_channel(w2)
    call = lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, [s1, s2], output=out,
                                            use_int8_woq_per_channel=True)
else:
    call = lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w13, w2, dt, None, output=out)
from jitmoe.ops import fused_moe as fm
import contextlib
ctx = fm.force_kernel("sm90ws") if len(sys.argv) > 4 else contextlib.nullcontext()
with ctx:
    for _ in range(4):
        call()
torch.cuda.synchronize()
print("done", mode, name, T, "touched", torch.unique(ids).numel())
