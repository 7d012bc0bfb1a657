"""FusedMoE: a sparse MoE block (softmax top-k router + experts) for users who want a layer, not a kernel.

Weights are kept in FlashInfer's layout, so the forward is one router call plus one ``cutlass_fused_moe`` call:
``w13`` [E, 2I, H] holds each expert's up projection then its gate projection, ``w2`` [E, H, I] its down
projection. ``FusedMoE.from_hf_experts`` converts a Hugging Face style block (a router Linear plus per-expert
gate/up/down Linears: ``gate_proj/up_proj/down_proj`` as in Qwen/DeepSeek, or Mixtral's ``w1/w3/w2``).

CUDA inputs run the kernels (bf16/fp16, inference: the op has no backward); CPU inputs run the fp32 reference in
any float dtype. ``quantize_int8_()`` turns the experts into INT8 weight-only (W8A16, one scale per weight row).
Expert parallelism and tensor parallelism are available through ``cutlass_fused_moe`` directly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import quant as _quant
from .ops import routing as _routing
from .ops._validate import check_int, check_tensor
from .ops.fused_moe import ActivationType, cutlass_fused_moe
from .reference.moe import fused_moe_reference

__all__ = ["FusedMoE"]


class FusedMoE(nn.Module):
    """y = sum over the top-k experts e of w_e(x) * down_e(act(gate_e(x)) * up_e(x)), router weights from a
    softmax over ``gate(x)`` (renormalised over the k chosen when ``renormalize``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = False, activation_type: ActivationType = ActivationType.Swiglu,
                 device=None, dtype=None):
        super().__init__()
        check_int("hidden_size", hidden_size, low=1)
        check_int("intermediate_size", intermediate_size, low=1)
        check_int("num_experts", num_experts, low=1)
        self.hidden_size, self.intermediate_size, self.num_experts = hidden_size, intermediate_size, num_experts
        self.renormalize = bool(renormalize)
        self.activation_type = ActivationType(activation_type)
        rows = 2 * intermediate_size if self.activation_type.is_gated else intermediate_size
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.w13 = nn.Parameter(torch.empty(num_experts, rows, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.top_k = top_k
        self.reset_parameters()

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._top_k = check_int("top_k", value, low=1, high=self.num_experts)

    @property
    def is_int8(self) -> bool:
        """Whether quantize_int8_() made the experts int8."""
        return self.w13.dtype == torch.int8

    def reset_parameters(self) -> None:
        """Each expert initialised like nn.Linear (uniform in +-1/sqrt(fan_in))."""
        if self.is_int8:
            raise ValueError("reset_parameters: the experts are int8 (quantize_int8_ was called); build a new "
                             "FusedMoE to initialise 16-bit experts")
        with torch.no_grad():
            for weight, fan_in in ((self.w13, self.hidden_size), (self.w2, self.intermediate_size)):
                bound = fan_in ** -0.5
                weight.uniform_(-bound, bound)

    def quantize_int8_(self) -> "FusedMoE":
        """INT8 weight-only per channel (W8A16), in place; returns self. ``w13`` and ``w2`` become int8 buffers with
        one scale per weight row, ``w13_scale`` [E, fc1 rows] and ``w2_scale`` [E, H] in the experts' dtype
        (jitmoe.quant.quantize_int8_per_channel), and forward passes them to ``cutlass_fused_moe`` with
        ``use_int8_woq_per_channel``: each decode step streams half the expert bytes. The router is unchanged. On
        CUDA, hidden_size and intermediate_size must be multiples of 16 (the INT8 kernels' contract). Calling it
        again changes nothing."""
        if self.is_int8:
            return self
        if self.w13.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"quantize_int8_: expected experts in float32, bfloat16 or float16, got {self.w13.dtype}")
        with torch.no_grad():
            w13, w13_scale = _quant.quantize_int8_per_channel(self.w13)
            w2, w2_scale = _quant.quantize_int8_per_channel(self.w2)
        del self.w13, self.w2  # parameters -> buffers: int8 tensors have no gradient
        for name, tensor in (("w13", w13), ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale)):
            self.register_buffer(name, tensor)
        return self

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k], ids int32 [T, k]) for tokens x [T, H]."""
        return _routing.topk_softmax(self.gate(x), self.top_k, renormalize=self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, contiguous=False)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected a last dimension of {self.hidden_size} (hidden_size), got {x.shape[-1]}")
        tokens = x.reshape(-1, self.hidden_size).contiguous()
        weights, ids = self.route(tokens)
        scales = [self.w13_scale, self.w2_scale] if self.is_int8 else None
        if tokens.is_cuda:
            out = cutlass_fused_moe(tokens, ids, weights, self.w13, self.w2, tokens.dtype, scales,
                                    activation_type=self.activation_type, use_int8_woq_per_channel=self.is_int8)[0]
        else:
            fc1_scales, fc2_scales = scales or (None, None)
            out = fused_moe_reference(tokens, ids, weights, self.w13, self.w2, activation=self.activation_type.name,
                                      fc1_weight_scales=fc1_scales, fc2_weight_scales=fc2_scales)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"activation_type={self.activation_type.name}" + (", weights=int8" if self.is_int8 else ""))

    @classmethod
    def from_hf_experts(cls, gate_weight: torch.Tensor, experts_gate_up_down: Sequence, top_k: int,
                        renormalize: bool = False) -> "FusedMoE":
        """Build from a router weight [E, H] and E experts, each either a tuple ``(w_gate [I, H], w_up [I, H],
        w_down [H, I])`` or a module with ``gate_proj/up_proj/down_proj`` (or Mixtral's ``w1/w3/w2``) Linears.
        The result computes ``down(silu(gate(x)) * up(x))`` per expert (Swiglu), on the weights' device/dtype."""
        check_tensor("gate_weight", gate_weight, ndim=2, contiguous=False)
        experts = [_expert_weights(i, e) for i, e in enumerate(experts_gate_up_down)]
        num_experts, hidden = gate_weight.shape
        if len(experts) != num_experts:
            raise ValueError(f"experts_gate_up_down: expected {num_experts} experts (gate_weight rows), "
                             f"got {len(experts)}")
        inter = experts[0][0].shape[0] if experts else 0
        for i, (w_gate, w_up, w_down) in enumerate(experts):
            for name, w, shape in (("w_gate", w_gate, (inter, hidden)), ("w_up", w_up, (inter, hidden)),
                                   ("w_down", w_down, (hidden, inter))):
                if tuple(w.shape) != shape:
                    raise ValueError(f"experts_gate_up_down[{i}].{name}: expected shape {shape}, "
                                     f"got {tuple(w.shape)}")
        module = cls(hidden, inter, num_experts, top_k, renormalize=renormalize, device=gate_weight.device,
                     dtype=gate_weight.dtype)
        with torch.no_grad():
            module.gate.weight.copy_(gate_weight)
            module.w13.copy_(torch.stack([torch.cat([up, gate], dim=0) for gate, up, _ in experts]))
            module.w2.copy_(torch.stack([down for _, _, down in experts]))
        return module


_HF_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # (gate, up, down): HF/Qwen, Mixtral


def _expert_weights(index: int, expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_gate, w_up, w_down) of one expert given as a tuple of tensors/Linears or an HF expert module."""
    if isinstance(expert, (tuple, list)):
        if len(expert) != 3:
            raise ValueError(f"experts_gate_up_down[{index}]: expected (w_gate, w_up, w_down), got {len(expert)} "
                             "items")
        parts = expert
    else:
        names = next((n for n in _HF_NAMES if all(hasattr(expert, a) for a in n)), None)
        if names is None:
            raise TypeError(f"experts_gate_up_down[{index}]: expected a (w_gate, w_up, w_down) tuple or a module "
                            f"with gate_proj/up_proj/down_proj or w1/w3/w2, got {type(expert).__name__}")
        parts = [getattr(expert, n) for n in names]
    weights = tuple(getattr(p, "weight", p) for p in parts)
    for name, w in zip(("w_gate", "w_up", "w_down"), weights):
        check_tensor(f"experts_gate_up_down[{index}].{name}", w, ndim=2, contiguous=False)
    return weights
