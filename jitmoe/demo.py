"""`jitmoe demo`: route a batch and run a small MoE layer end to end; print the error against the reference,
how long the first call took (a cold first call includes building the kernels) and the steady-state time."""
from __future__ import annotations

import time

import torch

from . import reference
from .jit.build import STATS
from .testing import rel_error


def _timed_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _steady_ms(fn, device, iters: int = 20) -> float:
    fn()
    return min(_timed_ms(fn, device) for _ in range(iters))


def _report(what: str, first_ms: float, steady_ms: float, err: float, built_before: int, device) -> None:
    built = STATS["built"] - built_before
    if device.type != "cuda":
        how = "CPU reference path"
    else:
        how = f"built {built} kernel module(s)" if built else "kernels loaded from the cache"
    print(f"{what}: first call {first_ms:8.1f} ms ({how}), steady {steady_ms * 1e3:8.1f} us, "
          f"rel. error vs reference {err:.2e}")


def demo_router(device: torch.device, T: int = 4096, E: int = 64, k: int = 8) -> None:
    from . import topk_softmax
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(T, E, device=device, dtype=dtype)
    built_before, out = STATS["built"], {}
    first = _timed_ms(lambda: out.setdefault("r", topk_softmax(logits, k, renormalize=True)), device)
    weights, ids = out["r"]
    ref_w, ref_ids = reference.topk_softmax(logits.cpu(), k, renormalize=True)
    steady = _steady_ms(lambda: topk_softmax(logits, k, renormalize=True), device)
    _report(f"topk_softmax  T={T} E={E} k={k} {str(dtype)[6:]}", first, steady,
            rel_error(weights, ref_w), built_before, device)
    print(f"  ids equal to the reference: {bool(torch.equal(ids.cpu(), ref_ids))}")


def demo_moe(device: torch.device, T: int = 256, E: int = 8, k: int = 2, H: int = 1024, I: int = 2048) -> None:
    from . import cutlass_fused_moe, topk_softmax
    if device.type != "cuda":  # the CPU reference is slow: a smaller layer
        T, H, I = 32, 256, 512
    dtype = torch.bfloat16
    x = torch.randn(T, H, device=device, dtype=dtype)
    gate = torch.randn(T, E, device=device, dtype=torch.float32)
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, device=device, dtype=dtype) / I**0.5
    scales, ids = topk_softmax(gate, k, renormalize=True)
    built_before, out = STATS["built"], {}

    def call():
        out["y"] = cutlass_fused_moe(x, ids, scales, w13, w2, dtype, quant_scales=None)[0]
    first = _timed_ms(call, device)
    ref = reference.fused_moe_reference(x.float().cpu(), ids.cpu(), scales.cpu(), w13.float().cpu(), w2.float().cpu())
    steady = _steady_ms(call, device)
    _report(f"fused MoE     T={T} E={E} k={k} H={H} I={I} {str(dtype)[6:]}", first, steady,
            rel_error(out["y"], ref), built_before, device)


def run_demo(device: str | None = None) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (reference path; no CUDA device)"
    print(f"jitmoe demo on {where}")
    demo_router(dev)
    demo_moe(dev)
    return 0
