"""cutlass_fused_moe on the CPU path: reference semantics, EP/TP rules, FlashInfer API compatibility, every error."""
import enum
import inspect
import math

import pytest
import torch

import jitmoe
from jitmoe.ops import fused_moe as fm
from jitmoe.reference.moe import ACTIVATION_NAMES, GATED_ACTIVATIONS, fused_moe_reference
from jitmoe.testing import rel_error

BF16 = torch.bfloat16


# -- an independent oracle: one token, one choice at a time, float64, activations from first principles --------------
def _sigmoid(v):
    return 1.0 / (1.0 + torch.exp(-v))


def _naive_act(name, h, e, p):
    erf_gelu = lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))  # noqa: E731
    tanh_gelu = lambda v: 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))  # noqa
    silu = lambda v: v * _sigmoid(v)  # noqa: E731
    plain = {"Gelu": erf_gelu, "Relu": lambda v: torch.where(v > 0, v, 0.0), "Silu": silu,
             "Relu2": lambda v: torch.where(v > 0, v * v, 0.0), "Identity": lambda v: v}
    if name in plain:
        return plain[name](h)
    n = h.shape[0] // 2
    up, gate = h[:n], h[n:]
    get = lambda key, default: default if p.get(key) is None else float(p[key][e])  # noqa: E731
    if name == "Swiglu":
        return silu(gate) * up
    if name == "Geglu":
        return erf_gelu(gate) * up
    if name == "GegluTanh":
        return tanh_gelu(gate) * up
    if name == "SwigluBias":
        lim = get("swiglu_limit", math.inf)
        g = torch.where(gate > lim, lim, gate)
        u = torch.where(up > lim, lim, torch.where(up < -lim, -lim, up))
        return g * _sigmoid(get("swiglu_alpha", 1.0) * g) * (u + get("swiglu_beta", 0.0))
    if name == "SwigluStep":
        lim = get("swiglu_limit", 7.0)
        s = silu(gate)
        return torch.where(s > lim, lim, s) * torch.where(up > lim, lim, torch.where(up < -lim, -lim, up))
    b, lb = get("situ_beta", 4.0), get("situ_linear_beta", 25.0)
    return b * torch.tanh(gate / b) * _sigmoid(gate) * lb * torch.tanh(up / lb)


def naive_moe(x, ids, scales, fc1, fc2, act, b1=None, b2=None, tp_rank=0, ep_rank=0, params=None):
    num_local = fc2.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - ep_rank * num_local
            if not 0 <= e < num_local:
                continue
            h = fc1[e].double() @ x[t].double() + (0 if b1 is None else b1[e].double())
            y = fc2[e].double() @ _naive_act(act, h, e, params or {})
            if b2 is not None and tp_rank == 0:
                y = y + b2[e].double()
            out[t] += float(scales[t, j]) * y
    return out


def make_problem(T=6, H=32, I=16, E=4, k=2, dtype=BF16, act="Swiglu", bias=False, distinct=True):
    rows = 2 * I if act in GATED_ACTIVATIONS else I
    x = torch.randn(T, H).to(dtype)
    if distinct:
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int() if T else torch.zeros(0, k).int()
    else:
        ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    scales = torch.softmax(torch.randn(T, k), dim=-1)
    fc1 = (torch.randn(E, rows, H) / math.sqrt(H)).to(dtype)
    fc2 = (torch.randn(E, H, I) / math.sqrt(I)).to(dtype)
    b1 = (torch.randn(E, rows) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, H) * 0.1).to(dtype) if bias else None
    return x, ids, scales, fc1, fc2, b1, b2


def run(x, ids, scales, fc1, fc2, **kw):
    return jitmoe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, None, **kw)[0]


# -- reference semantics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTIVATION_NAMES)
@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_naive_formula(act, bias):
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(act=act, bias=bias, dtype=torch.float32, distinct=False)
    params = {}
    if act in ("SwigluBias", "SwigluStep"):
        params["swiglu_limit"] = torch.rand(fc2.shape[0]) + 0.3
    if act == "SwigluBias":
        params.update(swiglu_alpha=torch.rand(fc2.shape[0]) + 0.5, swiglu_beta=torch.randn(fc2.shape[0]))
    ref = fused_moe_reference(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2, activation=act,
                              **params)
    naive = naive_moe(x, ids, scales, fc1, fc2, act, b1, b2, params=params)
    assert rel_error(ref, naive) < 1e-5


@pytest.mark.parametrize("act", ["SwigluBias", "SwigluStep", "Situ"])
def test_reference_default_and_per_expert_parameters(act):
    x, ids, scales, fc1, fc2, _, _ = make_problem(act=act, dtype=torch.float32)
    x = x * 4  # reach the clamps
    ref = fused_moe_reference(x, ids, scales, fc1, fc2, activation=act)
    assert rel_error(ref, naive_moe(x, ids, scales, fc1, fc2, act)) < 1e-5
    if act == "Situ":
        params = {"situ_beta": torch.rand(4) + 1, "situ_linear_beta": torch.rand(4) * 5 + 1}
        ref = fused_moe_reference(x, ids, scales, fc1, fc2, activation=act, **params)
        assert rel_error(ref, naive_moe(x, ids, scales, fc1, fc2, act, params=params)) < 1e-5


@pytest.mark.parametrize("act", ["Swiglu", "Relu2", "GegluTanh", "Identity"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_path_is_the_reference_in_the_input_dtype(act, dtype):
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(act=act, dtype=dtype, bias=True)
    out = run(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2,
              activation_type=fm.ActivationType[act])
    assert out.dtype == dtype and out.shape == x.shape
    ref = fused_moe_reference(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2, activation=act)
    assert torch.equal(out, ref)
    assert rel_error(out, naive_moe(x, ids, scales, fc1, fc2, act, b1, b2)) < 1e-2


def test_swiglu_with_any_swiglu_parameter_is_swiglu_bias():
    x, ids, scales, fc1, fc2, _, _ = make_problem()
    beta = torch.full((4,), 0.5)
    out = run(x, ids, scales, fc1, fc2, swiglu_beta=beta)
    ref = fused_moe_reference(x, ids, scales, fc1, fc2, activation="SwigluBias", swiglu_beta=beta)
    assert torch.equal(out, ref)
    assert not torch.equal(out, run(x, ids, scales, fc1, fc2))


def test_scales_none_means_one_and_repeated_experts_add_up():
    x, ids, scales, fc1, fc2, _, _ = make_problem(distinct=False)
    ids[:, 1] = ids[:, 0]
    out = run(x, ids, None, fc1, fc2)
    assert rel_error(out, naive_moe(x, ids, torch.ones(ids.shape), fc1, fc2, "Swiglu")) < 1e-2


def test_finalize_mode_does_not_change_the_result():
    x, ids, scales, fc1, fc2, _, _ = make_problem()
    assert torch.equal(run(x, ids, scales, fc1, fc2, use_fused_finalize=True),
                       run(x, ids, scales, fc1, fc2, use_fused_finalize=False))


def test_empty_batch_returns_the_output():
    x, ids, scales, fc1, fc2, _, _ = make_problem(T=0)
    output = torch.empty(0, 32, dtype=BF16)
    res = jitmoe.cutlass_fused_moe(x, ids, scales, fc1, fc2, BF16, [], output=output)
    assert res[0] is output


# -- EP and TP -------------------------------------------------------------------------------------------------------
def _shard_tp(fc1, fc2, b1, rank, size):
    inter = fc2.shape[2]
    part = slice(rank * inter // size, (rank + 1) * inter // size)
    up, gate = fc1.chunk(2, dim=1)
    fc1_r = torch.cat([up[:, part], gate[:, part]], dim=1).contiguous()
    b1_r = None if b1 is None else torch.cat([b1[:, :inter][:, part], b1[:, inter:][:, part]], dim=1).contiguous()
    return fc1_r, fc2[:, :, part].contiguous(), b1_r


def test_expert_parallel_ranks_sum_to_the_full_layer():
    ep, E = 4, 8
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(T=9, E=E, k=2, dtype=torch.float32, bias=True)
    full = fused_moe_reference(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2)
    total = torch.zeros_like(full)
    x16 = x.to(BF16)
    for rank in range(ep):
        local = slice(rank * E // ep, (rank + 1) * E // ep)
        parts = [w[local].contiguous() for w in (fc1, fc2, b1, b2)]
        part = fused_moe_reference(x, ids, scales, *parts[:2], fc1_expert_biases=parts[2],
                                   fc2_expert_biases=parts[3], ep_size=ep, ep_rank=rank)
        no_local = ~((ids >= local.start) & (ids < local.stop)).any(dim=1)
        assert torch.all(part[no_local] == 0)
        total += part
        # the public API on the same shard, in bf16
        out = run(x16, ids, scales, *[p.to(BF16) for p in parts[:2]], fc1_expert_biases=parts[2].to(BF16),
                  fc2_expert_biases=parts[3].to(BF16), ep_size=ep, ep_rank=rank)
        assert torch.all(out[no_local] == 0)
        assert rel_error(out, part) < 1e-2
    assert rel_error(total, full) < 1e-6


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_sum_to_the_full_layer(tp):
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(T=7, I=32, dtype=torch.float32, bias=True)
    full = fused_moe_reference(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2)
    total = torch.zeros_like(full)
    for rank in range(tp):
        fc1_r, fc2_r, b1_r = _shard_tp(fc1, fc2, b1, rank, tp)
        total += fused_moe_reference(x, ids, scales, fc1_r, fc2_r, fc1_expert_biases=b1_r, fc2_expert_biases=b2,
                                     tp_rank=rank)
        out = run(x.to(BF16), ids, scales, fc1_r.to(BF16), fc2_r.to(BF16), fc1_expert_biases=b1_r.to(BF16),
                  fc2_expert_biases=b2.to(BF16), tp_size=tp, tp_rank=rank)
        ref = fused_moe_reference(x, ids, scales, fc1_r, fc2_r, fc1_expert_biases=b1_r, fc2_expert_biases=b2,
                                  tp_rank=rank)
        assert rel_error(out, ref) < 1e-2
    assert rel_error(total, full) < 1e-6


# -- FlashInfer API compatibility ------------------------------------------------------------------------------------
_P, _K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
_REQUIRED = inspect.Parameter.empty
FLASHINFER_PARAMETERS = [  # flashinfer-api.md section 1 (HEAD)
    ("input", _REQUIRED), ("token_selected_experts", _REQUIRED), ("token_final_scales", _REQUIRED),
    ("fc1_expert_weights", _REQUIRED), ("fc2_expert_weights", _REQUIRED), ("output_dtype", _REQUIRED),
    ("quant_scales", _REQUIRED), ("fc1_expert_biases", None), ("fc2_expert_biases", None), ("input_sf", None),
    ("swiglu_alpha", None), ("swiglu_beta", None), ("swiglu_limit", None), ("tp_size", 1), ("tp_rank", 0),
    ("ep_size", 1), ("ep_rank", 0), ("cluster_size", 1), ("cluster_rank", 0), ("output", None),
    ("enable_alltoall", False), ("use_deepseek_fp8_block_scale", False), ("use_w4_group_scaling", False),
    ("use_mxfp8_act_scaling", False), ("min_latency_mode", False), ("use_packed_weights", False),
    ("use_wfp4afp8_humming", False), ("tune_max_num_tokens", 8192), ("enable_pdl", None),
    ("activation_type", "Swiglu"), ("swizzled_input_sf", True), ("use_fused_finalize", True),
    ("profile_ids", None), ("workspace_buffer", None),
]
FLASHINFER_KEYWORD_ONLY = [("situ_beta", None), ("situ_linear_beta", None)]
JITMOE_KEYWORD_ONLY = [("use_int8_woq_per_channel", False)]  # TensorRT-LLM's flag, which FlashInfer lacks


def test_signature_matches_flashinfer():
    params = list(inspect.signature(jitmoe.cutlass_fused_moe).parameters.values())
    expected = [(n, d, _P) for n, d in FLASHINFER_PARAMETERS] + [(n, d, _K) for n, d in FLASHINFER_KEYWORD_ONLY
                                                                 + JITMOE_KEYWORD_ONLY]
    assert [p.name for p in params] == [n for n, _, _ in expected]
    for p, (name, default, kind) in zip(params, expected):
        assert p.kind == kind, name
        if name == "activation_type":
            assert p.default is fm.ActivationType.Swiglu
        else:
            assert p.default is default or p.default == default, name
    assert jitmoe.cutlass_fused_moe is fm.cutlass_fused_moe


def test_returns_a_list_whose_first_element_is_output():
    x, ids, scales, fc1, fc2, _, _ = make_problem()
    output = torch.full(x.shape, float("nan"), dtype=BF16)
    res = jitmoe.cutlass_fused_moe(x, ids, scales, fc1, fc2, BF16, None, output=output)
    assert isinstance(res, list) and res[0] is output and not output.isnan().any()
    res = jitmoe.cutlass_fused_moe(x, ids, scales, fc1, fc2, BF16, None)
    assert isinstance(res, list) and torch.equal(res[0], output)


def test_activation_type_names_values_and_gating():
    expected = {"Gelu": 0, "Relu": 1, "Silu": 2, "Swiglu": 3, "Geglu": 4, "SwigluBias": 5, "Relu2": 6,
                "SwigluStep": 7, "GegluTanh": 8, "Identity": 9, "Situ": 10, "InvalidType": 11}
    assert {m.name: m.value for m in jitmoe.ActivationType} == expected
    assert issubclass(jitmoe.ActivationType, enum.IntEnum)
    gated = {m.name for m in jitmoe.ActivationType if m.is_gated}
    assert gated == {"Swiglu", "Geglu", "SwigluBias", "SwigluStep", "GegluTanh", "Situ"}


def test_foreign_activation_enum_is_matched_by_name():
    class OldActivationType(enum.IntEnum):  # FlashInfer v0.5-v0.6.12 numbering
        Swiglu = 3
        Relu2 = 6
        Identity = 7

    x, ids, scales, fc1, fc2, _, _ = make_problem(act="Identity")
    out = run(x, ids, scales, fc1, fc2, activation_type=OldActivationType.Identity)
    assert torch.equal(out, fused_moe_reference(x, ids, scales, fc1, fc2, activation="Identity"))


def test_autotune_context_keeps_calls_working():
    x, ids, scales, fc1, fc2, _, _ = make_problem()
    with jitmoe.autotune():
        inside = run(x, ids, scales, fc1, fc2)
    with jitmoe.autotune(True, cache=None):
        pass
    assert torch.equal(inside, run(x, ids, scales, fc1, fc2))


def test_force_kernel_validates_and_restores():
    with pytest.raises(ValueError, match="kernel"):
        with fm.force_kernel("sm70"):
            pass
    with fm.force_kernel("sm80"):
        assert fm._forced_kernel == "sm80"
    assert fm._forced_kernel == ""


def test_force_split_k_validates_and_restores():
    for bad in (0, 17, -1):
        with pytest.raises(ValueError, match="k_splits"):
            with fm.force_split_k(bad):
                pass
    with fm.force_split_k(4):
        assert fm._forced_split_k == 4
        with fm.force_split_k(None):
            assert fm._forced_split_k == 0
    assert fm._forced_split_k == 0


def test_op_passes_opcheck():
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(bias=True)
    out = torch.empty_like(x)
    args = (out, x, ids, scales.reshape(-1), fc1, fc2, b1, b2, None, None, None, "Swiglu", 1, 0, "", 0)
    torch.library.opcheck(torch.ops.jitmoe.fused_moe.default, args)


# -- errors ----------------------------------------------------------------------------------------------------------
def _call(**over):
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(bias=True)
    args = dict(input=x, token_selected_experts=ids, token_final_scales=scales, fc1_expert_weights=fc1,
                fc2_expert_weights=fc2, output_dtype=BF16, quant_scales=None)
    args.update(over)
    return jitmoe.cutlass_fused_moe(**args)


def _problem():
    return dict(zip(("x", "ids", "scales", "fc1", "fc2", "b1", "b2"), make_problem(bias=True)))


ERROR_CASES = {
    "input 1-D": (lambda p: dict(input=p["x"][0]), ValueError, "input"),
    "input fp32": (lambda p: dict(input=p["x"].float(), output_dtype=torch.float32), TypeError, "input"),
    "input non-contiguous": (lambda p: dict(input=torch.randn(32, 6).to(BF16).t()), ValueError, "input"),
    "hidden not multiple of 8": (lambda p: dict(input=p["x"][:, :20].contiguous()), ValueError, "input"),
    "inter not multiple of 8": (lambda p: dict(fc1_expert_weights=torch.zeros(4, 24, 32, dtype=BF16),
                                               fc2_expert_weights=torch.zeros(4, 32, 12, dtype=BF16)), ValueError,
                                "fc2_expert_weights"),
    "fc1 rows mismatch": (lambda p: dict(fc1_expert_weights=p["fc1"][:, :16].contiguous()), ValueError,
                          "fc1_expert_weights"),
    "fc1 experts mismatch": (lambda p: dict(fc1_expert_weights=p["fc1"][:3].contiguous()), ValueError,
                             "fc1_expert_weights"),
    "fc2 hidden mismatch": (lambda p: dict(fc2_expert_weights=torch.zeros(4, 24, 16, dtype=BF16)), ValueError,
                            "fc2_expert_weights"),
    "fc1 2-D": (lambda p: dict(fc1_expert_weights=p["fc1"][0]), ValueError, "fc1_expert_weights"),
    "weights dtype mismatch": (lambda p: dict(fc2_expert_weights=p["fc2"].half()), TypeError, "fc2_expert_weights"),
    "ids int64": (lambda p: dict(token_selected_experts=p["ids"].long()), TypeError, "token_selected_experts"),
    "ids wrong rows": (lambda p: dict(token_selected_experts=p["ids"][:3].contiguous()), ValueError,
                       "token_selected_experts"),
    "ids 1-D": (lambda p: dict(token_selected_experts=p["ids"][:, 0].contiguous()), ValueError,
                "token_selected_experts"),
    "k > experts": (lambda p: dict(token_selected_experts=torch.zeros(6, 5, dtype=torch.int32),
                                   token_final_scales=torch.ones(6, 5)), ValueError, "top_k"),
    "ids out of range": (lambda p: dict(token_selected_experts=torch.full((6, 2), 4, dtype=torch.int32)),
                         ValueError, "token_selected_experts"),
    "negative id": (lambda p: dict(token_selected_experts=torch.full((6, 2), -1, dtype=torch.int32)), ValueError,
                    "token_selected_experts"),
    "scales bf16": (lambda p: dict(token_final_scales=p["scales"].to(BF16)), TypeError, "token_final_scales"),
    "scales shape": (lambda p: dict(token_final_scales=p["scales"][:, :1].contiguous()), ValueError,
                     "token_final_scales"),
    "output shape": (lambda p: dict(output=torch.empty(6, 16, dtype=BF16)), ValueError, "output"),
    "output dtype": (lambda p: dict(output=torch.empty(6, 32, dtype=torch.float16)), TypeError, "output"),
    "output device": (lambda p: dict(output=torch.empty(6, 32, dtype=BF16, device="meta")), ValueError, "output"),
    "output_dtype differs": (lambda p: dict(output_dtype=torch.float16), TypeError, "output_dtype"),
    "output_dtype not a dtype": (lambda p: dict(output_dtype="bf16"), TypeError, "output_dtype"),
    "fc1 bias alone": (lambda p: dict(fc1_expert_biases=p["b1"]), ValueError, "fc2_expert_biases"),
    "fc2 bias alone": (lambda p: dict(fc2_expert_biases=p["b2"]), ValueError, "fc1_expert_biases"),
    "fc1 bias shape": (lambda p: dict(fc1_expert_biases=p["b1"][:, :16].contiguous(), fc2_expert_biases=p["b2"]),
                       ValueError, "fc1_expert_biases"),
    "fc2 bias dtype": (lambda p: dict(fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"].float()), TypeError,
                       "fc2_expert_biases"),
    "swiglu_alpha shape": (lambda p: dict(swiglu_alpha=torch.ones(3)), ValueError, "swiglu_alpha"),
    "swiglu_limit dtype": (lambda p: dict(swiglu_limit=torch.ones(4, dtype=BF16)), TypeError, "swiglu_limit"),
    "tensors on two devices": (lambda p: dict(token_final_scales=p["scales"].to("meta")), ValueError,
                               "token_final_scales"),
    "tp_rank >= tp_size": (lambda p: dict(tp_size=2, tp_rank=2), ValueError, "tp_rank"),
    "ep_size 0": (lambda p: dict(ep_size=0), ValueError, "ep_size"),
    "cluster_rank": (lambda p: dict(cluster_rank=1), ValueError, "cluster_rank"),
    "activation InvalidType": (lambda p: dict(activation_type=fm.ActivationType.InvalidType), ValueError,
                               "activation_type"),
    "activation unknown int": (lambda p: dict(activation_type=42), ValueError, "activation_type"),
    "activation wrong type": (lambda p: dict(activation_type=3.0), TypeError, "activation_type"),
    "workspace 2-D": (lambda p: dict(workspace_buffer=torch.zeros(2, 8, dtype=torch.uint8)), ValueError,
                      "workspace_buffer"),
    "workspace dtype": (lambda p: dict(workspace_buffer=torch.zeros(8)), TypeError, "workspace_buffer"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_argument(case):
    make_over, exc, name = ERROR_CASES[case]
    with pytest.raises(exc, match=name):
        _call(**make_over(_problem()))


NOT_IMPLEMENTED = {
    "use_deepseek_fp8_block_scale": dict(use_deepseek_fp8_block_scale=True),
    "use_w4_group_scaling": dict(use_w4_group_scaling=True),
    "use_mxfp8_act_scaling": dict(use_mxfp8_act_scaling=True),
    "min_latency_mode": dict(min_latency_mode=True),
    "use_packed_weights": dict(use_packed_weights=True),
    "use_wfp4afp8_humming": dict(use_wfp4afp8_humming=True),
    "quant_scales": dict(quant_scales=[torch.ones(4)]),
    "input_sf": dict(input_sf=torch.ones(6, 2)),
    "cluster_size": dict(cluster_size=2),
    "enable_alltoall": dict(enable_alltoall=True, ep_size=2, ep_rank=0),
    "situ_beta": dict(situ_beta=torch.ones(4), activation_type=fm.ActivationType.Situ),
    "FP8": dict(input=torch.zeros(6, 32, dtype=torch.float8_e4m3fn)),
    "uint8": dict(fc1_expert_weights=torch.zeros(4, 32, 16, dtype=torch.uint8)),
    "int64": dict(fc1_expert_weights=torch.zeros(4, 32, 2, dtype=torch.int64)),
}


def test_int8_weights_without_the_flag_name_it():
    with pytest.raises(TypeError, match="fc2_expert_weights: int8 weights need use_int8_woq_per_channel=True"):
        _call(fc2_expert_weights=torch.zeros(4, 32, 16, dtype=torch.int8))


@pytest.mark.parametrize("mode", list(NOT_IMPLEMENTED))
def test_unsupported_modes_raise_not_implemented(mode):
    with pytest.raises(NotImplementedError, match=mode):
        _call(**NOT_IMPLEMENTED[mode])


def test_alltoall_without_ep_is_accepted():
    assert _call(enable_alltoall=True)[0].shape == (6, 32)


# -- the CUDA pipeline's plumbing, run on CPU tensors: moe_gemm's CPU path plus reference align/combine --------------
@pytest.mark.parametrize("k_splits", [0, 2])
@pytest.mark.parametrize("kernel", ["", "sm80", "sm90"])
@pytest.mark.parametrize("k,act,ep_rank", [(1, "Swiglu", 0), (2, "SwigluBias", 1), (3, "Relu2", 0)])
def test_cuda_pipeline_plumbing_on_cpu_tensors(cpu_pipeline, kernel, k, act, ep_rank, k_splits):
    if kernel == "sm90" and "sm90" not in fm._gemm.available_kernels():
        pytest.skip("the sm90 GEMM template is not in the tree")
    E_l, ep = 4, 2
    x, ids, scales, fc1, fc2, b1, b2 = make_problem(T=9, E=E_l * ep, k=k, act=act, bias=True)
    fc1, fc2, b1, b2 = (w[ep_rank * E_l:(ep_rank + 1) * E_l].contiguous() for w in (fc1, fc2, b1, b2))
    params = {}
    if act == "SwigluBias":
        params = {"swiglu_alpha": torch.rand(E_l) + 0.5, "swiglu_limit": torch.rand(E_l) + 1}
    output = torch.full(x.shape, float("nan"), dtype=x.dtype)
    fm._run_cuda(output, x, ids, scales.reshape(-1), fc1, fc2, b1, b2, params, act, ep_rank * E_l, kernel, k_splits)
    ref = fused_moe_reference(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, fc2_expert_biases=b2,
                              activation=act, ep_size=ep, ep_rank=ep_rank, out_dtype=torch.float32, **params)
    assert rel_error(output, ref) < 1e-2


@pytest.mark.parametrize("kernel,k_splits,counted", [("", 0, True), ("sm90ws", 0, True), ("sm80", 0, False),
                                                     ("sm90", 2, False), ("sm90ws", 0, False)])
def test_pipeline_hands_gemm1s_block_counters_to_gemm2(cpu_pipeline, monkeypatch, kernel, k_splits, counted):
    """Both GEMMs on sm90ws (neither split): moe_align zeroes one counter per block, GEMM1 counts into them and GEMM2
    waits on them, given GEMM1's config; otherwise (or with JITMOE_BLOCK_DONE=0) none of them gets counters."""
    if kernel == "sm90" and "sm90" not in fm._gemm.available_kernels():
        pytest.skip("the sm90 GEMM template is not in the tree")
    if kernel == "sm90ws" and not counted:
        monkeypatch.setenv("JITMOE_BLOCK_DONE", "0")
    seen = {}
    for name in ("launch_gemm1", "launch_gemm2"):
        def record(*args, _name=name, _real=getattr(fm._gemm, name), **kwargs):
            seen[_name] = dict(kwargs, block_expert=args[3])
            return _real(*args, **kwargs)
        monkeypatch.setattr(fm._gemm, name, record)
    x, ids, scales, fc1, fc2, _, _ = make_problem(T=9, E=8, k=2)
    output = torch.full(x.shape, float("nan"), dtype=x.dtype)
    fm._run_cuda(output, x, ids, scales.reshape(-1), fc1, fc2, None, None, {}, "Swiglu", 0, kernel, k_splits)
    assert rel_error(output, fused_moe_reference(x, ids, scales, fc1, fc2, out_dtype=torch.float32)) < 1e-2
    counters = seen["launch_gemm1"]["block_done"]
    assert seen["launch_gemm2"]["block_done"] is counters
    if not counted:
        assert counters is None
        return
    assert counters.dtype == torch.int32 and (counters == 0).all()  # what the (reference) moe_align left
    assert counters.shape == seen["launch_gemm1"]["block_expert"].shape  # one per block of block_m rows
    assert seen["launch_gemm2"]["gemm1_config"] is seen["launch_gemm1"]["config"]
