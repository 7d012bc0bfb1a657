"""Expert Choice on the CPU: hand-built routings (capacity, ties, fallback, padding, expert-major, counts), the score
recipe, an independent per-expert/per-token re-derivation, every error, the op registration and the templates."""
import importlib
import math
import shutil

import pytest
import torch

import jitmoe
from jitmoe.ops import expert_choice as ops

ref = importlib.import_module("jitmoe.reference.expert_choice")


def _route(x, k, cf, **kw):
    return jitmoe.expert_choice(x, k, cf, return_counts=True, **kw)


def _ids(t):
    return t.tolist()


# -- capacity ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,want", [
    ((16, 4, 2, 1.25), 10),     # ceil(1.25 * 16 * 2 / 4)
    ((1, 8, 1, 0.5), 1),        # at least one token
    ((4, 2, 2, 2.0), 4),        # at most T
    ((100, 10, 1, 1.1), 11),    # 1.1 is 11/10: binary 1.1 * 100 / 10 would round up to 12
    ((7, 3, 2, 1), 5),          # int factor; ceil(14 / 3)
    ((16384, 256, 8, 1.25), 640),
])
def test_capacity(args, want):
    assert jitmoe.expert_choice_capacity(*args) == want


# -- hand-built routings -----------------------------------------------------------------------------------------------
# Four tokens, three experts, k = 1, capacity ceil(0.75 * 4 / 3) = 1. Softmax over experts: t0 prefers e0 (0.705),
# t2 e1 (0.909), t3 e2 (0.665); t1 scores 1/3 everywhere and no expert picks it.
HAND = torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])


def test_each_expert_picks_its_best_token_and_fallback_fills_the_rest():
    w, ids, counts = _route(HAND, 1, 0.75)
    assert _ids(ids) == [[0], [0], [1], [2]]  # t1: fallback to its top-1, a three-way tie -> expert 0
    torch.testing.assert_close(w, torch.softmax(HAND, dim=1).gather(1, ids.long()), rtol=0, atol=1e-6)
    assert _ids(counts) == [2, 1, 1]


def test_fallback_none_leaves_unpicked_slots_empty():
    w, ids, counts = _route(HAND, 1, 0.75, fallback="none")
    assert _ids(ids) == [[0], [-1], [1], [2]]
    assert w[1, 0].item() == 0.0
    assert _ids(counts) == [1, 1, 1]


def test_expert_major_rows():
    token_ids, w, counts = _route(HAND, 1, 0.75, expert_major=True)
    assert _ids(token_ids) == [[0], [2], [3]]
    torch.testing.assert_close(w[:, 0], torch.softmax(HAND, dim=1)[[0, 2, 3], [0, 1, 2]], rtol=0, atol=1e-6)
    assert _ids(counts) == [1, 1, 1]


def test_equal_scores_go_to_the_lower_token_and_expert_ids():
    # Both tokens score 0.5 / 0.5: both experts (capacity 1) pick t0, which keeps e0 (k = 1); t1 falls back to e0.
    x = torch.tensor([[0.0, 0.0], [-5.0, -5.0]])
    _, ids, counts = _route(x, 1, 1.0)
    assert _ids(ids) == [[0], [0]]
    assert _ids(counts) == [2, 0]
    _, ids, counts = _route(x, 1, 1.0, fallback="none")
    assert _ids(ids) == [[0], [-1]]
    assert _ids(counts) == [1, 0]  # e1's pick of t0 is dropped by t0's top_k: experts can end below capacity
    token_ids, _, counts = _route(x, 1, 1.0, expert_major=True)
    assert _ids(token_ids) == [[0], [0]] and _ids(counts) == [1, 1]


def test_picked_experts_come_first_then_fallback_best_first():
    # k = 2, capacity ceil(0.5 * 3 * 2 / 3) = 1. t0 is e2's best token but prefers e0 and e1 itself.
    x = torch.tensor([[2.0, 1.0, 0.5], [5.0, -3.0, -4.0], [0.0, 4.0, -4.0]])
    w, ids, _ = _route(x, 2, 0.5)
    p = torch.softmax(x, dim=1)
    assert _ids(ids[:, 0]) == [2, 0, 1]          # the expert that picked each token
    assert _ids(ids[:, 1]) == [0, 1, 0]          # then its best other expert
    torch.testing.assert_close(w, p.gather(1, ids.long()), rtol=0, atol=1e-6)
    assert w[0, 0] < w[0, 1]                     # not sorted by weight: picks come first


def test_a_token_keeps_at_most_top_k_of_its_picks_best_first():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.5]] * 2)  # identical rows: every expert (capacity 1) picks t0
    _, ids, counts = _route(x, 2, 1.0)
    assert _ids(ids) == [[2, 1], [2, 1]]          # t0: its two best picks; t1: its top-2 fallback
    assert _ids(counts) == [0, 2, 2, 0]
    _, ids, counts = _route(x, 2, 1.0, fallback="none")
    assert _ids(ids) == [[2, 1], [-1, -1]]
    assert _ids(counts) == [0, 1, 1, 0]           # e0 and e3 picked t0 but were dropped by its top_k


def test_normalize_over_tokens():
    # Softmax down each column: e0 ranks t2 > t1 > t0, e1 ranks t0 > t1 = t2 (tie -> t1). Capacity 2.
    x = torch.tensor([[0.0, 5.0], [1.0, 0.0], [2.0, 0.0]])
    w, ids, counts = _route(x, 1, 1.0, normalize_over="tokens")
    assert _ids(ids) == [[1], [0], [0]]           # t1 is picked by both and keeps e0 (0.245 > 0.0066)
    torch.testing.assert_close(w, torch.softmax(x, dim=0).gather(1, ids.long()), rtol=0, atol=1e-6)
    token_ids, _, _ = _route(x, 1, 1.0, normalize_over="tokens", expert_major=True)
    assert _ids(token_ids) == [[1, 2], [0, 1]]   # increasing token order


def test_padding_tokens_are_never_picked_and_use_no_capacity():
    x = torch.zeros(3, 1)                         # one expert, every token ties
    mask = torch.tensor([False, True, True])
    token_ids, _, counts = _route(x, 1, 0.5, expert_major=True)
    assert _ids(token_ids) == [[0, 1]]            # capacity ceil(1.5) = 2, ties -> lower ids
    token_ids, _, counts = _route(x, 1, 0.5, expert_major=True, token_mask=mask)
    assert _ids(token_ids) == [[1, 2]] and _ids(counts) == [2]
    w, ids, counts = _route(x, 1, 0.5, token_mask=mask)
    assert _ids(ids) == [[-1], [0], [0]] and w[0, 0].item() == 0.0 and _ids(counts) == [2]


def test_capacity_beyond_the_real_tokens_pads_expert_rows():
    x = torch.randn(6, 2)
    mask = torch.tensor([True, False, True, False, False, False])
    token_ids, w, counts = _route(x, 2, 2.0, expert_major=True, token_mask=mask)   # capacity 6, 2 real tokens
    assert _ids(token_ids) == [[0, 2, -1, -1, -1, -1]] * 2
    assert (w[:, 2:] == 0).all() and _ids(counts) == [2, 2]


def test_padding_does_not_change_real_tokens_scores():
    x = torch.randn(40, 6)
    mask = torch.rand(40) > 0.4
    padded = ref.expert_choice_scores(x, "tokens", mask)[mask]
    torch.testing.assert_close(padded, torch.softmax(x[mask], dim=0), rtol=1e-6, atol=1e-7)
    assert (ref.expert_choice_scores(x, "tokens", mask)[~mask] == 0).all()


def test_return_counts_off_returns_a_pair():
    out = jitmoe.expert_choice(HAND, 1, 0.75)
    assert len(out) == 2


# -- score recipe ------------------------------------------------------------------------------------------------------
def test_fixed_exp_is_close_to_exp_and_exactly_zero_below_range():
    x = torch.cat([-torch.rand(100000) * 87, torch.tensor([0.0, -0.0, -87.0])])
    got = ref.fixed_exp(x).double()
    want = torch.exp(x.double())
    assert ((got - want).abs() / want).max() < 2.5e-7
    special = ref.fixed_exp(torch.tensor([-87.01, -1000.0, -math.inf, math.nan]))
    assert special.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_lane_sum_order():
    x = torch.arange(70, dtype=torch.float32).reshape(1, 70)
    assert ref.lane_sum(x, 32).item() == sum(range(70))
    # lane j adds j, j+4, ...; then (l0 + l2) + (l1 + l3): 1 + 2^24 + 1 rounds differently than left to right
    y = torch.tensor([[1.0, 2.0**24, 1.0, 0.0]])
    assert ref.lane_sum(y, 2).item() == (1.0 + 1.0) + 2.0**24


@pytest.mark.parametrize("normalize_over,dim", [("experts", 1), ("tokens", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_match_softmax(normalize_over, dim, dtype):
    x = (torch.randn(300, 37) * 3).to(dtype)
    got = ref.expert_choice_scores(x, normalize_over)
    torch.testing.assert_close(got, torch.softmax(x.double(), dim=dim).float(), rtol=1e-6, atol=1e-9)


# -- independent re-derivation (plain Python loops over experts, then tokens) ------------------------------------------
def _loop_route(scores, real, k, capacity, fallback):
    num_tokens, num_experts = len(scores), len(scores[0])
    picks = [[] for _ in range(num_tokens)]
    for e in range(num_experts):
        ranked = sorted((t for t in range(num_tokens) if real[t]), key=lambda t: (-scores[t][e], t))
        for t in ranked[:capacity]:
            picks[t].append(e)
    ids = []
    for t in range(num_tokens):
        if not real[t]:
            ids.append([-1] * k)
            continue
        chosen = sorted(picks[t], key=lambda e: (-scores[t][e], e))[:k]
        others = sorted((e for e in range(num_experts) if e not in picks[t]), key=lambda e: (-scores[t][e], e))
        chosen += others[:k - len(chosen)] if fallback == "topk" else [-1] * (k - len(chosen))
        ids.append(chosen)
    return ids


@pytest.mark.parametrize("num_tokens,num_experts,k,cf", [(23, 8, 2, 1.25), (50, 16, 4, 0.5), (9, 5, 5, 2.0)])
@pytest.mark.parametrize("normalize_over", ["experts", "tokens"])
@pytest.mark.parametrize("fallback", ["topk", "none"])
@pytest.mark.parametrize("quantised", [False, True])
def test_matches_loop(num_tokens, num_experts, k, cf, normalize_over, fallback, quantised):
    x = torch.randn(num_tokens, num_experts) * 2
    if quantised:
        x = torch.round(x) * 0.5
    mask = torch.rand(num_tokens) > 0.25
    w, ids, counts = _route(x, k, cf, normalize_over=normalize_over, fallback=fallback, token_mask=mask)
    scores = ref.expert_choice_scores(x, normalize_over, mask)
    capacity = jitmoe.expert_choice_capacity(num_tokens, num_experts, k, cf)
    want = _loop_route(scores.tolist(), mask.tolist(), k, capacity, fallback)
    assert _ids(ids) == want
    safe = ids.clamp(min=0).long()
    assert torch.equal(w, torch.where(ids >= 0, scores.gather(1, safe), torch.zeros_like(w)))
    assert torch.equal(counts, torch.bincount(ids[ids >= 0].long(), minlength=num_experts).int())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_route_like_their_float_values(dtype):
    x = torch.randn(40, 12).to(dtype)
    for a, b in zip(_route(x, 3, 1.25), _route(x.float(), 3, 1.25)):
        assert torch.equal(a, b)


def test_outputs_dtypes_and_shapes():
    x = torch.randn(10, 6, dtype=torch.bfloat16)
    w, ids, counts = _route(x, 4, 1.5)
    assert (w.shape, w.dtype, ids.shape, ids.dtype, counts.shape, counts.dtype) == \
        ((10, 4), torch.float32, (10, 4), torch.int32, (6,), torch.int32)
    token_ids, w, counts = _route(x, 4, 1.5, expert_major=True)
    assert (token_ids.shape, token_ids.dtype, w.shape, w.dtype) == ((6, 10), torch.int32, (6, 10), torch.float32)


# -- errors ------------------------------------------------------------------------------------------------------------
def _error_cases():
    x = torch.randn(4, 8)
    return [
        (ValueError, "gating_output", (torch.randn(8), 2), {}),
        (ValueError, "gating_output", (torch.randn(2, 4, 8), 2), {}),
        (ValueError, "gating_output", (torch.randn(0, 8), 2), {}),
        (ValueError, "gating_output", (torch.randn(4, 0), 1), {}),
        (ValueError, "gating_output", (torch.randn(8, 4).t(), 2), {}),
        (ValueError, "gating_output", (torch.randn(2, 4097), 2), {}),
        (TypeError, "gating_output", (torch.randint(0, 5, (4, 8)), 2), {}),
        (TypeError, "gating_output", (x.double(), 2), {}),
        (TypeError, "gating_output", (x.tolist(), 2), {}),
        (ValueError, "top_k", (x, 0), {}),
        (ValueError, "top_k", (x, 9), {}),
        (TypeError, "top_k", (x, 2.0), {}),
        (TypeError, "top_k", (x, True), {}),
        (ValueError, "capacity_factor", (x, 2, 0.0), {}),
        (ValueError, "capacity_factor", (x, 2, -1.0), {}),
        (ValueError, "capacity_factor", (x, 2, math.inf), {}),
        (ValueError, "capacity_factor", (x, 2, math.nan), {}),
        (TypeError, "capacity_factor", (x, 2, "1.25"), {}),
        (TypeError, "capacity_factor", (x, 2, True), {}),
        (ValueError, "normalize_over", (x, 2), {"normalize_over": "rows"}),
        (ValueError, "fallback", (x, 2), {"fallback": "random"}),
        (ValueError, "token_mask", (x, 2), {"token_mask": torch.ones(5, dtype=torch.bool)}),
        (ValueError, "token_mask", (x, 2), {"token_mask": torch.ones(4, 1, dtype=torch.bool)}),
        (TypeError, "token_mask", (x, 2), {"token_mask": torch.ones(4)}),
        (ValueError, "token_mask", (x, 2), {"token_mask": torch.ones(8, dtype=torch.bool)[::2]}),
        (ValueError, "token_mask", (x, 2), {"token_mask": torch.ones(4, dtype=torch.bool, device="meta")}),
        (TypeError, "expert_major", (x, 2), {"expert_major": 1}),
        (TypeError, "return_counts", (x, 2), {"return_counts": None}),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_errors(case):
    exc, name, args, kwargs = _error_cases()[case]
    with pytest.raises(exc, match=f"^{name}: expected"):
        jitmoe.expert_choice(*args, **kwargs)
    with pytest.raises(exc, match=f"^{name}: expected"):
        ref.expert_choice(*args, **kwargs)


def test_direct_op_calls_are_validated_too():
    with pytest.raises(ValueError, match="^top_k: expected"):
        torch.ops.jitmoe.expert_choice(torch.randn(2, 4), None, 5, 1, "experts", "topk", False)
    with pytest.raises(ValueError, match="^capacity: expected"):
        torch.ops.jitmoe.expert_choice(torch.randn(2, 4), None, 2, 3, "experts", "topk", False)


# -- torch.library registration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    (torch.randn(9, 12), None, 3, 3, "experts", "topk", False),
    (torch.randn(9, 12, dtype=torch.bfloat16), torch.rand(9) > 0.5, 2, 4, "tokens", "none", False),
    (torch.randn(5, 7, dtype=torch.float16), None, 7, 5, "experts", "topk", True),
])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.jitmoe.expert_choice.default, args)


def test_fake_shapes_on_a_fake_cuda_tensor_need_no_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(9, 256, dtype=torch.bfloat16, device="cuda")
        w, ids, counts = torch.ops.jitmoe.expert_choice(x, None, 8, 5, "experts", "topk", False)
        token_ids, ew, ecounts = torch.ops.jitmoe.expert_choice(x, None, 8, 5, "tokens", "none", True)
    assert (w.shape, w.dtype, ids.shape, ids.dtype, w.device.type) == ((9, 8), torch.float32, (9, 8), torch.int32,
                                                                        "cuda")
    assert (token_ids.shape, token_ids.dtype, ew.shape, ew.dtype) == ((256, 5), torch.int32, (256, 5), torch.float32)
    assert (counts.shape, counts.dtype, ecounts.shape) == ((256,), torch.int32, (256,))


# -- specs, prewarm and templates --------------------------------------------------------------------------------------
def test_prewarm_specs():
    specs = ops.PREWARM["expert_choice"](["fp32", "bf16", "fp16"], [1, 8, 64], ["80", "90a"])
    assert sorted(s.readable_name for s in specs) == sorted(
        f"expert_choice_{d}_sm{a}" for d in ("fp32", "bf16", "fp16") for a in ("80", "90a"))
    for spec in specs:
        for text in spec.rendered_sources().values():
            assert "${" not in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("spec", [ops._spec("bf16", ("80",)), ops._spec("fp32", ("90a",))],
                         ids=lambda s: s.readable_name)
def test_templates_compile_without_spills(spec):
    from jitmoe.jit import compile_cuda_sources
    (compiled,) = compile_cuda_sources(spec, ptxas_verbose=True)
    spills = [ln for ln in compiled.output.splitlines() if "spill" in ln and " 0 bytes spill stores" not in ln]
    assert not spills, spills
