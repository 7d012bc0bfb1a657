"""Expert Choice kernels against the torch reference on the same inputs, outputs poisoned first.

The kernels compute scores with the same fixed fp32 recipe as the reference (jitmoe/reference/expert_choice.py), so
the routing must match exactly: ids and counts bit for bit, weights to 1e-6 (in fact bitwise), even where two
tokens' scores differ in the last bit and on quantised logits full of exact ties.
"""
import importlib
import itertools
import math

import pytest
import torch

import jitmoe
from jitmoe.ops import expert_choice as ops
from jitmoe.testing import poison_

ref = importlib.import_module("jitmoe.reference.expert_choice")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXPERTS = [8, 60, 64, 128, 160, 256, 384, 512, 1000, 4096]
SMALL_TOKENS = [1, 3, 256]
CAPACITY_FACTORS = [0.5, 1.0, 1.25, 2.0]
# (normalize_over, fallback, expert_major, masked): every combination, cycled through the size grid
MODES = list(itertools.product(["experts", "tokens"], ["topk", "none"], [False, True], [False, True]))


# -- inputs and checks -------------------------------------------------------------------------------------------------
def _logits(num_tokens, num_experts, dtype, quantised=False):
    x = torch.randn(num_tokens, num_experts, device="cuda") * 2
    if quantised:  # few distinct values: columns and rows full of exact ties
        x = torch.round(x) * 0.5
    return x.to(dtype)


def _mask(num_tokens, masked):
    return (torch.rand(num_tokens, device="cuda") > 0.3) if masked else None


def _run_kernel(x, mask, k, capacity, normalize_over, fallback, expert_major, path="auto"):
    outputs = tuple(poison_(t) for t in ops.new_outputs(x, k, capacity, expert_major))
    ops.launch_expert_choice(x, mask, k, capacity, normalize_over, fallback, expert_major, outputs, path)
    return outputs


def _assert_routing_equal(got, want, expert_major, what):
    names = ("token_ids", "weights", "counts") if expert_major else ("weights", "ids", "counts")
    for name, g, w in zip(names, got, want):
        g = g.cpu()
        if name == "weights":
            assert torch.isfinite(g).all(), f"{what}: {name} has unwritten (poisoned) entries"
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")
            continue
        bad = (g != w).nonzero()
        if bad.numel():
            r = bad[0, 0].item()
            row_got, row_want = (g[r].tolist(), w[r].tolist()) if g.dim() == 2 else (g.tolist(), w.tolist())
            raise AssertionError(f"{what}: {name}: {bad.shape[0]} entries differ; first at {bad[0].tolist()}: "
                                 f"got {row_got[:16]}, want {row_want[:16]}")


def _check(x, k, cf, normalize_over="experts", fallback="topk", expert_major=False, mask=None, path="auto"):
    capacity = jitmoe.expert_choice_capacity(*x.shape, k, cf)
    got = _run_kernel(x, mask, k, capacity, normalize_over, fallback, expert_major, path)
    want = ref.route_expert_choice(x.cpu(), None if mask is None else mask.cpu(), k, capacity, normalize_over,
                                   fallback, expert_major)
    what = (f"T={x.shape[0]} E={x.shape[1]} k={k} cf={cf} {x.dtype} {normalize_over} fallback={fallback} "
            f"{'expert' if expert_major else 'token'}-major{' masked' if mask is not None else ''} path={path}")
    _assert_routing_equal(got, want, expert_major, what)


def _size_grid():
    cases = []
    for num_experts in EXPERTS:
        for num_tokens in SMALL_TOKENS:
            for k in sorted({1, min(8, num_experts), min(64, num_experts)}):
                cases.append((num_tokens, num_experts, k, len(cases)))
    return cases


# -- sizes, dtypes, modes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,k,index", _size_grid())
def test_small_batches(num_tokens, num_experts, k, index, dtype):
    normalize_over, fallback, expert_major, masked = MODES[index % len(MODES)]
    cf = CAPACITY_FACTORS[index % len(CAPACITY_FACTORS)]
    x = _logits(num_tokens, num_experts, dtype, quantised=index % 3 == 0)
    _check(x, k, cf, normalize_over, fallback, expert_major, _mask(num_tokens, masked))


# (E, k, dtype, mode) at T = 16384; mode picks normalize_over, fallback, output layout, padding and capacity factor
LARGE = [(8, 2, torch.float32, 0), (8, 8, torch.float16, 1), (64, 8, torch.bfloat16, 2), (64, 64, torch.float32, 3),
         (256, 8, torch.bfloat16, 0), (256, 8, torch.float32, 1), (256, 64, torch.float16, 2),
         (256, 16, torch.bfloat16, 3), (1000, 16, torch.float32, 0), (1000, 8, torch.bfloat16, 1),
         (4096, 8, torch.bfloat16, 2)]
LARGE_MODES = [("experts", "topk", False), ("tokens", "none", True), ("experts", "none", False),
               ("tokens", "topk", False)]


@pytest.mark.parametrize("num_experts,k,dtype,mode", LARGE, ids=str)
def test_large_batches(num_experts, k, dtype, mode):
    normalize_over, fallback, expert_major = LARGE_MODES[mode]
    x = _logits(16384, num_experts, dtype)
    _check(x, k, CAPACITY_FACTORS[mode], normalize_over, fallback, expert_major, _mask(16384, mode >= 2))


@pytest.mark.parametrize("num_experts", [8, 64, 256])
@pytest.mark.parametrize("expert_major", [False, True])
def test_ties_on_quantised_logits(num_experts, expert_major):
    # 16384 tokens and a handful of distinct values: the radix select keeps whole columns of equal scores as
    # candidates (more than fit its shared-memory list), and ties decide by token id.
    x = _logits(16384, num_experts, torch.bfloat16, quantised=True)
    for cf in (0.5, 2.0):
        _check(x, 8 if num_experts > 8 else 2, cf, "experts", "topk", expert_major)
        _check(x, 8 if num_experts > 8 else 2, cf, "tokens", "none", expert_major)


@pytest.mark.parametrize("normalize_over", ["experts", "tokens"])
def test_columns_longer_than_the_key_cache(normalize_over):
    # T = 40000 keys do not fit a selector's shared-memory cache: every pass recomputes them from the logits.
    x = _logits(40000, 64, torch.float32)
    path = "columns" if normalize_over == "experts" else "auto"  # auto would take the candidate path
    _check(x, 4, 1.25, normalize_over, "topk", mask=_mask(40000, True), path=path)
    _check(x, 4, 1.25, normalize_over, "none", expert_major=True, path=path)


def test_all_tokens_padding():
    x = _logits(256, 64, torch.float32)
    mask = torch.zeros(256, dtype=torch.bool, device="cuda")
    for expert_major in (False, True):
        _check(x, 8, 1.25, "tokens", "topk", expert_major, mask)


def test_public_api_on_cuda():
    x = _logits(300, 128, torch.bfloat16)
    mask = _mask(300, True)
    for kwargs in ({}, {"expert_major": True}, {"normalize_over": "tokens", "fallback": "none"}):
        got = jitmoe.expert_choice(x, 8, 1.25, token_mask=mask, return_counts=True, **kwargs)
        want = ref.expert_choice(x.cpu(), 8, 1.25, token_mask=mask.cpu(), return_counts=True, **kwargs)
        assert all(g.is_cuda for g in got)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w)


# -- the kernel paths --------------------------------------------------------------------------------------------------
# "auto" takes the key path for normalize_over="experts" from 1024 to 32768 tokens (E <= 1024), else the candidate
# path where it fits (from 2048 tokens, E <= 256, C <= T / 2), else the column path; force each path on the others'
# ground.
FORCED_PATH_CASES = {
    "candidates": [(1, 8, 1), (3, 60, 8), (256, 64, 8), (256, 1000, 64), (2048, 8, 2), (2048, 160, 16),
                   (4096, 256, 8), (5000, 384, 4), (3000, 4096, 8), (16384, 64, 8), (16384, 512, 32)],
    "keys": [(1, 8, 1), (3, 60, 8), (256, 64, 8), (256, 1000, 64), (2048, 8, 2), (2048, 160, 16), (4096, 256, 8),
             (5000, 384, 4), (3000, 1024, 8), (16384, 64, 8), (16384, 256, 8), (16384, 512, 32), (65536, 96, 6)],
}
# (fallback, expert_major, masked) of each variant; the variant also picks the dtype, capacity factor and ties
FORCED_PATH_VARIANTS = [("topk", False, False), ("none", True, True), ("topk", False, True), ("none", False, False)]


@pytest.mark.parametrize("path,num_tokens,num_experts,k",
                         [(path, *case) for path, cases in FORCED_PATH_CASES.items() for case in cases], ids=str)
@pytest.mark.parametrize("variant", range(len(FORCED_PATH_VARIANTS)))
def test_forced_path(path, num_tokens, num_experts, k, variant):
    fallback, expert_major, masked = FORCED_PATH_VARIANTS[variant]
    dtype = DTYPES[(variant + num_experts) % 3]
    x = _logits(num_tokens, num_experts, dtype, quantised=variant == 3)
    _check(x, k, CAPACITY_FACTORS[variant], "experts", fallback, expert_major, _mask(num_tokens, masked), path=path)


@pytest.mark.parametrize("expert_major", [False, True])
def test_candidate_path_misleading_sample(expert_major):
    # The candidate bounds come from every (T / 1024)-th token. Expert 0 scores high exactly on the sampled tokens
    # (its bound is too high: too few candidates), expert 1 low on them (too many candidates), so both fall back to
    # their whole columns; a few flat tokens are picked by almost every expert (more picks than their pick list
    # holds), and peaked tokens are picked by few (the fallback fills their slots).
    T, E = 8192, 64
    x = torch.randn(T, E, device="cuda") * 3
    sampled = torch.arange(1024, device="cuda") * T // 1024
    x[sampled, 0] += 6.0
    x[sampled, 1] -= 6.0
    x[torch.randint(0, T, (40,), device="cuda")] = 0.0
    x[:, 2] += torch.where(torch.rand(T, device="cuda") < 0.1, 8.0, 0.0)
    for path in ("candidates", "columns"):
        _check(x, 8, 1.25, "experts", "topk", expert_major, path=path)
        _check(x, 2, 0.5, "experts", "none", expert_major, path=path)


@pytest.mark.parametrize("num_experts,k,dtype", [(256, 8, torch.bfloat16), (60, 4, torch.float32)], ids=str)
def test_column_path_on_large_batches(num_experts, k, dtype):
    x = _logits(16384, num_experts, dtype)
    _check(x, k, 1.25, "experts", "topk", False, _mask(16384, True), path="columns")
    _check(x, k, 1.0, "experts", "none", True, path="columns")


@pytest.mark.parametrize("expert_major", [False, True])
def test_key_path_large_boundary_bins(expert_major):
    # Peaked rows: most scores fall below 2^-23 (one shared key) or underflow to exactly 0, so with C = T / 4 an
    # expert's boundary bin holds thousands of tokens (ranked by radix passes, ties to the lower token). Some rows
    # are flat: their tokens are picked by most experts (more picks than a finalizer warp has lanes: routed from
    # their rows).
    T, E = 8192, 64
    x = torch.randn(T, E, device="cuda") * 40
    x[torch.randint(0, T, (40,), device="cuda")] = 0.0
    for k, cf in ((8, 2.0), (2, 0.5)):
        _check(x, k, cf, "experts", "topk", expert_major, path="keys")
        _check(x, k, cf, "experts", "none", expert_major, _mask(T, True), path="keys")


def test_key_path_boundary_bins_of_every_size():
    # bf16 logits on a coarse grid: boundary bins from a handful of tokens to a few hundred (the pairwise ranking up
    # to kRankList = 512 tokens, radix passes beyond), for several capacities.
    x = (torch.randn(16384, 32, device="cuda") * 4).round().to(torch.bfloat16) * 0.25
    for k, cf in ((1, 0.3), (4, 1.0), (8, 2.0), (16, 3.0)):
        _check(x, k, cf, "experts", "topk", False, path="keys")


@pytest.mark.parametrize("expert_major", [False, True])
def test_key_path_near_ties_across_tokens(expert_major):
    # Every row is a permutation of one row: an expert sees each logit on T / E tokens whose denominators differ
    # only in summation order, so their scores tie or differ in the last bits, and the boundary bins are large.
    T, E = 16384, 256
    base = torch.randn(E, device="cuda") * 2
    x = base[torch.argsort(torch.rand(T, E, device="cuda"), dim=1)]
    for k, cf, fallback in ((8, 1.25, "topk"), (2, 0.5, "none")):
        _check(x, k, cf, "experts", fallback, expert_major, path="keys")


def test_key_path_near_ties_within_tokens():
    # fp32 logits in pairs one ulp apart, and rows whose other experts all score about e^-80 (near the subnormal
    # range): a token's outputs are ordered by scores that differ in the last bits, or tie after rounding.
    T, E = 4096, 64
    x = torch.randn(T, E, device="cuda") * 2
    x[:, 1::2] = torch.nextafter(x[:, 0::2], torch.full_like(x[:, 0::2], math.inf))
    x[::7] = -80.0 + torch.randn_like(x[::7]) * 1e-3
    x[::7, 0] = 0.0
    for k, cf, fallback in ((8, 1.25, "topk"), (4, 0.5, "topk"), (8, 2.0, "none")):
        _check(x, k, cf, "experts", fallback, False, _mask(T, k == 4), path="keys")


def test_paths_reject_what_they_cannot_run():
    x = _logits(64, 8, torch.float32)
    with pytest.raises(ValueError, match="normalize_over"):
        _run_kernel(x, None, 2, 16, "tokens", "topk", False, path="candidates")
    with pytest.raises(ValueError, match="key path"):
        _run_kernel(x, None, 2, 16, "tokens", "topk", False, path="keys")
    with pytest.raises(ValueError, match="key path"):
        _run_kernel(_logits(8, 2048, torch.float32), None, 2, 4, "experts", "topk", False, path="keys")
    with pytest.raises(ValueError, match="path"):
        _run_kernel(x, None, 2, 16, "experts", "topk", False, path="fastest")


# -- CUDA graphs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expert_major", [False, True])
@pytest.mark.parametrize("normalize_over,num_tokens", [("experts", 512), ("tokens", 512), ("experts", 4096)])
def test_cuda_graph_replay(expert_major, normalize_over, num_tokens):
    static_x = _logits(num_tokens, 160, torch.bfloat16)
    static_mask = _mask(num_tokens, True)
    call = lambda: jitmoe.expert_choice(static_x, 8, 1.25, normalize_over=normalize_over, token_mask=static_mask,
                                        expert_major=expert_major, return_counts=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside the graph (builds/loads the module)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    for _ in range(3):
        static_x.copy_(_logits(num_tokens, 160, torch.bfloat16))
        static_mask.copy_(_mask(num_tokens, True))
        for out in outputs:
            poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.expert_choice(static_x.cpu(), 8, 1.25, normalize_over=normalize_over,
                                 token_mask=static_mask.cpu(), expert_major=expert_major, return_counts=True)
        _assert_routing_equal(outputs, want, expert_major, "graph replay")
