"""FP8 accuracy numbers: layer error against the FP8 reference and the unquantized layer; GEMM1's e4m3 output
against the reference rounding (share that differs, worst deviation in e4m3 steps)."""
import sys, torch
sys.path.insert(0, "tests/gpu")
import test_fused_moe_fp8 as t
from jitmoe import quant
from jitmoe.ops import moe_gemm
from jitmoe.reference.moe import fused_moe_reference
from jitmoe.testing import rel_error
torch.manual_seed(0)
for T, E, k, H, I in [(16, 64, 8, 1024, 768), (2048, 8, 2, 1024, 1024), (4096, 128, 8, 2048, 768), (4096, 8, 2, 4096, 14336), (1024, 256, 8, 7168, 2048)]:
    p = t.make_fp8_problem(T, E, k, H, I)
    out = t.run(p)
    e_fp8 = rel_error(out, t.reference(p))
    p2, cfg1, _, routing = t._gemm_problem(T, E, k, H, I)
    inter = torch.zeros(routing[0].numel(), I, dtype=quant.FP8_DTYPE, device="cuda")
    moe_gemm.launch_gemm1(p2["x"], p2["fc1"], *routing, out=inter, topk=k, activation="Swiglu", fc1_bias=None,
                          config=cfg1, acc_scale=p2["scales"][0], out_scale=p2["scales"][1])
    ref = torch.zeros_like(inter)
    moe_gemm.gemm1_reference(p2["x"], p2["fc1"], *routing, ref, k, "Swiglu", None, None, None, None, cfg1.block_m,
                             p2["scales"][0], p2["scales"][1])
    real = routing[0].long() < T * k
    got, want = inter[real].float(), ref[real].float()
    off = (got - want).abs()
    steps = off / (torch.maximum(got.abs(), want.abs()) / 8 + 2.0 ** -9)
    print(f"T={T} E={E} k={k} H={H} I={I}: layer vs fp8 ref {e_fp8:.4f}; gemm1 differs {(got != want).float().mean().item():.4f}, "
          f"max {steps.max().item():.2f} steps, max abs {off.max().item():.4g} (amax {want.abs().amax().item():.4g})", flush=True)
