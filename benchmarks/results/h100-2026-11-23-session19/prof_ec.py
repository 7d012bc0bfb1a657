"""Warm-up, then one EC call and one top-k call (ncu filters the kernels)."""
import torch, jitmoe
T, E, k = 16384, 256, 8
x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
jitmoe.expert_choice(x, k, 1.25); jitmoe.topk_softmax(x, k)
torch.cuda.synchronize()
jitmoe.expert_choice(x, k, 1.25); jitmoe.topk_softmax(x, k)
torch.cuda.synchronize()
print("done")
