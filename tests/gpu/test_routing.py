"""Routing kernels against the float64 reference (run on the same input values), outputs poisoned first.

Without a bias the kernels rank the logits exactly, so ids must match exactly. With a bias they rank fp32
score + bias: ids must match exactly on every row whose float64 ranking has no near-tie (a gap below 5e-6 of the
row's scale, other than an exact tie of identical inputs); on the other rows the chosen experts must carry the same
biased scores as the reference's to that tolerance. Weights are always checked to 1e-6 against the float64 scores
of the experts the kernel chose.
"""
import pytest
import torch

import jitmoe
from jitmoe.ops import routing as ops
from jitmoe.reference import routing as ref
from jitmoe.testing import poison_

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXPERTS = [1, 8, 60, 64, 128, 160, 256, 384, 512, 1000, 4096]
TOPKS = [1, 2, 8, 16, 32, 64]
SCORINGS = ["softmax", "sigmoid"]
NEAR_TIE = 5e-6  # fp32 score + bias errors are below 1e-6 of the row scale


# -- inputs ----------------------------------------------------------------------------------------------------------
def _logits(num_tokens, num_experts, dtype, quantised=False):
    x = torch.randn(num_tokens, num_experts, device="cuda") * 2
    if quantised:  # few distinct values: most rows are full of exact ties (and -0.0 next to 0.0)
        x = torch.round(x) * 0.5
        x[torch.rand_like(x) < 0.05] = -0.0
    return x.to(dtype)


def _bias(num_experts, scoring, quantised=False):
    scale = 2.0 / num_experts if scoring == "softmax" else 0.1  # comparable to the scores it corrects
    b = torch.randn(num_experts, device="cuda") * scale
    if quantised:
        b = torch.round(b / scale) * scale
    return b.float()


# -- checks ----------------------------------------------------------------------------------------------------------
def _assert_ids_equal(ids, want, rows=None):
    rows = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device) if rows is None else rows
    bad = ((ids != want).any(dim=1) & rows).nonzero()
    if bad.numel():
        r = bad[0, 0].item()
        raise AssertionError(f"{bad.numel()} rows differ; row {r}: got {ids[r].tolist()}, want {want[r].tolist()}")


def _assert_valid_ids(ids, num_experts):
    assert ((ids >= 0) & (ids < num_experts)).all(), "ids out of range (unwritten output?)"
    s = ids.sort(dim=1).values
    assert (s[:, 1:] != s[:, :-1]).all(), "an expert was selected twice"


def _clear_rows(ranked, tol):
    """Rows whose sorted values (desc) have every gap either 0 (identical inputs) or above tol."""
    if ranked.shape[1] < 2:
        return torch.ones(ranked.shape[0], dtype=torch.bool, device=ranked.device)
    gaps = ranked[:, :-1] - ranked[:, 1:]
    return ((gaps == 0) | (gaps > tol[:, None])).all(dim=1)


def _assert_selection(ids, ref_ids, choice, ranked, min_clear):
    """Biased selection: exact on clear rows, same biased scores (to tolerance) everywhere."""
    tol = NEAR_TIE * choice.abs().amax(dim=1)
    got, want = choice.gather(1, ids.long()), choice.gather(1, ref_ids.long())
    assert ((got - want).abs() <= tol[:, None]).all(), "selected experts' biased scores differ from the reference"
    clear = _clear_rows(ranked, tol)
    _assert_ids_equal(ids, ref_ids, clear)
    assert clear.float().mean() >= min_clear, "tolerance too loose: the exact check covers too few rows"


def _expected_weights(scores, ids, renormalize, scale=1.0):
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / w.sum(dim=1, keepdim=True)
    return (w * scale).float()


def _scores(x, scoring):
    return torch.softmax(x.double(), -1) if scoring == "softmax" else torch.sigmoid(x.double())


def _run_topk(x, k, scoring, renormalize, bias):
    weights = poison_(torch.empty(x.shape[0], k, dtype=torch.float32, device="cuda"))
    ids = poison_(torch.empty(x.shape[0], k, dtype=torch.int32, device="cuda"))
    tei = poison_(torch.empty(x.shape[0], k, dtype=torch.int32, device="cuda"))
    ops.launch_topk(x, k, renormalize, bias, scoring, weights, ids, tei)
    return weights, ids, tei


def _check_topk(x, k, scoring, renormalize, bias, min_clear=0.5):
    weights, ids, tei = _run_topk(x, k, scoring, renormalize, bias)
    reference = ref.topk_softmax if scoring == "softmax" else ref.topk_sigmoid
    ref_w, ref_ids, ref_tei = reference(x, k, renormalize, bias, return_token_expert_indices=True)
    _assert_valid_ids(ids, x.shape[1])
    assert torch.equal(tei, ref_tei)
    scores = _scores(x, scoring)
    if bias is None:
        _assert_ids_equal(ids, ref_ids)
    else:
        choice = scores + bias.double()
        ranked = choice.sort(dim=1, descending=True).values[:, :k + 1]
        _assert_selection(ids, ref_ids, choice, ranked, min_clear if x.shape[0] >= 64 else 0.0)
    torch.testing.assert_close(weights, _expected_weights(scores, ids, renormalize), atol=1e-6, rtol=1e-6)


# -- top-k: every E x k at a small odd T, a slice at other T, ties ----------------------------------------------------
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_every_size(num_experts, scoring, dtype):
    for i, k in enumerate(t for t in TOPKS if t <= num_experts):
        x = _logits(7, num_experts, dtype)
        _check_topk(x, k, scoring, i % 2 == 1, None)
        _check_topk(x, k, scoring, i % 2 == 0, _bias(num_experts, scoring))


@pytest.mark.parametrize("num_tokens", [1, 3, 256, 4096, 16384])
@pytest.mark.parametrize("e_index", range(len(EXPERTS)), ids=lambda i: f"E{EXPERTS[i]}")
def test_topk_token_counts(num_tokens, e_index):
    num_experts = EXPERTS[e_index]
    for j, dtype in enumerate(DTYPES):
        k = min(num_experts, TOPKS[(e_index + j) % len(TOPKS)])
        scoring = SCORINGS[(e_index + j) % 2]
        x = _logits(num_tokens, num_experts, dtype)
        _check_topk(x, k, scoring, j == 1, None)
        _check_topk(x, k, scoring, j != 1, _bias(num_experts, scoring))


@pytest.mark.parametrize("num_experts", [8, 60, 256, 1000, 4096])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_ties_go_to_lower_id(num_experts, scoring, dtype):
    for k in (t for t in (1, 8, 64) if t <= num_experts):
        x = _logits(256, num_experts, dtype, quantised=True)
        _check_topk(x, k, scoring, False, None)
        _check_topk(x, k, scoring, True, _bias(num_experts, scoring, quantised=True), min_clear=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts", [64, 256, 4096])
def test_topk_unaligned_rows_take_the_scalar_path(dtype, num_experts):
    buf = _logits(1, 37 * num_experts + 1, dtype)[0]
    x = buf[1:].view(37, num_experts)  # contiguous, but the base is not 16-byte aligned
    assert x.data_ptr() % 16 != 0
    _check_topk(x, 8, "softmax", True, None)
    _check_topk(x, 8, "sigmoid", False, _bias(num_experts, "sigmoid"))


def test_public_api_on_cuda():
    x = _logits(100, 256, torch.bfloat16)
    bias = _bias(256, "sigmoid")
    weights, ids, tei = jitmoe.topk_sigmoid(x, 8, True, bias, return_token_expert_indices=True)
    assert weights.device == x.device and ids.dtype == torch.int32 and tei.dtype == torch.int32
    ref_w, ref_ids, ref_tei = ref.topk_sigmoid(x, 8, True, bias, return_token_expert_indices=True)
    assert torch.equal(tei, ref_tei)
    weights, ids = jitmoe.topk_softmax(x, 8)
    _assert_ids_equal(ids, ref.topk_softmax(x, 8)[1])
    with pytest.raises(ValueError, match="^gating_output: expected"):
        jitmoe.topk_softmax(x[:0], 8)
    with pytest.raises(ValueError, match="^bias: expected"):
        jitmoe.topk_softmax(x, 8, bias=bias.cpu())


# -- grouped top-k -----------------------------------------------------------------------------------------------------
def _check_grouped(x, k, n_group, topk_group, renormalize, scoring, bias, scale, min_clear=0.5):
    weights = poison_(torch.empty(x.shape[0], k, dtype=torch.float32, device="cuda"))
    ids = poison_(torch.empty(x.shape[0], k, dtype=torch.int32, device="cuda"))
    ops.launch_grouped(x, k, n_group, topk_group, renormalize, scoring, bias, scale, weights, ids)
    _, ref_ids = ref.grouped_topk(x, k, n_group, topk_group, renormalize, scoring, bias, scale)
    _assert_valid_ids(ids, x.shape[1])
    scores = _scores(x, scoring)
    if bias is None:
        _assert_ids_equal(ids, ref_ids)
    else:
        min_clear = min_clear if x.shape[0] >= 64 else 0.0
        _assert_grouped_selection(ids, ref_ids, scores + bias.double(), k, n_group, topk_group, min_clear)
    torch.testing.assert_close(weights, _expected_weights(scores, ids, renormalize, scale), atol=1e-6, rtol=1e-6)


def _groups_clear(choice, group_scores, n_group, topk_group, tol):
    """Rows whose kept-group set cannot depend on rounding: every group scoring within tol of the boundary group
    has the same top-2 biased scores as it (an exact tie of identical inputs, broken by group id in both)."""
    if topk_group == n_group:
        return torch.ones(choice.shape[0], dtype=torch.bool, device=choice.device)
    grouped = choice.view(choice.shape[0], n_group, -1)
    top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values  # [T, n_group, 1 or 2]
    boundary_group = ref._rank_desc(group_scores)[:, topk_group - 1]
    boundary_top = top[torch.arange(top.shape[0], device=top.device), boundary_group]  # [T, 1 or 2]
    near = (group_scores - group_scores.gather(1, boundary_group[:, None])).abs() <= tol[:, None]
    same = (top == boundary_top[:, None, :]).all(dim=-1)
    return (~near | same).all(dim=1)


def _assert_grouped_selection(ids, ref_ids, choice, k, n_group, topk_group, min_clear):
    tol = NEAR_TIE * choice.abs().amax(dim=1)
    group_scores = ref._group_scores(choice, n_group, True)
    boundary = group_scores.sort(dim=1, descending=True).values[:, topk_group - 1]
    # Every chosen expert lies in a group that is kept, or within tolerance of being kept.
    size = choice.shape[1] // n_group
    chosen_group_scores = group_scores.gather(1, ids.long() // size)
    assert (chosen_group_scores >= boundary[:, None] - tol[:, None]).all(), "expert from a dropped group"
    groups_clear = _groups_clear(choice, group_scores, n_group, topk_group, tol)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, ref._rank_desc(group_scores)[:, :topk_group], True)
    masked = choice.masked_fill(~kept.repeat_interleave(size, dim=1), float("-inf"))
    ranked = masked.sort(dim=1, descending=True).values[:, :min(k + 1, topk_group * size)]
    clear = groups_clear & _clear_rows(ranked, tol)
    _assert_ids_equal(ids, ref_ids, clear)
    # Where the kept groups are unambiguous, near-tied experts may swap but carry the same biased scores.
    got, want = choice.gather(1, ids.long()), choice.gather(1, ref_ids.long())
    assert ((got - want).abs() <= tol[:, None])[groups_clear].all(), "biased scores differ from the reference"
    assert clear.float().mean() >= min_clear, "tolerance too loose: the exact check covers too few rows"


GROUPED_SHAPES = [  # E, n_group, topk_group, k
    (256, 8, 4, 8),      # DeepSeek-V3
    (1024, 8, 4, 32),    # 128 experts per group
    (1024, 1, 1, 32),    # one group of 1024
    (1024, 1024, 32, 32),  # groups of one expert
    (160, 4, 2, 16),     # 40 per group
    (384, 12, 3, 8),
    (1000, 10, 5, 32),   # fp32: one block per row
    (64, 2, 1, 8),
    (60, 6, 6, 17),
    (8, 4, 2, 3),
]


@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "E{}_g{}_tg{}_k{}".format(*s))
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_shapes(shape, scoring, dtype):
    num_experts, n_group, topk_group, k = shape
    for num_tokens in (7, 1024):
        x = _logits(num_tokens, num_experts, dtype)
        _check_grouped(x, k, n_group, topk_group, True, scoring, _bias(num_experts, scoring), 2.5)
        _check_grouped(x, k, n_group, topk_group, False, scoring, None, 1.0)


@pytest.mark.parametrize("num_tokens", [1, 3, 256, 4096, 16384])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_deepseek_v3(num_tokens, dtype):
    x = _logits(num_tokens, 256, dtype)
    _check_grouped(x, 8, 8, 4, True, "sigmoid", _bias(256, "sigmoid"), 2.5)


@pytest.mark.parametrize("shape", [(256, 8, 4, 8), (1024, 8, 4, 32), (64, 64, 8, 8)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_ties(shape, dtype):
    num_experts, n_group, topk_group, k = shape
    x = _logits(512, num_experts, dtype, quantised=True)
    _check_grouped(x, k, n_group, topk_group, True, "sigmoid", None, 1.0)
    quantised_bias = _bias(num_experts, "sigmoid", quantised=True)
    _check_grouped(x, k, n_group, topk_group, True, "sigmoid", quantised_bias, 1.0, min_clear=0.0)


# -- CUDA graphs -------------------------------------------------------------------------------------------------------
def _capture(fn, static_x):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(static_x)  # warm-up outside the graph (builds/loads the module)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(static_x)
    return graph, outputs


@pytest.mark.parametrize("case", ["softmax", "sigmoid_bias_tei", "grouped", "block_team"])
def test_cuda_graph_replay(case):
    num_experts = 4096 if case == "block_team" else 256
    bias = _bias(num_experts, "sigmoid")
    fns = {
        "softmax": lambda x: jitmoe.topk_softmax(x, 8, True),
        "sigmoid_bias_tei": lambda x: jitmoe.topk_sigmoid(x, 8, False, bias, return_token_expert_indices=True),
        "grouped": lambda x: jitmoe.grouped_topk(x, 8, 8, 4, True, "sigmoid", bias, 2.5),
        "block_team": lambda x: jitmoe.topk_softmax(x, 64, False),
    }
    static_x = _logits(300, num_experts, torch.bfloat16)
    graph, outputs = _capture(fns[case], static_x)
    for _ in range(2):
        static_x.copy_(_logits(300, num_experts, torch.bfloat16))
        for out in outputs:
            poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        expected = fns[case](static_x.clone())
        for got, want in zip(outputs, expected):
            assert torch.equal(got, want), f"{case}: graph replay differs from an eager call"


# -- rows where one lane holds many winners, all-equal rows and tied pairs, around the warp/block team switch ----------
def _crowded_rows(num_tokens, num_experts, dtype):
    """Random rows, then: every expert of lane 0 of the one-warp layout on top (one lane holds most winners), an
    all-equal row (ties across and inside lanes), and a row whose top is one tied pair."""
    x = torch.randn(num_tokens, num_experts, device="cuda")
    chunk = 16 // torch.empty((), dtype=dtype).element_size()
    lane0 = (torch.arange(num_experts, device="cuda") // chunk) % 32 == 0
    x[0::3, lane0] += 10 + torch.rand(int(lane0.sum()), device="cuda")
    x[1] = 0.5
    x[2, :2] = 9.0
    return x.to(dtype)


@pytest.mark.parametrize("num_experts", [3, 32, 63, 64, 96, 128, 160, 256, 257, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_crowded_and_tied_rows(num_experts, dtype):
    for k in (1, 2, 7, 8, 9):
        if k > num_experts:
            continue
        x = _crowded_rows(33, num_experts, dtype)
        _check_topk(x, k, "softmax", k % 2 == 0, None)
        _check_topk(x, k, "sigmoid", k % 2 == 1, None)
        _check_topk(x, k, "softmax", True, _bias(num_experts, "softmax"), min_clear=0.0)
        buf = torch.empty(33 * num_experts + 1, dtype=dtype, device="cuda")
        shifted = buf[1:].view(33, num_experts)  # contiguous, base not 16-byte aligned: the scalar-load layout
        shifted.copy_(_crowded_rows(33, num_experts, dtype))
        _check_topk(shifted, k, "softmax", False, None)


# -- the one-warp fast path (k <= 32): candidate lists around 32 entries, where it switches to arg-max rounds ----------
@pytest.mark.parametrize("tied", [1, 7, 31, 32, 33, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_candidate_count_around_a_warp(tied, dtype):
    """Rows whose top value is shared by `tied` experts (the first ones, or scattered in half the rows): the number
    of candidates at or above the bound crosses 32 for some k, at every one-warp layout (NCH = 1, 2, 4)."""
    chunk = 16 // torch.empty((), dtype=dtype).element_size()
    for num_experts in (32 * chunk, 64 * chunk, 128 * chunk):
        x = torch.randn(66, num_experts, device="cuda")
        x[:, :tied] = 6.0
        x[1::2] = x[1::2, torch.randperm(num_experts, device="cuda")]
        x = x.to(dtype)
        for k in (1, 8, 9, 31, 32):
            _check_topk(x, k, "softmax", k % 2 == 0, None)
            _check_topk(x, k, "sigmoid", k % 2 == 1, None)
            _check_topk(x, k, "softmax", True, _bias(num_experts, "softmax"), min_clear=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_negative_and_infinite_logits(dtype):
    """All-negative rows (the bound is negative), -inf logits that must still be picked by id, padding slots."""
    for num_experts in (5, 60, 160, 1000):
        x = -torch.rand(33, num_experts, device="cuda") * 4 - 1
        x[0, :] = float("-inf")
        x[0, 3 % num_experts] = 0.0
        x = x.to(dtype)
        for k in (1, 4, 5):
            _check_topk(x[1:], k, "softmax", False, None)
            weights, ids, _ = _run_topk(x, k, "sigmoid", False, None)
            _assert_ids_equal(ids, ref.topk_sigmoid(x, k)[1])


# -- the persistent fast path: a warp walks many rows, the next row's loads in flight while it routes the current ------
@pytest.mark.parametrize("num_experts", [60, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_many_rows_per_warp(num_experts, dtype):
    """More rows than one wave of warps covers (tens of rows per warp), an odd T so that only some warps take a last
    row, and the same rows through the unaligned (scalar-load) layout (E=60 bf16/fp16 rows are unaligned anyway)."""
    x = _logits(70001, num_experts, dtype)
    _check_topk(x, 8, "softmax", False, None)
    _check_topk(x, 8, "sigmoid", True, _bias(num_experts, "sigmoid"))
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    shifted = buf[1:].view_as(x)  # contiguous, base not 16-byte aligned
    shifted.copy_(x)
    _check_topk(shifted, 4, "softmax", True, None)


def test_cuda_graph_replay_many_rows_per_warp():
    def route(x):
        return jitmoe.topk_softmax(x, 8, False)

    static_x = _logits(70001, 256, torch.float32)
    graph, outputs = _capture(route, static_x)
    static_x.copy_(_logits(70001, 256, torch.float32))
    for out in outputs:
        poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, route(static_x.clone())):
        assert torch.equal(got, want), "graph replay differs from an eager call"
