"""Host cost of the pieces of one eager cutlass_fused_moe call (Qwen3 shape), perf_counter over 2000 calls."""
import time, torch
import jitmoe
from jitmoe.ops import fused_moe as fm, moe_decode as dec
from jitmoe.jit import load_module, device_archs

dev = "cuda"
E, k, H, I = 128, 8, 2048, 768
w1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5

def bench(name, fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t = 1e6 * (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    print(f"{name:40s} {t:7.1f} us", flush=True)

@torch.library.custom_op("jm_test::noop", mutates_args=("out",))
def noop(out: torch.Tensor, x: torch.Tensor, a: int, s: str) -> None:
    return None

for T in (1, 64):
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(T, E, device=dev).argsort(1)[:, :k].int().contiguous()
    sc = torch.softmax(torch.randn(T, k, device=dev), -1)
    out = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    print(f"T={T}")
    bench("cutlass_fused_moe", lambda: jitmoe.cutlass_fused_moe(x, ids, sc, w1, w2, torch.bfloat16, None, output=out))
    def plan():
        t = fm.MoeTensors(x, ids, sc, w1, w2, output=out)
        return fm._plan(t, output_dtype=torch.bfloat16, quant_scales=None, activation_type=fm.ActivationType.Swiglu,
                        tp_size=1, tp_rank=0, ep_size=1, ep_rank=0, cluster_rank=0)
    bench("_plan", plan)
    sw = sc.reshape(-1)
    bench("op dispatch (jitmoe::fused_moe)", lambda: fm._fused_moe_op(out, x, ids, sw, w1, w2, None, None, None, None, None, "Swiglu", 1, 0, "", 0))
    bench("_run_cuda direct", lambda: fm._run_cuda(out, x, ids, sw, w1, w2, None, None, {}, "Swiglu", 0, "", 0))
    bench("custom_op noop dispatch", lambda: noop(out, x, 1, "Swiglu"))
    if T == 1:
        spec = dec.decode_spec("bf16", "Swiglu", device_archs(x.device))
        mod = load_module(spec)
        inter = torch.empty(T * k, I, device=dev, dtype=torch.bfloat16)
        bench("decode_spec", lambda: dec.decode_spec("bf16", "Swiglu", device_archs(x.device)))
        bench("load_module(spec)", lambda: load_module(spec))
        bench("module.run", lambda: mod.run(x, w1, None, inter, w2, None, out, ids, sw, None, None, None, 0, None, None, None))
        bench("torch.empty", lambda: torch.empty(T * k, I, device=dev, dtype=torch.bfloat16))
    bench("sc.reshape(-1)", lambda: sc.reshape(-1))
