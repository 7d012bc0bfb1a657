import sys, torch
sys.path.insert(0, "tests/gpu")
import test_moe_gemm_sm90ws as t
from jitmoe.ops import permute
variant = sys.argv[1]
counts = [700, 1, 1030, 260, 129, 1500, 0, 385, 640, 17, 2100, 33]
C, hidden, inter_size, direct, filled = 1, 136, 264, False, False
if variant == "direct": direct = True
if variant == "c2": C = 2
if variant == "k264": hidden = 264
if variant == "small": counts = [c * 2 // 5 for c in counts]   # 2718 slots: single-CTA moe_align
if variant == "filled": filled = True
if variant == "nozero": counts = [c if c else 5 for c in counts]
if variant == "no2100": counts = [c if c != 2100 else 300 for c in counts]
ids = t.counted_ids(counts)
E, tokens = len(counts), ids.shape[0]
mod = t.module(torch.bfloat16, "Swiglu", "gemm1", **t.GEMM1_GATED, cluster_m=C)
outputs = permute.empty_align_outputs(ids.numel(), E, 128, ids.device)
slot_rows = torch.empty(tokens, dtype=torch.int32, device="cuda")
permute.align_into(ids, E, 128, 0, outputs, slot_rows=slot_rows if filled else None)
torch.cuda.synchronize()
print("aligned", int(outputs[2].item()), outputs[0].numel(), flush=True)
routing = tuple(outputs[:3])
m_pad_max = routing[0].numel()
x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
fc1 = t.weights(E, 2 * inter_size, hidden, torch.bfloat16)
inter = torch.empty(m_pad_max, inter_size, dtype=torch.bfloat16, device="cuda")
a_sorted = None if direct else torch.empty(m_pad_max, hidden, dtype=torch.bfloat16, device="cuda")
t.run_gemm1(mod, x, fc1, None, routing, inter, 1, a_sorted, slot_rows=slot_rows if filled else None,
            slot_rows_filled=filled)
torch.cuda.synchronize()
print("OK", flush=True)
