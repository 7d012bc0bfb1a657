"""jitmoe.nn.FusedMoE on the CPU (reference) path: HF conversion, routing, top_k changes, shapes, INT8 weight-only,
errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jitmoe
import jitmoe.nn
from jitmoe.ops import routing
from jitmoe.reference.moe import fused_moe_reference
from jitmoe.testing import rel_error

pytestmark = pytest.mark.skipif(not hasattr(routing, "topk_softmax"),
                                reason="jitmoe.topk_softmax (ops/routing.py) is not written yet")

H, I, E = 32, 24, 6


class MixtralExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=False)  # gate
        self.w3 = nn.Linear(H, I, bias=False)  # up
        self.w2 = nn.Linear(I, H, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class QwenExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def hf_sparse_block(x, gate, experts, top_k, renormalize):
    """The Hugging Face sparse MoE forward (Mixtral/Qwen2-MoE style), written as those models do it."""
    probs = torch.softmax(gate(x).float(), dim=-1)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tokens, slot = torch.where(chosen == e)
        if tokens.numel():
            out.index_add_(0, tokens, expert(x[tokens]) * weights[tokens, slot, None].to(x.dtype))
    return out


@pytest.mark.parametrize("expert_cls", [MixtralExpert, QwenExpert, "tuples"])
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (6, True)])
def test_from_hf_experts_matches_the_hf_block(expert_cls, top_k, renormalize):
    gate = nn.Linear(H, E, bias=False)
    modules = [QwenExpert() for _ in range(E)] if expert_cls == "tuples" else [expert_cls() for _ in range(E)]
    experts = ([(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in modules]
               if expert_cls == "tuples" else modules)
    layer = jitmoe.nn.FusedMoE.from_hf_experts(gate.weight, experts, top_k, renormalize)
    x = torch.randn(13, H)
    with torch.no_grad():
        expected = hf_sparse_block(x, gate, modules, top_k, renormalize)
        assert rel_error(layer(x), expected) < 1e-5
    assert layer.w13.shape == (E, 2 * I, H) and layer.w2.shape == (E, H, I)
    assert torch.equal(layer.w13[0, :I], modules[0].up_proj.weight if expert_cls != MixtralExpert
                       else modules[0].w3.weight)  # up half first, gate half second (FlashInfer's layout)


def test_top_k_can_change_and_is_validated():
    gate = nn.Linear(H, E, bias=False)
    modules = [QwenExpert() for _ in range(E)]
    layer = jitmoe.nn.FusedMoE.from_hf_experts(gate.weight, modules, 2)
    x = torch.randn(5, H)
    with torch.no_grad():
        layer.top_k = 3
        assert rel_error(layer(x), hf_sparse_block(x, gate, modules, 3, False)) < 1e-5
    for bad, exc in ((0, ValueError), (E + 1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(exc, match="top_k"):
            layer.top_k = bad
    assert layer.top_k == 3


def test_forward_flattens_leading_dimensions():
    layer = jitmoe.nn.FusedMoE(H, I, E, 2, renormalize=True)
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == x.shape
        assert torch.allclose(out.reshape(6, H), layer(x.reshape(6, H)))
    assert "top_k=2" in repr(layer)


def test_forward_and_loader_errors():
    layer = jitmoe.nn.FusedMoE(H, I, E, 2)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, H + 1))
    gate = torch.randn(E, H)
    with pytest.raises(ValueError, match="experts_gate_up_down"):
        jitmoe.nn.FusedMoE.from_hf_experts(gate, [QwenExpert() for _ in range(E - 1)], 2)
    with pytest.raises(TypeError, match=r"experts_gate_up_down\[0\]"):
        jitmoe.nn.FusedMoE.from_hf_experts(gate, [nn.Linear(H, I)] * E, 2)
    bad = [(torch.randn(I, H), torch.randn(I, H), torch.randn(I, H)) for _ in range(E)]
    with pytest.raises(ValueError, match="w_down"):
        jitmoe.nn.FusedMoE.from_hf_experts(gate, bad, 2)
    with pytest.raises(ValueError, match="top_k"):
        jitmoe.nn.FusedMoE(H, I, E, E + 1)


def test_quantize_int8_matches_the_dequantized_experts():
    gate = nn.Linear(H, E, bias=False)
    layer = jitmoe.nn.FusedMoE.from_hf_experts(gate.weight, [QwenExpert() for _ in range(E)], 2, renormalize=True)
    x = torch.randn(11, H)
    with torch.no_grad():
        full = layer(x)
        w13, w2 = layer.w13.clone(), layer.w2.clone()
        assert layer.quantize_int8_() is layer and layer.is_int8
        assert layer.w13.dtype == layer.w2.dtype == torch.int8
        assert layer.w13_scale.shape == (E, 2 * I) and layer.w2_scale.shape == (E, H)
        assert {"w13", "w2"}.isdisjoint(dict(layer.named_parameters()))
        assert {"w13", "w13_scale", "w2", "w2_scale"} <= set(layer.state_dict())
        # each weight within half a quantization step of its original value
        deq13 = layer.w13.float() * layer.w13_scale[..., None]
        deq2 = layer.w2.float() * layer.w2_scale[..., None]
        assert ((deq13 - w13).abs() <= layer.w13_scale[..., None] / 2 + 1e-6).all()
        assert ((deq2 - w2).abs() <= layer.w2_scale[..., None] / 2 + 1e-6).all()
        weights, ids = layer.route(x)
        got = layer(x)
        assert rel_error(got, fused_moe_reference(x, ids, weights, deq13, deq2)) < 1e-5
        assert 0 < rel_error(got, full) < 2e-2  # only the int8 rounding differs
        assert layer.quantize_int8_() is layer and torch.equal(layer(x), got)  # a second call changes nothing
    assert "weights=int8" in repr(layer)
    with pytest.raises(ValueError, match="reset_parameters"):
        layer.reset_parameters()
    with pytest.raises(TypeError, match="quantize_int8_"):
        jitmoe.nn.FusedMoE(H, I, E, 2, dtype=torch.float64).quantize_int8_()
