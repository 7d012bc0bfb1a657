"""FP8 per-tensor cutlass_fused_moe on the CPU: jitmoe.quant, the reference's FP8 semantics against an independent
float64 oracle, the CUDA pipeline's FP8 plumbing on CPU tensors, and every FP8 error."""
import pytest
import torch

import jitmoe
from jitmoe import quant
from jitmoe.ops import fused_moe as fm
from jitmoe.reference.moe import GATED_ACTIVATIONS, apply_activation, fused_moe_reference
from jitmoe.testing import rel_error

FP8 = torch.float8_e4m3fn


def make_fp8_problem(T=9, H=32, I=16, E=4, k=2, act="Swiglu", bias=False, dtype=torch.bfloat16, per_expert=False):
    rows = 2 * I if act in GATED_ACTIVATIONS else I
    x, xs = quant.quantize_fp8(torch.randn(T, H))
    fc1, w1s = quant.quantize_fp8_per_expert(torch.randn(E, rows, H) * H ** -0.5)
    fc2, w2s = quant.quantize_fp8_per_expert(torch.randn(E, H, I) * I ** -0.5)
    scales = quant.fp8_quant_scales(w1s, w2s, xs, torch.tensor(32 / 448))
    if per_expert:
        scales[1] = scales[1].repeat(E) * torch.linspace(0.5, 1.5, E)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    weights = torch.softmax(torch.randn(T, k), dim=-1)
    b1 = (torch.randn(E, rows) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, H) * 0.1).to(dtype) if bias else None
    return dict(input=x, token_selected_experts=ids, token_final_scales=weights, fc1_expert_weights=fc1,
                fc2_expert_weights=fc2, output_dtype=dtype, quant_scales=scales, fc1_expert_biases=b1,
                fc2_expert_biases=b2)


def naive_fp8_moe(p, act="Swiglu"):
    """Token by token in float64: dequantize, activate, re-quantize GEMM2's input to e4m3, dequantize again."""
    x, ids, w = p["input"].double(), p["token_selected_experts"], p["token_final_scales"].double()
    fc1, fc2 = p["fc1_expert_weights"].double(), p["fc2_expert_weights"].double()
    s1, q2, s2 = (s.double().reshape(-1) for s in p["quant_scales"][:3])
    b1, b2 = p["fc1_expert_biases"], p["fc2_expert_biases"]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = (fc1[e] @ x[t]) * s1[e] + (0 if b1 is None else b1[e].double())
            a = apply_activation(act, h[None].float())[0].double() * q2[e % q2.numel()]
            a = torch.clamp(a, -448, 448).to(FP8).double()
            y = (fc2[e] @ a) * s2[e] + (0 if b2 is None else b2[e].double())
            out[t] += w[t, j] * y
    return out


# -- jitmoe.quant ----------------------------------------------------------------------------------------------------
def test_quantize_fp8_round_trip_and_saturation():
    t = torch.randn(64, 48) * 3
    q, s = quant.quantize_fp8(t)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.dim() == 0
    assert rel_error(q.float() * s, t) < 0.05
    assert q.float().abs().max() == 448  # amax maps onto the largest finite e4m3 value
    q, _ = quant.quantize_fp8(torch.tensor([1e6, -1e6, 1.0]), scale=torch.tensor(1.0))
    assert q.float().tolist() == [448.0, -448.0, 1.0]  # saturates instead of turning into NaN


def test_quantize_fp8_per_expert_has_one_scale_per_expert():
    w = torch.randn(3, 16, 8) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    q, s = quant.quantize_fp8_per_expert(w)
    assert q.shape == w.shape and s.shape == (3,)
    assert torch.allclose(s, w.abs().amax(dim=(1, 2)) / 448)
    assert rel_error(q.float() * s.view(3, 1, 1), w) < 0.05


def test_fp8_quant_scales_is_flashinfers_layout():
    w1s, w2s, xs, a2 = torch.tensor([2.0, 3.0]), torch.tensor([5.0, 7.0]), torch.tensor(0.5), torch.tensor(4.0)
    fc1_dequant, fc2_quant, fc2_dequant, fc1_input_dequant = quant.fp8_quant_scales(w1s, w2s, xs, a2)
    assert fc1_dequant.tolist() == [1.0, 1.5] and fc2_quant.item() == 0.25
    assert fc2_dequant.tolist() == [20.0, 28.0] and fc1_input_dequant.item() == 0.5


# -- semantics -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act,bias,per_expert", [("Swiglu", False, False), ("Geglu", True, False),
                                                 ("Relu2", True, True), ("Identity", False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_path_matches_the_float64_oracle(act, bias, per_expert, dtype):
    p = make_fp8_problem(act=act, bias=bias, dtype=dtype, per_expert=per_expert)
    out = jitmoe.cutlass_fused_moe(**p, activation_type=getattr(fm.ActivationType, act))[0]
    assert out.dtype == dtype and out.shape == p["input"].shape
    assert rel_error(out, naive_fp8_moe(p, act)) < 1e-2


def test_fp8_layer_approximates_the_layer_it_was_quantized_from():
    T, H, I, E, k = 64, 128, 64, 4, 2
    x, w1, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H) * H ** -0.5, torch.randn(E, H, I) * I ** -0.5
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    w = torch.softmax(torch.randn(T, k), dim=-1)
    (xq, xs), (w1q, w1s), (w2q, w2s) = quant.quantize_fp8(x), quant.quantize_fp8_per_expert(w1), \
        quant.quantize_fp8_per_expert(w2)
    out = jitmoe.cutlass_fused_moe(xq, ids, w, w1q, w2q, torch.bfloat16,
                                   quant.fp8_quant_scales(w1s, w2s, xs, torch.tensor(32 / 448)))[0]
    err = rel_error(out, fused_moe_reference(x, ids, w, w1, w2, out_dtype=torch.float32))
    assert 1e-3 < err < 0.1


def test_cuda_pipeline_fp8_plumbing_on_cpu_tensors(cpu_pipeline):
    """_run_cuda's FP8 branch (sm90ws tiles with block_k 128, e4m3 inter, scales to both GEMMs) on CPU tensors."""
    p = make_fp8_problem(T=40, E=4, k=2, bias=True, per_expert=True)
    s = quant.parse_fp8_quant_scales(p["quant_scales"], 4, torch.device("cpu"))
    output = torch.full(p["input"].shape, float("nan"), dtype=torch.bfloat16)
    fm._run_cuda(output, p["input"], p["token_selected_experts"], p["token_final_scales"].reshape(-1),
                 p["fc1_expert_weights"], p["fc2_expert_weights"], p["fc1_expert_biases"], p["fc2_expert_biases"],
                 {}, "Swiglu", 0, "", 0, s)
    assert rel_error(output, naive_fp8_moe(p)) < 1e-2


def test_fp8_configs_keep_the_bytes_per_stage(cpu_pipeline):
    cfg1, cfg2 = fm._fp8_gemm_configs(4096 * 2, 8, 4096, 14336, torch.empty(0), "Swiglu", "", 0)
    assert cfg1.kernel == cfg2.kernel == "sm90ws" and cfg1.block_k == cfg2.block_k == 128
    spec = fm._gemm.gemm_spec(cfg1, "bf16", "gemm1", "Swiglu", ("90a",), "e4m3")
    assert "e4m3" in spec.readable_name
    with pytest.raises(fm._gemm.UnsupportedSpecError, match="e4m3"):
        fm._gemm.gemm_spec(fm._gemm.GemmConfig("sm90ws", 128, 128, 64, 4), "bf16", "gemm1", "Swiglu", ("90a",),
                           "e4m3")


# -- errors ----------------------------------------------------------------------------------------------------------
def _scales_with(index, value):
    def over(p):
        scales = list(p["quant_scales"])
        scales[index] = value
        return dict(quant_scales=scales)
    return over


FP8_ERRORS = {
    "missing quant_scales": (lambda p: dict(quant_scales=None), ValueError, "quant_scales"),
    "three scales": (lambda p: dict(quant_scales=p["quant_scales"][:3]), ValueError, "quant_scales"),
    "scales not a list": (lambda p: dict(quant_scales=torch.ones(4)), TypeError, "quant_scales"),
    "fc1_dequant length": (_scales_with(0, torch.ones(3)), ValueError, "fc1_dequant"),
    "fc1_dequant dtype": (_scales_with(0, torch.ones(4, dtype=torch.float16)), TypeError, "fc1_dequant"),
    "fc2_quant length": (_scales_with(1, torch.ones(2)), ValueError, "fc2_quant"),
    "fc2_dequant 2-D": (_scales_with(2, torch.ones(4, 1)), ValueError, "fc2_dequant"),
    "fc1_input_dequant per expert": (_scales_with(3, torch.ones(4)), ValueError, "fc1_input_dequant"),
    "output_dtype fp8": (lambda p: dict(output_dtype=FP8), TypeError, "output_dtype"),
    "output_dtype fp32": (lambda p: dict(output_dtype=torch.float32), TypeError, "output_dtype"),
    "hidden not multiple of 16": (lambda p: dict(input=torch.zeros(9, 24, dtype=FP8)), ValueError, "input"),
    "inter not multiple of 16": (lambda p: dict(fc1_expert_weights=torch.zeros(4, 48, 32, dtype=FP8),
                                                fc2_expert_weights=torch.zeros(4, 32, 24, dtype=FP8)), ValueError,
                                 "fc2_expert_weights"),
    "bias in e4m3": (lambda p: dict(fc1_expert_biases=torch.zeros(4, 32, dtype=FP8),
                                    fc2_expert_biases=torch.zeros(4, 32, dtype=FP8)), TypeError, "fc1_expert_biases"),
    "output buffer in e4m3": (lambda p: dict(output=torch.zeros(9, 32, dtype=FP8)), TypeError, "output"),
}


@pytest.mark.parametrize("case", list(FP8_ERRORS))
def test_fp8_errors_name_the_argument(case):
    make_over, exc, name = FP8_ERRORS[case]
    p = make_fp8_problem()
    with pytest.raises(exc, match=name):
        jitmoe.cutlass_fused_moe(**{**p, **make_over(p)})


@pytest.mark.parametrize("name", ["input", "fc1_expert_weights", "fc2_expert_weights"])
def test_mixed_fp8_and_16_bit_tensors_are_not_implemented(name):
    p = make_fp8_problem()
    p[name] = p[name].to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="float8_e4m3fn"):
        jitmoe.cutlass_fused_moe(**p)
