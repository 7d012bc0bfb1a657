"""Session-18 dev tool: build a chosen set of modules into the JIT cache in 16 processes.

    python build_specs.py SET ...   (ws_tests: the modules of tests/gpu/test_moe_gemm_sm90ws.py; grid_bf16: the bf16
                                     modules bench_fused_moe.py needs on sm_90a; all_fused: every bf16/fp16 fused-MoE,
                                     decode and permute module for sm_90a, as `jitmoe prewarm` would build them)
"""
import concurrent.futures as cf
import sys
import time

from jitmoe.jit import KernelSpec
from jitmoe.jit.build import build_only
from jitmoe.ops import moe_decode, moe_gemm as mg, permute


def ws(dtype, act, mode, block_n, stages, cluster_m):
    cfg = mg.GemmConfig("sm90ws", 128, block_n, 64, stages, cluster_m=cluster_m)
    return mg.gemm_spec(cfg, dtype, mode, act, ("90a",))


def specs_of(sets):
    specs = []
    if "ws_tests" in sets:
        for d in ("bf16", "fp16"):
            specs += [ws(d, "Swiglu", "gemm1", 128, 4, cl) for cl in (1, 2)]
            specs += [ws(d, "Identity", "gemm2", 256, 3, 1), ws(d, "Identity", "gemm2", 128, 6, 1)]
        specs += [ws("bf16", "Gelu", "gemm1", 256, 3, 1), ws("bf16", "SwigluBias", "gemm1", 128, 4, 2),
                  ws("bf16", "Identity", "gemm2", 256, 3, 2)]
    if "grid_bf16" in sets:
        specs += [mg.gemm_spec(c, "bf16", "gemm1", "Swiglu", ("90a",)) for c in mg.default_configs("sm90ws", "90a")]
        specs += [mg.gemm_spec(c, "bf16", "gemm2", "Identity", ("90a",))
                  for c in mg.default_configs("sm90ws", "90a", gated=False)]
        specs += [moe_decode.decode_spec("bf16", "Swiglu", ("90a",)), permute._spec(("90a",))]
    if "all_fused" in sets:
        for prewarm in (mg._prewarm_specs, moe_decode._prewarm_specs, permute._prewarm):
            specs += prewarm(["bf16", "fp16"], None, ["90a"])
    return list({s.readable_name: s for s in specs}.values())


def build(fields):
    return build_only(KernelSpec.from_dict(fields))


if __name__ == "__main__":
    start, specs = time.time(), specs_of(sys.argv[1:])
    with cf.ProcessPoolExecutor(16) as pool:
        results = list(pool.map(build, [s.to_dict() for s in specs]))
    print(f"built {sum(r[2] for r in results)} of {len(specs)} specs in {time.time() - start:.0f} s", flush=True)
