"""Routers on the CPU: reference semantics (tie rule, bias, grouped top-k), every error, fake impls, specs."""
import math
import shutil

import pytest
import torch

import jitmoe
from jitmoe.ops import routing as ops
from jitmoe.reference import routing as ref

TOPK_FNS = {"softmax": jitmoe.topk_softmax, "sigmoid": jitmoe.topk_sigmoid}


# -- independent re-derivations (plain Python, one token at a time) -----------------------------------------------
def _scores_row(row, scoring):
    if scoring == "softmax":
        m = max(row)
        exps = [math.exp(v - m) for v in row]
        total = math.fsum(exps)
        return [e / total for e in exps]
    return [1.0 / (1.0 + math.exp(-v)) for v in row]


def _loop_topk(x, k, scoring, renormalize, bias):
    weights, ids = [], []
    for row in x.double().tolist():
        scores = _scores_row(row, scoring)
        rank = row if bias is None else [s + b for s, b in zip(scores, bias.double().tolist())]
        chosen = sorted(range(len(row)), key=lambda e: (-rank[e], e))[:k]
        w = [scores[e] for e in chosen]
        if renormalize:
            total = math.fsum(w)
            w = [v / total for v in w]
        weights.append(w)
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32)


def _loop_grouped(x, k, n_group, topk_group, renormalize, scoring, bias, scale):
    weights, ids = [], []
    for row in x.double().tolist():
        num_experts = len(row)
        size = num_experts // n_group
        scores = _scores_row(row, scoring)
        choice = row if bias is None else [s + b for s, b in zip(scores, bias.double().tolist())]
        group_score = []
        for g in range(n_group):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_score.append(members[0] if bias is None else sum(members[:2]))
        kept = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        pool = [e for e in range(num_experts) if e // size in kept]
        chosen = sorted(pool, key=lambda e: (-choice[e], e))[:k]
        w = [scores[e] for e in chosen]
        if renormalize:
            total = math.fsum(w)
            w = [v / total for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32)


def _assert_routing_equal(got, want):
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(got[1], want[1])


# -- top-k semantics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (7, 3), (16, 16), (60, 8), (130, 40)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_matches_loop(scoring, num_experts, topk, renormalize, with_bias):
    x = torch.randn(6, num_experts) * 3
    bias = torch.randn(num_experts) * 0.1 if with_bias else None
    got = TOPK_FNS[scoring](x, topk, renormalize, bias)
    _assert_routing_equal(got, _loop_topk(x, topk, scoring, renormalize, bias))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_go_to_lower_expert_id(scoring):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    weights, ids = TOPK_FNS[scoring](x, 5)
    assert ids.tolist() == [[1, 2, 4, 0, 5]]
    assert weights[0, 0] == weights[0, 1] == weights[0, 2]
    # Quantised logits: most rows are full of ties.
    q = torch.randint(-3, 4, (64, 40)).float() * 0.5
    _assert_routing_equal(TOPK_FNS[scoring](q, 12), _loop_topk(q, 12, scoring, False, None))


def test_negative_zero_ties_with_zero():
    weights, ids = jitmoe.topk_softmax(torch.tensor([[-1.0, 0.0, -0.0, -0.0, 0.0]]), 4)
    assert ids.tolist() == [[1, 2, 3, 4]]


def test_bias_changes_selection_not_weights():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0])
    weights, ids = jitmoe.topk_softmax(x, 2, bias=bias)
    probs = torch.softmax(x.double(), -1)[0]
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(weights[0].double(), probs[[2, 0]], atol=1e-7, rtol=0)
    # A bias tie falls back to the lower id, like any tie.
    _, ids = jitmoe.topk_sigmoid(torch.zeros(1, 4), 2, bias=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert ids.tolist() == [[1, 3]]


def test_unbiased_ranking_uses_logits_where_scores_saturate():
    # float64 sigmoid is exactly 1.0 for both: the logits still decide, as they do in the kernel.
    _, ids = jitmoe.topk_sigmoid(torch.tensor([[40.0, 41.0, 39.0]]), 3)
    assert ids.tolist() == [[1, 0, 2]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_renormalize_sums_to_one(scoring):
    weights, _ = TOPK_FNS[scoring](torch.randn(32, 50), 7, renormalize=True)
    torch.testing.assert_close(weights.double().sum(-1), torch.ones(32, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_route_like_their_float_values(dtype):
    x = torch.randn(16, 48).to(dtype)
    _assert_routing_equal(jitmoe.topk_softmax(x, 6, True), jitmoe.topk_softmax(x.float(), 6, True))


def test_token_expert_indices():
    x = torch.randn(5, 9)
    weights, ids, tei = jitmoe.topk_softmax(x, 3, return_token_expert_indices=True)
    assert tei.dtype == torch.int32 and tei.shape == (5, 3)
    assert tei.tolist() == [[j * 5 + t for j in range(3)] for t in range(5)]
    assert torch.equal(ids, jitmoe.topk_softmax(x, 3)[1])
    assert len(jitmoe.topk_sigmoid(x, 3)) == 2


def test_outputs_dtypes_and_shapes():
    weights, ids = jitmoe.topk_sigmoid(torch.randn(3, 20, dtype=torch.float16), 4)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (3, 4)


def test_reference_stable_sort_keeps_id_order():
    key = torch.tensor([[0.5, 0.5, 1.0, 0.5, 1.0, 0.5] * 50])
    order = ref._rank_desc(key)[0].tolist()
    assert order == sorted(range(300), key=lambda e: (-key[0, e].item(), e))


# -- grouped top-k semantics -----------------------------------------------------------------------------------------
GROUPED_CASES = [  # E, n_group, topk_group, k
    (16, 4, 2, 3), (64, 8, 4, 8), (24, 24, 5, 5), (48, 1, 1, 12), (36, 6, 6, 20), (12, 3, 1, 4)]


@pytest.mark.parametrize("num_experts,n_group,topk_group,topk", GROUPED_CASES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_matches_loop(num_experts, n_group, topk_group, topk, scoring, with_bias):
    x = torch.randn(5, num_experts) * 2
    bias = torch.randn(num_experts) * 0.2 if with_bias else None
    renormalize, scale = with_bias, (2.5 if scoring == "sigmoid" else 1.0)
    got = jitmoe.grouped_topk(x, topk, n_group, topk_group, renormalize, scoring, bias, scale)
    want = _loop_grouped(x, topk, n_group, topk_group, renormalize, scoring, bias, scale)
    _assert_routing_equal(got, want)


def test_grouped_ties_on_quantised_logits():
    x = torch.randint(-2, 3, (40, 32)).float()
    bias = torch.randint(-2, 3, (32,)).float() * 0.25
    for b in (None, bias):
        got = jitmoe.grouped_topk(x, 6, 8, 3, True, "sigmoid", b, 1.0)
        _assert_routing_equal(got, _loop_grouped(x, 6, 8, 3, True, "sigmoid", b, 1.0))


def test_grouped_deepseek_v3_hand_example():
    # E=8 in 4 groups of 2, keep 2 groups, k=2, sigmoid + bias (logit 0 -> score 0.5).
    x = torch.zeros(1, 8)
    bias = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.5, -0.5, 0.0, 0.2])
    # group sums of the top-2 biased scores: g0 1.4, g1 1.6, g2 1.0, g3 1.2 -> keep g1 and g0
    weights, ids = jitmoe.grouped_topk(x, 2, 4, 2, renormalize=False, scoring_func="sigmoid",
                                       e_score_correction_bias=bias, routed_scaling_factor=2.0)
    assert ids.tolist() == [[0, 2]]  # biased 0.9, then 0.8 (expert 2 beats expert 3 on the tie)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0]]))  # unbiased 0.5 each, times 2


def test_grouped_without_bias_uses_group_max():
    x = torch.tensor([[5.0, -9.0, 1.0, 1.0, 0.0, 4.0]])  # groups of 2: max 5, 1, 4
    _, ids = jitmoe.grouped_topk(x, 2, 3, 2, scoring_func="softmax")
    assert ids.tolist() == [[0, 5]]


def test_grouped_dropped_groups_never_win_even_at_minus_inf():
    # Group 1 is kept; its expert 3 (-inf) must still beat the dropped, lower-id experts 0 and 1 (also -inf).
    x = torch.tensor([[float("-inf"), float("-inf"), 5.0, float("-inf")]])
    _, ids = jitmoe.grouped_topk(x, 2, 2, 1, scoring_func="sigmoid")
    assert ids.tolist() == [[2, 3]]


def test_grouped_single_group_equals_topk():
    x = torch.randn(8, 40)
    bias = torch.randn(40) * 0.1
    got = jitmoe.grouped_topk(x, 5, 1, 1, False, "softmax", bias, 1.0)
    _assert_routing_equal(got, jitmoe.topk_softmax(x, 5, False, bias))


# -- errors ------------------------------------------------------------------------------------------------------------
def _topk_error_cases():
    x = torch.randn(4, 8)
    return [
        (ValueError, "gating_output", (torch.randn(8), 2), {}),
        (ValueError, "gating_output", (torch.randn(2, 4, 8), 2), {}),
        (ValueError, "gating_output", (torch.randn(0, 8), 2), {}),
        (ValueError, "gating_output", (torch.randn(8, 4).t(), 2), {}),
        (ValueError, "gating_output", (torch.randn(2, 4097), 2), {}),
        (TypeError, "gating_output", (torch.randint(0, 5, (4, 8)), 2), {}),
        (TypeError, "gating_output", (x.double(), 2), {}),
        (TypeError, "gating_output", (x.tolist(), 2), {}),
        (ValueError, "topk", (x, 0), {}),
        (ValueError, "topk", (x, -1), {}),
        (ValueError, "topk", (x, 9), {}),
        (ValueError, "topk", (torch.randn(2, 100), 65), {}),
        (TypeError, "topk", (x, 2.0), {}),
        (TypeError, "topk", (x, True), {}),
        (TypeError, "renormalize", (x, 2, 1), {}),
        (ValueError, "bias", (x, 2), {"bias": torch.randn(7)}),
        (ValueError, "bias", (x, 2), {"bias": torch.randn(1, 8)}),
        (TypeError, "bias", (x, 2), {"bias": torch.randn(8, dtype=torch.float16)}),
        (ValueError, "bias", (x, 2), {"bias": torch.randn(16)[::2]}),
        (ValueError, "bias", (x, 2), {"bias": torch.empty(8, device="meta")}),
        (TypeError, "return_token_expert_indices", (x, 2), {"return_token_expert_indices": 1}),
    ]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("case", range(len(_topk_error_cases())))
def test_topk_errors(scoring, case):
    exc, name, args, kwargs = _topk_error_cases()[case]
    with pytest.raises(exc, match=f"^{name}: expected"):
        TOPK_FNS[scoring](*args, **kwargs)


def _grouped_error_cases():
    x = torch.randn(4, 16)
    ok = dict(topk=2, n_group=4, topk_group=2)
    return [
        (ValueError, "gating_output", torch.randn(16), ok, {}),
        (ValueError, "gating_output", torch.randn(0, 16), ok, {}),
        (ValueError, "gating_output", torch.randn(2, 1028), ok, {}),
        (TypeError, "gating_output", torch.randint(0, 3, (4, 16)), ok, {}),
        (ValueError, "gating_output", torch.randn(16, 4).t(), dict(ok, n_group=2), {}),
        (ValueError, "topk", x, dict(ok, topk=0), {}),
        (ValueError, "topk", x, dict(topk=17, n_group=1, topk_group=1), {}),
        (ValueError, "topk", torch.randn(2, 64), dict(topk=33, n_group=1, topk_group=1), {}),
        (ValueError, "topk", x, dict(topk=9, n_group=4, topk_group=2), {}),
        (ValueError, "n_group", x, dict(ok, n_group=0), {}),
        (ValueError, "n_group", x, dict(ok, n_group=5), {}),
        (TypeError, "n_group", x, dict(ok, n_group=4.0), {}),
        (ValueError, "topk_group", x, dict(ok, topk_group=5), {}),
        (ValueError, "topk_group", x, dict(ok, topk_group=0), {}),
        (ValueError, "scoring_func", x, ok, {"scoring_func": "relu"}),
        (ValueError, "e_score_correction_bias", x, ok, {"e_score_correction_bias": torch.randn(15)}),
        (TypeError, "e_score_correction_bias", x, ok, {"e_score_correction_bias": torch.randn(16).half()}),
        (ValueError, "routed_scaling_factor", x, ok, {"routed_scaling_factor": float("nan")}),
        (TypeError, "routed_scaling_factor", x, ok, {"routed_scaling_factor": "2"}),
        (TypeError, "renormalize", x, ok, {"renormalize": None}),
    ]


@pytest.mark.parametrize("case", range(len(_grouped_error_cases())))
def test_grouped_errors(case):
    exc, name, x, sizes, kwargs = _grouped_error_cases()[case]
    with pytest.raises(exc, match=f"^{name}: expected"):
        jitmoe.grouped_topk(x, **sizes, **kwargs)


def test_direct_op_calls_are_validated_too():
    with pytest.raises(ValueError, match="^topk: expected"):
        torch.ops.jitmoe.topk_softmax(torch.randn(2, 4), 5, False, None, False)
    with pytest.raises(ValueError, match="^n_group: expected"):
        torch.ops.jitmoe.grouped_topk(torch.randn(2, 6), 1, 4, 1, True, "softmax", None, 1.0)


# -- torch.library registration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,args", [
    ("topk_softmax", (torch.randn(5, 12), 3, False, None, False)),
    ("topk_softmax", (torch.randn(5, 12), 3, True, torch.randn(12), True)),
    ("topk_sigmoid", (torch.randn(4, 70, dtype=torch.bfloat16), 40, True, None, True)),
    ("grouped_topk", (torch.randn(3, 16), 4, 4, 2, True, "sigmoid", torch.randn(16), 2.5)),
    ("grouped_topk", (torch.randn(3, 16, dtype=torch.float16), 3, 8, 8, False, "softmax", None, 1.0)),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.jitmoe, op).default, args)


def test_fake_shapes_on_a_fake_cuda_tensor_need_no_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(9, 256, dtype=torch.bfloat16, device="cuda")
        w, ids, tei = torch.ops.jitmoe.topk_sigmoid(x, 8, True, None, True)
        gw, gids = torch.ops.jitmoe.grouped_topk(x, 8, 8, 4, True, "sigmoid", None, 2.5)
    assert (w.shape, w.dtype, w.device.type) == ((9, 8), torch.float32, "cuda")
    assert (ids.shape, ids.dtype, tei.shape, tei.dtype) == ((9, 8), torch.int32, (9, 8), torch.int32)
    assert (gw.shape, gw.dtype, gids.shape, gids.dtype) == ((9, 8), torch.float32, (9, 8), torch.int32)


# -- specs and prewarm -------------------------------------------------------------------------------------------------
def test_topk_bucket():
    assert [ops.topk_bucket(k) for k in (1, 8, 32, 33, 64)] == [32, 32, 32, 64, 64]


def test_prewarm_specs():
    specs = ops.PREWARM["topk_softmax"](["fp32", "bf16"], [1, 8, 64], ["80", "90a"])
    names = sorted(s.readable_name for s in specs)
    assert names == sorted(f"topk_route_{d}_kmax{b}_sm{a}" for d in ("fp32", "bf16") for b in (32, 64)
                           for a in ("80", "90a"))
    assert ops.PREWARM["topk_sigmoid"](["fp16"], [2], ["90a"]) == ops.PREWARM["topk_softmax"](["fp16"], [2], ["90a"])
    grouped = ops.PREWARM["grouped_topk"](["fp32", "bf16", "fp16"], [8], ["90a"])
    want = sorted(f"grouped_topk_{d}_sm90a" for d in ("fp32", "bf16", "fp16"))
    assert sorted(s.readable_name for s in grouped) == want
    for spec in specs + grouped:
        for text in spec.rendered_sources().values():
            assert "${" not in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("spec", [ops._topk_spec("bf16", 64, ("80",)), ops._grouped_spec("fp32", ("90a",))],
                         ids=lambda s: s.readable_name)
def test_templates_compile_without_spills(spec):
    from jitmoe.jit import compile_cuda_sources
    (compiled,) = compile_cuda_sources(spec, ptxas_verbose=True)
    spills = [ln for ln in compiled.output.splitlines() if "spill" in ln and " 0 bytes spill stores" not in ln]
    assert not spills, spills


def test_torch_compile_fullgraph():
    x, bias = torch.randn(6, 32), torch.randn(32)

    def route(x):
        w, ids, tei = jitmoe.topk_sigmoid(x, 4, True, bias, return_token_expert_indices=True)
        gw, gids = jitmoe.grouped_topk(x, 4, 8, 2, True, "sigmoid", bias, 2.5)
        return w, ids, tei, gw, gids

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), route(x)):
        assert torch.equal(got, want)
