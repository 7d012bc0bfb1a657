import time, torch, jitmoe
from jitmoe import quant
from jitmoe.ops import fused_moe as fm
from jitmoe.reference.moe import fused_moe_reference
from jitmoe.testing import rel_error
torch.manual_seed(0)
for (T, E, k, H, I, act) in [(600, 16, 4, 512, 512, "Swiglu"), (40, 8, 2, 512, 256, "Swiglu"), (700, 4, 1, 256, 1024, "Gelu"), (2048, 8, 2, 4096, 1024, "Swiglu")]:
    gated = act in ("Swiglu",)
    rows = 2 * I if gated else I
    x = torch.randn(T, H, device="cuda").bfloat16()
    w1 = (torch.randn(E, rows, H, device="cuda") * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") * I ** -0.5).bfloat16()
    (q1, s1), (q2, s2) = quant.quantize_int8_per_channel(w1), quant.quantize_int8_per_channel(w2)
    ids = torch.rand(T, E, device="cuda").argsort(1)[:, :k].int().contiguous()
    wts = torch.softmax(torch.randn(T, k, device="cuda"), -1)
    ref = fused_moe_reference(x, ids, wts, q1, q2, activation=act, out_dtype=torch.float32, fc1_weight_scales=s1, fc2_weight_scales=s2)
    for kern in ("sm90ws", "sm80"):
        t = time.time()
        with fm.force_kernel(kern):
            out = jitmoe.cutlass_fused_moe(x, ids, wts, q1, q2, torch.bfloat16, [s1, s2], activation_type=fm.ActivationType[act], use_int8_woq_per_channel=True)[0]
        torch.cuda.synchronize()
        print(T, E, k, H, I, act, kern, "err", f"{rel_error(out, ref):.2e}", f"{time.time()-t:.1f}s", flush=True)
