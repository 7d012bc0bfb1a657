"""Omni router kernels against the brute-force reference (run on the same GPU values), outputs poisoned first.

The kernel and the reference add the same operands once in fp32 (IEEE, no contraction) and rank by the same exact
order, so indices AND scores must match exactly. Gradients are checked against float64 autograd through the
reference on the upcast inputs (which selects the same experts: the exact order does not depend on precision) to
the gradient dtype's rounding, and must be bit-identical from one call to the next.
"""
import pytest
import torch

import jitmoe
from jitmoe.ops import omni_router as ops
from jitmoe.reference import omni as ref
from jitmoe.testing import poison_, rel_error

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NS = [1, 3, 17, 64, 100, 128, 256, 1000]
KS = [1, 2, 7, 16, 32, 64, 128, 256]
PAIRS = [(n, k) for n in NS for k in KS if k <= n * n]
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


# -- inputs and runs ------------------------------------------------------------------------------------------------
def _logits(num_tokens, n, dtype, kind="randn"):
    x = torch.randn(num_tokens, n, device="cuda")
    y = torch.randn(num_tokens, n, device="cuda")
    if kind == "ties":  # few distinct values: rows full of exact ties, and -0.0 next to 0.0
        x, y = torch.round(x * 4) / 4, torch.round(y * 4) / 4
        x[torch.rand_like(x) < 0.1] = -0.0
        y[torch.rand_like(y) < 0.1] = 0.0
    elif kind == "rounding":  # many different sums round to the same fp32: exercises the exact-order keys
        x, y = x * 1e-3, y * (1e3 if dtype == torch.float16 else 1e6)
    return x.to(dtype), y.to(dtype)


def _num_tokens(n):
    """Odd token counts (not a multiple of the warps per block), sized so the reference stays around 2**24 pairs."""
    return max(5, min(1021, (1 << 24) // (n * n)) | 1)


def _forward(x, y, k):
    """The forward kernel into poisoned outputs."""
    scores = poison_(torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device))
    ids = poison_(torch.empty(x.shape[0], k, dtype=torch.int32, device=x.device))
    ops.launch_forward(x, y, k, scores, ids)
    return scores, ids


def _backward(g, ids, n):
    """The backward kernel into poisoned gradients."""
    gx = poison_(torch.empty(g.shape[0], n, dtype=g.dtype, device=g.device))
    gy = poison_(torch.empty(g.shape[0], n, dtype=g.dtype, device=g.device))
    ops.launch_backward(g, ids, gx, gy)
    return gx, gy


def _assert_forward_matches(x, y, k, scores, ids):
    want_scores, want_ids = ref.omni_router(x, y, k)
    bad = (ids != want_ids).any(dim=1).nonzero()
    if bad.numel():
        t = bad[0, 0].item()
        raise AssertionError(f"{bad.numel()} rows differ; row {t}: got {ids[t].tolist()}, want {want_ids[t].tolist()}")
    assert torch.equal(scores, want_scores), f"scores differ, max {(scores.float() - want_scores.float()).abs().max()}"


def _reference_grads(x, y, k, g):
    """float64 autograd through the reference on the upcast inputs; also returns its indices."""
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    scores, ids = ref.omni_router(x64, y64, k)
    scores.backward(g.double())
    return x64.grad, y64.grad, ids


# -- forward --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", PAIRS, ids=[f"N{n}-k{k}" for n, k in PAIRS])
def test_forward_matches_reference(n, k, dtype, kind):
    x, y = _logits(_num_tokens(n), n, dtype, kind)
    _assert_forward_matches(x, y, k, *_forward(x, y, k))


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 1024, 16384])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(64, 16), (256, 32)])
def test_token_counts(n, k, dtype, num_tokens):
    x, y = _logits(num_tokens, n, dtype, "ties")
    scores, ids = _forward(x, y, k)
    assert scores.shape == ids.shape == (num_tokens, k)
    _assert_forward_matches(x, y, k, scores, ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(17, 7), (64, 64), (256, 32), (300, 16), (1000, 200)])
def test_sums_that_round_together(n, k, dtype):
    """Different sums with equal fp32 values: ranked by exact sum (packed keys for N <= 256 in 16-bit, wide else)."""
    x, y = _logits(33, n, dtype, "rounding")
    _assert_forward_matches(x, y, k, *_forward(x, y, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(8, 5), (100, 32), (256, 64)])
def test_unaligned_and_strided_inputs(n, k, dtype):
    """Rows that cannot be read with vector loads (odd storage offset), and non-contiguous views."""
    buf = torch.randn(2, 1 + 37 * n, device="cuda").to(dtype)
    x, y = buf[0, 1:].view(37, n), buf[1, 1:].view(37, n)
    _assert_forward_matches(x, y, k, *_forward(x, y, k))
    xt, yt = x.t().contiguous().t(), y.t().contiguous().t()
    _assert_forward_matches(x, y, k, *jitmoe.omni_router(xt, yt, k))


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k", [(17, 22), (17, 23), (64, 19), (64, 20), (256, 19), (256, 20), (8, 32), (128, 16)])
def test_short_candidate_tile_boundary(n, k, dtype, kind):
    """16-bit logits, k <= 32: at most 64 candidate pairs run the half-width candidate kernel (N17 k22/23: 64,
    N64/256 k19: 60, N8 k32: 51, N128 k16: 50), more are pruned first (N64/256 k20: 66)."""
    x, y = _logits(_num_tokens(n), n, dtype, kind)
    _assert_forward_matches(x, y, k, *_forward(x, y, k))


# -- pruning (16-bit logits, k <= 32, N <= 256: warp_prune.cuh) ------------------------------------------------------
# Models of the kernel's pruning thresholds, only to pick rows at the hand-over points: the assertions compare the
# kernel with the reference, so a model that drifts from the kernel weakens a test but cannot make it pass wrongly.
PRUNE_STEPS = 3  # kAxisSteps, kCandidateSteps


def _bisect_survivors(vals, lane_of, need, key_of_value):
    """Survivors of warp_prune::threshold over keys given as float values (NaN = empty slot), rows of `vals`.
    key_of_value maps probe midpoints to the value the kernel's probe key stands for."""
    empty = torch.isnan(vals)
    real = torch.where(empty, torch.full_like(vals, float("-inf")), vals)
    lanes = lane_of.expand_as(vals)
    lane_max = torch.full((vals.shape[0], 32), float("-inf"), device=vals.device)
    lane_max = lane_max.scatter_reduce(1, lanes, real, "amax")
    lane_empty = torch.zeros_like(lane_max).scatter_add(1, lanes, (~empty).float()) == 0
    low = torch.where(lane_empty, torch.full_like(lane_max, float("inf")), lane_max).min(1).values
    high = lane_max.max(1).values
    accepted = torch.where(lane_empty.any(1), torch.full_like(low, float("-inf")), low)
    for _ in range(PRUNE_STEPS):
        mid = 0.5 * low + 0.5 * high
        probe = key_of_value(mid)
        ok = ((real >= probe[:, None]) & ~empty).sum(1) >= need
        accepted = torch.where(ok, torch.maximum(accepted, probe), accepted)
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    return ((real >= accepted[:, None]) & ~empty).sum(1)


def _axis_survivors(x, need):
    """Axis rows of N <= 256 (VA = 8, lane l holds elements 8l .. 8l+7). Values stand in for the unique keys: the
    threshold keys tie-break by index, which changes the count only on rows with ties at the threshold."""
    vals = torch.full((x.shape[0], 256), float("nan"), device=x.device)
    vals[:, :x.shape[1]] = x.float()
    lane_of = (torch.arange(256, device=x.device) // 8)[None]
    return _bisect_survivors(vals, lane_of, need, lambda mid: mid.to(x.dtype).float())


def _candidate_survivors(x, y, k):
    """Candidate pairs of prune_candidates (table row-major in the axis rank a, slot c = r*32 + lane)."""
    n = x.shape[1]
    m = min(k, n)
    xs = torch.sort(x.float(), dim=1, descending=True, stable=True).values[:, :m]
    ys = torch.sort(y.float(), dim=1, descending=True, stable=True).values[:, :m]
    pairs = [(a, b) for a in range(m) for b in range(min(k // (a + 1), n))]
    ra, rb = (torch.tensor(v, device=x.device) for v in zip(*pairs))
    vals = torch.full((x.shape[0], 128), float("nan"), device=x.device)
    vals[:, :len(pairs)] = xs[:, ra] + ys[:, rb]
    lane_of = (torch.arange(128, device=x.device) % 32)[None]
    return _bisect_survivors(vals, lane_of, k, lambda mid: mid)


def _pool(num_tokens, n, dtype):
    """Rows of every kind of _logits, so that survivor counts spread widely."""
    parts = [_logits(num_tokens, n, dtype, kind) for kind in ("randn", "ties")]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _rows_with(counts, wanted):
    """Indices of one row for every count in `wanted` (each must occur), plus the rows of the largest count."""
    picked = []
    for c in wanted:
        hits = (counts == c).nonzero()
        assert hits.numel(), f"no row with {c} survivors (counts {counts.min().item()}..{counts.max().item()})"
        picked.append(hits[0, 0])
    picked.append(counts.argmax())
    return torch.stack(picked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pruned_axis_tile_boundary(dtype):
    """N = 256, k = 32: axis survivors of 32 .. 64 sort in one 64-slot tile, 65 and more in two (smaller k keep
    fewer than 64 on these rows; the forward tests above run them)."""
    k = 32
    x, y = _pool(20000, 256, dtype)
    rows_x = _rows_with(_axis_survivors(x, k), [64, 65])
    rows_y = _rows_with(_axis_survivors(y, k), [64, 65])
    rows = torch.cat([rows_x, rows_y])
    _assert_forward_matches(x[rows], y[rows], k, *_forward(x[rows].contiguous(), y[rows].contiguous(), k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k", [(256, 32), (100, 32), (17, 32)])
def test_pruned_candidate_tile_boundary(n, k, dtype):
    """More than 64 candidate pairs (k >= 20): survivors of up to 64 rank in one tile, 65 and more in two (k = 20
    keeps fewer than 64 on these rows: test_short_candidate_tile_boundary runs it)."""
    x, y = _pool(20000, n, dtype)
    counts = _candidate_survivors(x, y, k)
    rows = _rows_with(counts, [64, 65])
    _assert_forward_matches(x[rows], y[rows], k, *_forward(x[rows].contiguous(), y[rows].contiguous(), k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [129, 200, 255, 256])
@pytest.mark.parametrize("k", [1, 16, 20, 32])
def test_pruning_without_help(n, k, dtype):
    """Rows where pruning keeps everything or starts from every element: constant rows (all N, all candidate
    pairs survive), one large value per row, and N < 256 (empty lanes in the 256-slot axis tile)."""
    num_tokens = 67
    x, y = _logits(num_tokens, n, dtype, "ties")
    x[:8], y[:8] = 1.0, -0.5                       # constant rows
    x[8:16, 0], y[8:16, n - 1] = 100.0, 100.0      # a single outlier per row
    x[16:24] = torch.arange(n, device="cuda").to(dtype)  # increasing rows: the best elements in the last lanes
    _assert_forward_matches(x, y, k, *_forward(x, y, k))


def test_forward_is_deterministic():
    x, y = _logits(4097, 256, torch.bfloat16, "ties")
    first, second = _forward(x, y, 32), _forward(x, y, 32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# -- backward -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (17, 256), (64, 16), (100, 64), (256, 32), (1000, 128)])
def test_backward_matches_reference_autograd(n, k, dtype):
    x, y = _logits(_num_tokens(n), n, dtype, "ties")  # ties: many slots share a row i or a column j
    g = torch.randn(x.shape[0], k, device="cuda").to(dtype)
    _, ids = _forward(x, y, k)
    gx, gy = _backward(g, ids, n)
    want_gx, want_gy, want_ids = _reference_grads(x, y, k, g)
    assert torch.equal(ids, want_ids)
    assert gx.dtype == gy.dtype == dtype
    assert rel_error(gx, want_gx) <= GRAD_TOL[dtype] and rel_error(gy, want_gy) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_twice_is_identical(dtype):
    n, k = 128, 64
    x, y = _logits(1021, n, dtype, "ties")
    g = torch.randn(x.shape[0], k, device="cuda").to(dtype)
    _, ids = _forward(x, y, k)
    first, second = _backward(g, ids, n), _backward(g, ids, n)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_through_public_api(dtype):
    n, k = 64, 16
    x, y = _logits(513, n, dtype)
    g = torch.randn(x.shape[0], k, device="cuda").to(dtype)
    grads = []
    for _ in range(2):  # the second call must not see anything of the first
        xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
        scores, ids = jitmoe.omni_router(xa, ya, k)
        scores.backward(g)
        grads.append((xa.grad, ya.grad))
    want_gx, want_gy, want_ids = _reference_grads(x, y, k, g)
    assert torch.equal(ids, want_ids)
    assert rel_error(grads[0][0], want_gx) <= GRAD_TOL[dtype] and rel_error(grads[0][1], want_gy) <= GRAD_TOL[dtype]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_anchor_call_shape():
    x, y = _logits(100, 64, torch.bfloat16)
    scores, ids = jitmoe.omni_router_func(x, y, 64, 16)
    _assert_forward_matches(x, y, 16, scores, ids)


# -- CUDA graphs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_capture_and_replay(dtype):
    n, k, num_tokens = 256, 32, 1000
    x, y = _logits(num_tokens, n, dtype)
    g = torch.randn(num_tokens, k, device="cuda").to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: loads the module outside the capture
        _, warm_ids = jitmoe.omni_router(x, y, k)
        torch.ops.jitmoe.omni_router_backward(g, warm_ids, n)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scores, ids = jitmoe.omni_router(x, y, k)
        gx, gy = torch.ops.jitmoe.omni_router_backward(g, ids, n)
    for kind in ("randn", "ties"):
        new_x, new_y = _logits(num_tokens, n, dtype, kind)
        x.copy_(new_x), y.copy_(new_y), g.copy_(torch.randn_like(g, dtype=torch.float32).to(dtype))
        for out in (scores, ids, gx, gy):
            poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        _assert_forward_matches(x, y, k, scores, ids)
        want_gx, want_gy, _ = _reference_grads(x, y, k, g)
        assert rel_error(gx, want_gx) <= GRAD_TOL[dtype] and rel_error(gy, want_gy) <= GRAD_TOL[dtype]


def test_cuda_graph_of_autograd_grad():
    """What the benchmark captures: forward and torch.autograd.grad through the registered autograd, replayed."""
    n, k, num_tokens, dtype = 256, 32, 777, torch.bfloat16
    x, y = _logits(num_tokens, n, dtype)
    x.requires_grad_(), y.requires_grad_()
    g = torch.randn(num_tokens, k, device="cuda").to(dtype)

    def step():
        scores, ids = jitmoe.omni_router(x, y, k)
        return (scores, ids) + torch.autograd.grad(scores, (x, y), g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    new_x, new_y = _logits(num_tokens, n, dtype, "ties")
    with torch.no_grad():
        x.copy_(new_x), y.copy_(new_y)
    for out in outputs:
        poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    scores, ids, gx, gy = outputs
    _assert_forward_matches(x.detach(), y.detach(), k, scores, ids)
    want_gx, want_gy, _ = _reference_grads(x.detach(), y.detach(), k, g)
    assert rel_error(gx, want_gx) <= GRAD_TOL[dtype] and rel_error(gy, want_gy) <= GRAD_TOL[dtype]


# -- errors on CUDA tensors -----------------------------------------------------------------------------------------
def test_errors_on_cuda():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(TypeError, match="router_logits_x: expected dtype float32/bfloat16/float16, got float64"):
        jitmoe.omni_router(x.double(), x.double(), 3)
    with pytest.raises(ValueError, match="router_logits_y: expected a tensor on cuda:0 \\(router_logits_x\\), got cpu"):
        jitmoe.omni_router(x, x.cpu(), 3)
    with pytest.raises(ValueError, match="top_k: .* = 25 \\(N = 5\\), got 26"):
        jitmoe.omni_router(x, x, 26)
    g, ids = torch.randn(4, 3, device="cuda"), torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="indices: expected a tensor on cuda:0, got cpu"):
        torch.ops.jitmoe.omni_router_backward(g, ids, 5)
    with pytest.raises(TypeError, match="grad_scores: expected dtype float32/bfloat16/float16, got float64"):
        torch.ops.jitmoe.omni_router_backward(g.double(), ids.cuda(), 5)
