"""Pure-torch references of the fused MoE layer and its permutation ops (CPU path and GPU-test oracle).

Written for clarity: fp32 math, one loop iteration per local expert (moe_align: one stable sort by expert).
Inputs are assumed valid (the public ops validate them first); ids outside the local expert range are skipped,
exactly like the kernels skip them.

Activation formulas follow FlashInfer's ``ActivationType`` (the kernels' ``moe/activation.cuh`` implements the
same ones). Gated activations split fc1's output into ``up`` (first half) and ``gate`` (second half).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GATED_ACTIVATIONS", "ACTIVATION_NAMES", "effective_activation", "apply_activation",
           "fused_moe_reference", "moe_align_bound", "moe_align_reference", "moe_combine_reference",
           "slot_rows_reference", "FP8_DTYPE", "FP8_MAX", "round_to_fp8", "dequantized"]

ACTIVATION_NAMES = ("Gelu", "Relu", "Silu", "Swiglu", "Geglu", "SwigluBias", "Relu2", "SwigluStep", "GegluTanh",
                    "Identity", "Situ")
GATED_ACTIVATIONS = frozenset({"Swiglu", "Geglu", "SwigluBias", "SwigluStep", "GegluTanh", "Situ"})
SWIGLU_STEP_DEFAULT_LIMIT = 7.0
SITU_DEFAULT_BETA = 4.0
SITU_DEFAULT_LINEAR_BETA = 25.0
FP8_DTYPE = torch.float8_e4m3fn  # FP8 per-tensor mode (jitmoe.quant): input, weights and GEMM2's input
FP8_MAX = 448.0  # the largest finite e4m3 value


def effective_activation(name: str, has_swiglu_params: bool) -> str:
    """FlashInfer turns Swiglu into SwigluBias as soon as any of swiglu_alpha/beta/limit is given."""
    return "SwigluBias" if name == "Swiglu" and has_swiglu_params else name


def _param(values: torch.Tensor | None, expert: int, default: float) -> float | torch.Tensor:
    return default if values is None else values[expert].float()


def apply_activation(name: str, h: torch.Tensor, *, expert: int = 0, swiglu_alpha=None, swiglu_beta=None,
                     swiglu_limit=None, situ_beta=None, situ_linear_beta=None) -> torch.Tensor:
    """act(h) in fp32 for one expert's rows ``h`` [rows, n1]; per-expert parameters are indexed by ``expert``."""
    h = h.float()
    if name not in GATED_ACTIVATIONS:
        return {"Gelu": lambda x: F.gelu(x), "Relu": F.relu, "Silu": F.silu, "Relu2": lambda x: F.relu(x) ** 2,
                "Identity": lambda x: x}[name](h)
    up, gate = h.chunk(2, dim=-1)
    if name == "Swiglu":
        return F.silu(gate) * up
    if name == "Geglu":
        return F.gelu(gate) * up
    if name == "GegluTanh":
        return F.gelu(gate, approximate="tanh") * up
    if name == "SwigluBias":
        alpha = _param(swiglu_alpha, expert, 1.0)
        beta = _param(swiglu_beta, expert, 0.0)
        limit = _param(swiglu_limit, expert, math.inf)
        g = torch.clamp(gate, max=limit)
        return g * torch.sigmoid(alpha * g) * (torch.clamp(up, min=-limit, max=limit) + beta)
    if name == "SwigluStep":
        limit = _param(swiglu_limit, expert, SWIGLU_STEP_DEFAULT_LIMIT)
        return torch.clamp(F.silu(gate), max=limit) * torch.clamp(up, min=-limit, max=limit)
    # Situ
    b = _param(situ_beta, expert, SITU_DEFAULT_BETA)
    lb = _param(situ_linear_beta, expert, SITU_DEFAULT_LINEAR_BETA)
    return (b * torch.tanh(gate / b) * torch.sigmoid(gate)) * (lb * torch.tanh(up / lb))


def fused_moe_reference(input: torch.Tensor, token_selected_experts: torch.Tensor,
                        token_final_scales: torch.Tensor | None, fc1_expert_weights: torch.Tensor,
                        fc2_expert_weights: torch.Tensor, *, fc1_expert_biases: torch.Tensor | None = None,
                        fc2_expert_biases: torch.Tensor | None = None, activation: str = "Swiglu",
                        swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None, situ_beta=None,
                        situ_linear_beta=None, tp_rank: int = 0, ep_size: int = 1, ep_rank: int = 0,
                        out_dtype: torch.dtype | None = None, fc1_dequant: torch.Tensor | None = None,
                        fc2_quant: torch.Tensor | None = None, fc2_dequant: torch.Tensor | None = None,
                        fc1_weight_scales: torch.Tensor | None = None,
                        fc2_weight_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The fused MoE layer in fp32, cast to ``out_dtype`` (default: the input's dtype).

    out[t] = sum_j scale[t, j] * (act(x[t] @ fc1[e].T + b1[e]) @ fc2[e].T + b2[e]) over the choices j whose
    global id e lies in this EP rank's range; b2 only on tp_rank 0. ``activation`` is an ``ActivationType`` name
    (or member); Swiglu with any swiglu_* parameter computes SwigluBias, as FlashInfer does.
    FP8 per-tensor (``fc1_dequant`` [E_l], ``fc2_quant`` [1] or [E_l], ``fc2_dequant`` [E_l]; see jitmoe.quant):
    x @ fc1[e].T is scaled by fc1_dequant[e] before b1, act(...) * fc2_quant is rounded to e4m3 (saturating), and
    its product with fc2[e].T is scaled by fc2_dequant[e] before b2.
    INT8 weight-only (int8 weights, ``fc1_weight_scales`` [E_l, fc1 rows] and ``fc2_weight_scales`` [E_l, H]): each
    weight row is its int8 values times its scale.
    """
    name = effective_activation(getattr(activation, "name", activation),
                                any(p is not None for p in (swiglu_alpha, swiglu_beta, swiglu_limit)))
    num_tokens, hidden = input.shape
    num_local = fc2_expert_weights.shape[0]
    x = input.float()
    ids = token_selected_experts.long()
    scales = (torch.ones(ids.shape, device=input.device) if token_final_scales is None
              else token_final_scales.float())
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=input.device)
    params = dict(swiglu_alpha=swiglu_alpha, swiglu_beta=swiglu_beta, swiglu_limit=swiglu_limit,
                  situ_beta=situ_beta, situ_linear_beta=situ_linear_beta)
    for local in range(num_local):
        tokens, choices = torch.nonzero(ids == ep_rank * num_local + local, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens] @ dequantized(fc1_expert_weights, local, fc1_weight_scales).T
        if fc1_dequant is not None:
            h = h * fc1_dequant[local].float()
        if fc1_expert_biases is not None:
            h = h + fc1_expert_biases[local].float()
        a = apply_activation(name, h, expert=local, **params)
        if fc2_quant is not None:
            a = round_to_fp8(a * fc2_quant.reshape(-1)[local % fc2_quant.numel()].float()).float()
        y = a @ dequantized(fc2_expert_weights, local, fc2_weight_scales).T
        if fc2_dequant is not None:
            y = y * fc2_dequant[local].float()
        if fc2_expert_biases is not None and tp_rank == 0:
            y = y + fc2_expert_biases[local].float()
        out.index_add_(0, tokens, y * scales[tokens, choices].unsqueeze(1))
    return out.to(out_dtype or input.dtype)


def dequantized(weights: torch.Tensor, expert: int, row_scales: torch.Tensor | None) -> torch.Tensor:
    """One expert's weight [rows, K] in fp32 (INT8 weight-only: times its per-row scales)."""
    w = weights[expert].float()
    return w if row_scales is None else w * row_scales[expert].float()[:, None]


def round_to_fp8(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 as the kernels round GEMM2's input: nearest even, saturating to +-448 (cvt.satfinite)."""
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def moe_align_bound(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """Rows the expert-sorted, tile-padded order can need, from shapes only (so no host sync is ever needed).

    Each non-empty expert pads its c slots to ceil(c / block_m) * block_m <= c + block_m - 1 rows, and at most
    min(num_slots, E) experts are non-empty: total <= num_slots + min(num_slots, E) * (block_m - 1). Each also
    needs at most c * block_m rows, so total <= num_slots * block_m (the same bound when num_slots <= E). The
    result is rounded up to a multiple of block_m so the block count is an integer (rounding down would be safe
    too, since the real total is a multiple of block_m; rounding up costs at most one idle block).
    """
    bound = min(num_slots * block_m, num_slots + min(num_slots, num_local_experts) * (block_m - 1))
    return -(-bound // block_m) * block_m


def moe_align_reference(topk_ids: torch.Tensor, num_local_experts: int, block_m: int,
                        local_expert_offset: int = 0):
    """(sorted_ids, block_expert, num_padded, expert_counts) exactly as ``jitmoe.moe_align`` produces them.

    Vectorised (a stable sort by expert keeps slots ascending within each expert) so that GPU tests with a million
    slots and thousands of experts can use it as their oracle.
    """
    flat = topk_ids.reshape(-1).long().cpu()
    num_slots = flat.numel()
    m_pad_max = moe_align_bound(num_slots, num_local_experts, block_m)
    local = flat - local_expert_offset
    slots = torch.nonzero((local >= 0) & (local < num_local_experts)).flatten()  # ascending slot order
    experts, order = torch.sort(local[slots], stable=True)
    slots = slots[order]
    counts = torch.bincount(experts, minlength=num_local_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    rank = torch.arange(slots.numel()) - (torch.cumsum(counts, 0) - counts)[experts]  # position inside its expert
    used = int(padded.sum())
    rows = torch.full((m_pad_max,), num_slots, dtype=torch.long)
    rows[starts[experts] + rank] = slots
    blocks = torch.full((m_pad_max // block_m,), -1, dtype=torch.long)
    blocks[:used // block_m] = torch.repeat_interleave(torch.arange(num_local_experts), padded // block_m)
    device = topk_ids.device
    as_i32 = lambda t: t.to(dtype=torch.int32, device=device)  # noqa: E731
    return as_i32(rows), as_i32(blocks), as_i32(torch.tensor([used])), as_i32(counts)


def slot_rows_reference(sorted_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The row of every slot in ``sorted_ids`` (moe_align's order), -1 for slots no row holds: what moe_align writes
    into ``slot_rows`` when asked (``permute.align_into(..., slot_rows=)``)."""
    rows = torch.full((num_slots,), -1, dtype=torch.int32, device=sorted_ids.device)
    real = torch.nonzero(sorted_ids.long() < num_slots).flatten()
    rows[sorted_ids.long()[real]] = real.to(torch.int32)
    return rows


def moe_combine_reference(out_slots: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int,
                          local_expert_offset: int = 0) -> torch.Tensor:
    """out[t] = sum over j (in order) of out_slots[t*k + j] for local slots, accumulated in fp32."""
    num_tokens, topk = topk_ids.shape
    local = topk_ids.long() - local_expert_offset
    keep = ((local >= 0) & (local < num_local_experts)).reshape(-1, 1)
    rows = torch.where(keep, out_slots.float(), torch.zeros((), device=out_slots.device))
    acc = torch.zeros(num_tokens, out_slots.shape[1], dtype=torch.float32, device=out_slots.device)
    for j in range(topk):
        acc += rows[j::topk]
    return acc.to(out_slots.dtype)
