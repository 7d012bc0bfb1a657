"""Omni router on the CPU: reference semantics (exact-sum order, index tie rule), the candidate lemma the kernel
relies on, gradients (fp64 gradcheck), every error, fake shapes, specs and template compilation."""
import shutil
from fractions import Fraction

import pytest
import torch

import jitmoe
from jitmoe.ops import omni_router as ops
from jitmoe.reference import omni as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -- inputs ---------------------------------------------------------------------------------------------------------
def _logits(num_tokens, n, dtype, kind="randn"):
    x, y = torch.randn(num_tokens, n), torch.randn(num_tokens, n)
    if kind == "ties":  # few distinct values: rows full of exact ties, and -0.0 next to 0.0
        x, y = torch.round(x * 4) / 4, torch.round(y * 4) / 4
        x[torch.rand_like(x) < 0.1] = -0.0
    elif kind == "rounding":  # x is far below the last bit of y: many different sums round to the same fp32
        x, y = x * 1e-3, y * (1e3 if dtype == torch.float16 else 1e6)
    return x.to(dtype), y.to(dtype)


# -- independent re-derivations (plain Python, exact rationals) -----------------------------------------------------
def _brute_force(x, y, k):
    """Flat indices by (exact sum desc, index asc) and the sums rounded to fp32 then to the input dtype."""
    n = x.shape[1]
    ids, scores = [], []
    for xr, yr in zip(x.double().tolist(), y.double().tolist()):
        order = sorted(range(n * n), key=lambda f: (-(Fraction(xr[f // n]) + Fraction(yr[f % n])), f))[:k]
        ids.append(order)
        scores.append([xr[f // n] + yr[f % n] for f in order])  # exact in fp64 for these inputs
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(scores, dtype=torch.float64)


def _fp32_scores(x, y, ids):
    n = x.shape[1]
    flat = ids.long()
    return (x.float().gather(1, flat // n) + y.float().gather(1, flat % n)).to(x.dtype)


def _exact_rank_keys(x, y, flat):
    """TwoSum (s, e) of the given pairs: the exact order as two fp32 keys (as the kernel's candidate keys)."""
    n = x.shape[1]
    a, b = x.float().gather(1, flat // n), y.float().gather(1, flat % n)
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _candidate_method(x, y, k):
    """The kernel's algorithm in torch: per-axis top-min(k, N) by (value desc, index asc), the rank pairs with
    (a+1)(b+1) <= k, then the exact order among those candidates only."""
    n = x.shape[1]
    m = min(k, n)
    ix = torch.sort(x.float(), dim=1, descending=True, stable=True).indices[:, :m]
    iy = torch.sort(y.float(), dim=1, descending=True, stable=True).indices[:, :m]
    pairs = [(a, b) for a in range(m) for b in range(m) if (a + 1) * (b + 1) <= k]
    ra, rb = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    flat = torch.sort(ix[:, ra] * n + iy[:, rb], dim=1).values  # index ascending, then stable sorts by e and s
    _, e = _exact_rank_keys(x, y, flat)
    flat = flat.gather(1, torch.sort(e, dim=1, descending=True, stable=True).indices)
    s, _ = _exact_rank_keys(x, y, flat)
    flat = flat.gather(1, torch.sort(s, dim=1, descending=True, stable=True).indices)
    return flat[:, :k].to(torch.int32)


# -- reference semantics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (3, 9), (5, 4), (6, 20)])
def test_reference_matches_brute_force(dtype, kind, n, k):
    x, y = _logits(4, n, dtype, kind)
    scores, ids = ref.omni_router(x, y, k)
    want_ids, want_sums = _brute_force(x, y, k)
    assert ids.dtype == torch.int32 and scores.dtype == dtype and ids.shape == scores.shape == (4, k)
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores, want_sums.float().to(dtype))  # one rounding of the exact sum to fp32


def test_tie_order_is_index_ascending():
    x = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([[0.0, -0.0, 1.0]])
    # sums: (0,0)=1 (0,1)=1 (0,2)=2 (1,0)=1 (1,1)=1 (1,2)=2 (2,*)=0,0,1
    _, ids = jitmoe.omni_router(x, y, 9)
    assert ids.tolist() == [[2, 5, 0, 1, 3, 4, 8, 6, 7]]


def test_equal_fp32_sums_rank_by_exact_sum():
    # 1 + 2**-30 rounds to 1.0 in fp32 but is larger than 1 + 0: the exact order puts index 2 before index 0.
    x = torch.tensor([[0.0, 2.0**-30]])
    y = torch.tensor([[1.0, -5.0]])
    scores, ids = jitmoe.omni_router(x, y, 2)
    assert ids.tolist() == [[2, 0]] and scores.tolist() == [[1.0, 1.0]]


def test_nan_ranks_first():
    x = torch.tensor([[1.0, float("nan")]])
    y = torch.tensor([[0.0, 2.0]])
    scores, ids = jitmoe.omni_router(x, y, 3)
    assert ids.tolist() == [[2, 3, 1]] and scores[0, :2].isnan().all() and scores[0, 2].item() == 3.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "ties", "rounding"])
@pytest.mark.parametrize("n,k", [(2, 3), (5, 25), (16, 7), (16, 40), (40, 64), (70, 128), (30, 256)])
def test_candidate_lemma(dtype, kind, n, k):
    """The kernel's candidate set (rank pairs with (a+1)(b+1) <= k) holds the exact answer, ties included."""
    x, y = _logits(6, n, dtype, kind)
    assert torch.equal(_candidate_method(x, y, k), ref.omni_router(x, y, k)[1])


def test_exact_order_differs_from_fp32_order_only_on_rounding():
    x, y = _logits(64, 16, torch.float32, "rounding")
    _, ids = ref.omni_router(x, y, 8)
    sums = (x[:, :, None] + y[:, None, :]).flatten(1)
    by_fp32 = torch.sort(sums, dim=1, descending=True, stable=True).indices[:, :8]
    assert not torch.equal(ids.long(), by_fp32)  # the rounding inputs do exercise the exact order
    scores = ref.omni_router(x, y, 8)[0]
    assert torch.equal(scores, _fp32_scores(x, y, ids))
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # the fp32 scores are still sorted descending


def test_zero_tokens():
    x = torch.empty(0, 5, dtype=torch.bfloat16)
    scores, ids = jitmoe.omni_router(x, x.clone(), 4)
    assert scores.shape == ids.shape == (0, 4) and scores.dtype == torch.bfloat16 and ids.dtype == torch.int32


def test_large_rows_are_chunked():
    x, y = _logits(3, 1100, torch.float32)  # 1.21M pairs per row: one row per chunk
    scores, ids = ref.omni_router(x, y, 5)
    assert torch.equal(ids, _candidate_method(x, y, 5))
    assert torch.equal(scores, _fp32_scores(x, y, ids))


# -- gradients ------------------------------------------------------------------------------------------------------
def test_gradcheck_float64():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: jitmoe.omni_router(a, b, 5)[0], (x, y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_autograd_of_reference(dtype):
    x, y = _logits(7, 9, dtype, "ties")
    g = torch.randn(7, 12).to(dtype)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref.omni_router(xa, ya, 12)[0].backward(g)
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    jitmoe.omni_router(xb, yb, 12)[0].backward(g)
    assert xb.grad.dtype == dtype
    assert torch.equal(xb.grad, xa.grad) and torch.equal(yb.grad, ya.grad)


def test_backward_formula():
    indices = torch.tensor([[5, 1, 4, 3]], dtype=torch.int32)  # N = 3: (1,2) (0,1) (1,1) (1,0)
    g = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    gx, gy = torch.ops.jitmoe.omni_router_backward(g, indices, 3)
    assert gx.tolist() == [[2.0, 13.0, 0.0]] and gy.tolist() == [[8.0, 6.0, 1.0]]


def test_backward_is_deterministic():
    x, y = _logits(5, 11, torch.float32, "ties")
    g = torch.randn(5, 30)
    grads = []
    for _ in range(2):
        xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
        jitmoe.omni_router(xa, ya, 30)[0].backward(g)
        grads.append((xa.grad, ya.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_indices_are_not_differentiable():
    x = torch.randn(2, 4, requires_grad=True)
    scores, ids = jitmoe.omni_router(x, torch.randn(2, 4), 3)
    assert scores.requires_grad and not ids.requires_grad


# -- API shapes -----------------------------------------------------------------------------------------------------
def test_anchor_call_shape():
    x, y = _logits(3, 8, torch.float32)
    scores, ids = jitmoe.omni_router_func(x, y, 8, 16)
    want_scores, want_ids = jitmoe.omni_router(x, y, 16)
    assert torch.equal(scores, want_scores) and torch.equal(ids, want_ids)
    with pytest.raises(ValueError, match="num_expert_sqrt: expected the number of columns of router_logits_x \\(8\\)"):
        jitmoe.omni_router_func(x, y, 4, 16)


def test_non_contiguous_inputs():
    x, y = _logits(6, 5, torch.float32)
    xt, yt = x.t().contiguous().t(), y.t().contiguous().t()
    assert not xt.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(jitmoe.omni_router(xt, yt, 6), jitmoe.omni_router(x, y, 6)))


def test_fake_shapes():
    x, y = torch.empty(7, 9, device="meta"), torch.empty(7, 9, device="meta")
    scores, ids = torch.ops.jitmoe.omni_router(x, y, 11)
    assert (scores.shape, scores.dtype, ids.shape, ids.dtype) == ((7, 11), torch.float32, (7, 11), torch.int32)
    g = torch.empty(7, 11, device="meta", dtype=torch.bfloat16)
    gx, gy = torch.ops.jitmoe.omni_router_backward(g, ids, 9)
    assert gx.shape == gy.shape == (7, 9) and gx.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.jitmoe.omni_router(x, y, 82)


def test_opcheck():
    x, y = _logits(4, 6, torch.float32)
    torch.library.opcheck(torch.ops.jitmoe.omni_router.default, (x.requires_grad_(), y.requires_grad_(), 7))
    ids = jitmoe.omni_router(x, y, 7)[1]
    torch.library.opcheck(torch.ops.jitmoe.omni_router_backward.default, (torch.randn(4, 7), ids, 6))


# -- errors ---------------------------------------------------------------------------------------------------------
def _err_cases():
    x = torch.randn(4, 5)
    return [
        ((x.numpy(), x, 3), TypeError, "router_logits_x: expected a torch.Tensor, got ndarray"),
        ((x, [1.0], 3), TypeError, "router_logits_y: expected a torch.Tensor, got list"),
        ((x.long(), x.long(), 3), TypeError, "router_logits_x: expected dtype float32/bfloat16/float16/float64, "
                                             "got int64"),
        ((x, x.half(), 3), TypeError, "router_logits_y: expected the dtype of router_logits_x"),
        ((x[0], x[0], 3), ValueError, "router_logits_x: expected a 2-D tensor, got 1-D"),
        ((x, x[None], 3), ValueError, "router_logits_y: expected a 2-D tensor, got 3-D"),
        ((x, x[:3], 3), ValueError, "router_logits_y: expected 4 tokens \\(rows of router_logits_x\\), got 3"),
        ((x, x[:, :4], 3), ValueError, "router_logits_y: expected N = 5 columns"),
        ((x[:, :0], x[:, :0], 1), ValueError, "router_logits_x: expected 1 <= N <= 46340 columns, got 0"),
        ((x, x, 0), ValueError, "top_k: expected 1 <= top_k <= min\\(N\\*N, 256\\) = 25 \\(N = 5\\), got 0"),
        ((x, x, 26), ValueError, "top_k: .* = 25 \\(N = 5\\), got 26"),
        ((torch.randn(2, 17), torch.randn(2, 17), 257), ValueError, "top_k: .* = 256 \\(N = 17\\), got 257"),
        ((x, x, 2.0), TypeError, "top_k: expected an int, got float"),
        ((x, x, True), TypeError, "top_k: expected an int, got bool"),
        ((x, x.to("meta"), 3), ValueError, "router_logits_y: expected a tensor on cpu \\(router_logits_x\\), got meta"),
    ]


@pytest.mark.parametrize("case", range(len(_err_cases())))
def test_errors(case):
    args, exc, msg = _err_cases()[case]
    with pytest.raises(exc, match=msg):
        jitmoe.omni_router(*args)
    if isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor) and type(args[2]) is int:
        with pytest.raises(exc, match=msg):  # the op itself validates the same way
            torch.ops.jitmoe.omni_router(*args)


def test_float64_only_on_cpu():
    x = torch.randn(2, 3, dtype=torch.float64)
    jitmoe.omni_router(x, x, 2)
    with pytest.raises(TypeError, match="router_logits_x: expected dtype float32/bfloat16/float16, got float64"):
        ops._check_forward(x.to("meta"), x.to("meta"), 2)


def test_backward_errors():
    g, ids = torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.int32)
    bwd = torch.ops.jitmoe.omni_router_backward
    with pytest.raises(TypeError, match="indices: expected dtype int32, got int64"):
        bwd(g, ids.long(), 5)
    with pytest.raises(ValueError, match="indices: expected the shape of grad_scores \\(3, 4\\), got \\(3, 3\\)"):
        bwd(g, ids[:, :3], 5)
    with pytest.raises(ValueError, match="grad_scores: expected 1 <= top_k <= 256 columns, got 0"):
        bwd(g[:, :0], ids[:, :0], 5)
    with pytest.raises(ValueError, match="num_expert_sqrt: expected 1 <= N <= 46340, got 0"):
        bwd(g, ids, 0)
    with pytest.raises(TypeError, match="grad_scores: expected dtype"):
        bwd(g.long(), ids, 5)


# -- specs, prewarm, templates --------------------------------------------------------------------------------------
def test_topk_bucket():
    assert [ops.topk_bucket(k) for k in (1, 32, 33, 64, 65, 128, 129, 256)] == [32, 32, 64, 64, 128, 128, 256, 256]


def test_prewarm_specs():
    specs = ops.PREWARM["omni_router"](["fp32", "bf16"], [1, 7, 32, 64, 256], ["80", "90a"])
    names = sorted(s.readable_name for s in specs)
    assert names == sorted(f"omni_router_{d}_kb{b}_sm{a}" for d in ("fp32", "bf16") for b in (32, 64, 256)
                           for a in ("80", "90a"))
    for spec in specs:
        for text in spec.rendered_sources().values():
            assert "${" not in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("spec", [ops._spec("bf16", 32, ("90a",)), ops._spec("fp16", 32, ("80",)),
                                  ops._spec("fp32", 256, ("80",))],
                         ids=lambda s: s.readable_name)
def test_templates_compile_without_spills(spec, tmp_path):
    from jitmoe.jit import compile_cuda_sources
    (compiled,) = compile_cuda_sources(spec, tmp_path, ptxas_verbose=True)
    assert "warning" not in compiled.output.lower(), compiled.output
    spills = [ln for ln in compiled.output.splitlines() if "spill" in ln and " 0 bytes spill stores" not in ln]
    assert not spills, spills
