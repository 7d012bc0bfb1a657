"""Helpers shared by tests and benchmarks: error metric, output poisoning, device-event timing."""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere gives inf so it can never pass a tolerance."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    diff = (o - r).norm().item()
    return diff / denom if denom > 0 else diff


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with a value no kernel produces on purpose (NaN for floats, a sentinel for ints)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-0x5A5A5A5 if t.dtype in (torch.int32, torch.int64) else 0x5A)
    return t


def has_cuda() -> bool:
    return torch.cuda.is_available()


def l2_flush_buffer(device=None) -> torch.Tensor:
    """A buffer larger than any current L2 (H100: 50 MB, H200: 60 MB); read it to evict the cache."""
    return torch.ones(64 * 2**20, dtype=torch.float32, device=device or "cuda")


def evict_l2(buffer: torch.Tensor) -> None:
    # A read, not a write: zeroing would leave ~50 MB of dirty lines whose write-back lands in the next timed call.
    buffer.sum()


def bench_events(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50, flush_l2: bool = True,
                 setup: Callable[[int], object] | None = None) -> dict:
    """Median/min/percentiles (ms) of ``fn`` timed with CUDA events, one event pair per call.

    ``setup(i)`` runs before call i, outside the timed region (e.g. to rotate inputs); with ``flush_l2`` the L2 is
    evicted before every call so weights and activations come from HBM, as they would in a real model.
    """
    flush = l2_flush_buffer() if flush_l2 else None
    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if setup:
            setup(i)
        if flush is not None:
            evict_l2(flush)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """Capture ``fn`` into a CUDA graph after warming it up on a side stream (as torch.cuda.graphs requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_graph(fn: Callable[[], object], *, warmup: int = 3, iters: int = 50, flush_l2: bool = True) -> dict:
    """Like bench_events but replays a captured CUDA graph of ``fn`` (small-T rows: no launch gaps)."""
    return bench_events(capture_graph(fn, warmup).replay, warmup=warmup, iters=iters, flush_l2=flush_l2)


def summarize(samples_ms: Sequence[float]) -> dict:
    xs = sorted(samples_ms)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]

    return {"median_ms": statistics.median(xs), "mean_ms": statistics.fmean(xs),
            "std_ms": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "min_ms": xs[0], "max_ms": xs[-1],
            "p95_ms": pct(95), "p99_ms": pct(99), "n": len(xs)}


def measure_ceilings(device=None) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM peak, measured now on this device."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device or "cuda").random_(0, 255)
    dst = torch.empty_like(src)
    copy = bench_events(lambda: dst.copy_(src), warmup=3, iters=20, flush_l2=False)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device or "cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device or "cuda")
    mm = bench_events(lambda: a @ b, warmup=3, iters=20, flush_l2=False)
    return {"copy_TBps": 2 * n / (copy["median_ms"] * 1e-3) / 1e12,
            "bf16_TFLOPs": 2 * 8192**3 / (mm["median_ms"] * 1e-3) / 1e12}
