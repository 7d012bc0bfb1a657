"""Decode path of the fused MoE layer (``csrc_templates/moe_decode/``): two weight-streaming launches for a few
tokens, where a grouped GEMM's tiles would be mostly padding. GEMM1 computes each (token, choice) slot's
activated row straight from x; GEMM2 computes each token's output columns and sums its top-k choices itself, in
order, so there is no moe_align, no padded order, no per-slot output buffer and no combine launch.

``use_decode`` is the pipeline's rule for taking this path; ``run_decode`` launches it. FP8 per-tensor (e4m3 x and
weights, jitmoe.quant's scales) runs the same kernels with e4m3 operands and an e4m3 inter row (sm_89+); INT8
weight-only (int8 weights with per-channel scales, 16-bit x) with int8 weight rows (sm_80+).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..jit import KernelSpec, device_archs, load_module, normalize_arch
from ._validate import DTYPE_TAG
from .moe_gemm import ACTIVATIONS, activation_name

__all__ = ["decode_spec", "fits_decode", "use_decode", "run_decode"]

# The decode path streams every slot's expert weights, the grouped GEMMs every distinct expert's once: it wins while
# few slots share an expert. Measured on the H100 against the forced sm90 path at T = 1, 2, 4, 8, 16 on the four
# benchmark shapes (benchmarks/results/h100-2026-11-22-session6/): it won every row with T <= 2, and up to T = 8
# while slots <= E_local / 2 (Qwen3 T=8 0.21 vs 0.24 ms, DeepSeek-V3 T=8 1.85 vs 1.93), and lost the others
# (Mixtral T=4 0.93 vs 0.81, OLMoE T=8 0.27 vs 0.25, every T=16).
# FP8 (e4m3 weights) halves both paths' bytes, and the grouped GEMMs also double their tensor rate. Measured the same
# way in three runs (benchmarks/results/h100-2026-11-24-session24/), decode won Qwen3/OLMoE at T = 4 (0.067 vs
# 0.073-0.076, 0.078 vs 0.080-0.086 ms) and tied DeepSeek-V3 there twice (lost 0.486 vs 0.457 once). It won T <= 2
# but for one Mixtral T = 2 routing whose 4 slots shared experts (0.230 vs 0.206), and lost every T = 8 row
# (DeepSeek-V3 0.95 vs 0.81-0.89, Qwen3 0.116 vs 0.112): FP8 stops at 4 tokens. On the held-out shapes the grouped
# GEMMs won T = 4 for larger experts (Qwen2-57B, H * I = 9.2 Mi: 0.282 vs 0.317 ms; Qwen3-235B, 6.3 Mi: 0.213 vs
# 0.222), where a launch's fixed cost weighs less against streaming: FP8 takes 3-4 tokens only for experts of at most
# 4 Mi elements per matrix (Qwen3-30B 1.6 Mi, OLMoE 2.1 Mi), which also sends DeepSeek-V3 (14.7 Mi, a tie) and
# DeepSeek-V2 (7.9 Mi, 2% slower there) to the grouped GEMMs.
# INT8 weight-only (int8 weights, 16-bit x) against its grouped GEMMs on the sm80 kernel, measured on the H100
# (benchmarks/results/h100-2026-11-24-session25/): decode won Mixtral-8x7B at T = 4 (8 slots on 8 experts: 0.459 vs
# 0.554 ms) and Qwen3 there (0.073 vs 0.106), and lost every T = 64 row (Qwen3 0.90 vs 0.32). On held-out shapes the
# rule below was right at T = 2 and at Mixtral-8x22B T = 8 (grouped 1.29 vs 1.60) and 3% slow at Qwen2-57B T = 8
# (grouped 0.639 vs decode 0.616). int8 weights decode up to 4 tokens always, then by the 16-bit rule.
_ALWAYS_TOKENS = 2
_INT8_ALWAYS_TOKENS = 4
_MAX_TOKENS = {2: 8, 1: 4}  # by operand bytes
_FP8_MAX_EXPERT_ELEMS = 1 << 22  # H * I; larger FP8 experts stop at _ALWAYS_TOKENS
_MAX_GRID_Y = 65535  # GEMM1's grid has one row of blocks per slot


@functools.lru_cache(maxsize=256)  # every decode call asks; building a spec costs microseconds of host time
def decode_spec(dtype: str, activation: str, archs, operand: Optional[str] = None,
                weight: Optional[str] = None) -> KernelSpec:
    """``dtype``: the output's (and biases') type; ``operand``: x's and inter's ('e4m3' for FP8, None: ``dtype``);
    ``weight``: the weights' ('s8' for INT8 weight-only with a 16-bit operand, None: the operand's)."""
    if operand not in (None, dtype, "e4m3"):
        raise ValueError(f"operand: expected None, {dtype!r} or 'e4m3', got {operand!r}")
    operand = operand or dtype
    if weight not in (None, operand) and not (weight == "s8" and operand == dtype):
        raise ValueError(f"weight: expected None, {operand!r} or 's8' (with a 16-bit operand), got {weight!r}")
    return KernelSpec.create("moe_decode", "moe_decode", ("moe_decode.cu", "moe_decode_binding.cpp"),
                             {"dtype": dtype, "operand": operand, "weight": weight or operand,
                              "act": activation_name(activation)}, archs)


def fits_decode(num_tokens: int, topk: int, hidden: int, inter: int, elem_bytes: int = 2,
                weight_bytes: Optional[int] = None) -> bool:
    """Whether the decode kernels can run the shape: the slots fit the grid's y dimension and rows of
    ``elem_bytes``-byte operands and ``weight_bytes``-byte weights (default: the operands') are whole 16-byte
    chunks."""
    chunk = 16 // min(elem_bytes, weight_bytes or elem_bytes)
    return num_tokens * topk <= _MAX_GRID_Y and hidden % chunk == 0 and inter % chunk == 0


def use_decode(num_tokens: int, topk: int, num_experts: int, hidden: int, inter: int, elem_bytes: int = 2,
               weight_bytes: Optional[int] = None) -> bool:
    """The pipeline's default: the decode path for a few tokens whose slots rarely share an expert (see above),
    when the shape fits. ``num_experts`` is the number of local experts; ``elem_bytes`` the operands' size;
    ``weight_bytes`` 1 with 16-bit operands: int8 weights (their rule was measured against the sm80 grouped GEMMs;
    against sm90ws, session 26's T = 8 rows took the faster path but for OLMoE: decode 0.154 against 0.165 ms)."""
    max_tokens = _MAX_TOKENS[elem_bytes]
    if elem_bytes == 1 and hidden * inter > _FP8_MAX_EXPERT_ELEMS:
        max_tokens = _ALWAYS_TOKENS
    always = _INT8_ALWAYS_TOKENS if weight_bytes == 1 and elem_bytes == 2 else _ALWAYS_TOKENS
    few = num_tokens <= always or (num_tokens <= max_tokens and 2 * num_tokens * topk <= num_experts)
    return num_tokens > 0 and few and fits_decode(num_tokens, topk, hidden, inter, elem_bytes, weight_bytes)


def run_decode(output: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, slot_weights: torch.Tensor,
               fc1: torch.Tensor, fc2: torch.Tensor, fc1_bias: Optional[torch.Tensor],
               fc2_bias: Optional[torch.Tensor], act_params: dict, activation: str, local_expert_offset: int,
               fp8_scales: Optional[tuple] = None, weight_scales: Optional[tuple] = None) -> None:
    """output[t] = sum_j w[t, j] * (act(x[t] fc1[e]^T + b1) fc2[e]^T + b2) over the token's local experts, in a
    fixed order (zeros for tokens without one). ``fp8_scales`` (fc1_dequant, fc2_quant, fc2_dequant) with e4m3 x,
    fc1 and fc2: the FP8 per-tensor layer of jitmoe.quant, inter rounded to e4m3. ``weight_scales`` (fc1 [E, n1],
    fc2 [E, H]) with int8 fc1 and fc2: INT8 weight-only. Inputs are validated by the caller (cutlass_fused_moe);
    never syncs."""
    num_tokens, topk = topk_ids.shape
    if not fits_decode(num_tokens, topk, x.shape[1], fc2.shape[2], x.element_size(), fc2.element_size()):
        chunk = 16 // min(x.element_size(), fc2.element_size())
        raise ValueError(f"moe_decode: shape T={num_tokens} k={topk} H={x.shape[1]} I={fc2.shape[2]} does not fit the"
                         f" decode kernels (T * k <= {_MAX_GRID_Y}, H and I multiples of {chunk})")
    inter = torch.empty(num_tokens * topk, fc2.shape[2], dtype=x.dtype, device=x.device)
    operand = "e4m3" if fp8_scales is not None else None
    weight = "s8" if weight_scales is not None else None
    spec = decode_spec(DTYPE_TAG[output.dtype], activation, device_archs(x.device), operand, weight)
    load_module(spec).run(x, fc1, fc1_bias, inter, fc2, fc2_bias, output, topk_ids, slot_weights,
                          act_params.get("swiglu_alpha"), act_params.get("swiglu_beta"),
                          act_params.get("swiglu_limit"), local_expert_offset, *(fp8_scales or (None,) * 3),
                          *(weight_scales or (None,) * 2))


def _prewarm_specs(dtypes, topks, archs) -> list[KernelSpec]:
    del topks  # top-k is a run-time value
    specs = [decode_spec(d, act, tuple(archs)) for d in dtypes if d in ("bf16", "fp16") for act in ACTIVATIONS]
    fp8_archs = tuple(a for a in archs if normalize_arch(a) == "90a")  # where the pipeline runs FP8
    if "fp8" in dtypes and fp8_archs:  # bf16 output, as moe_gemm prewarms FP8
        specs += [decode_spec("bf16", act, fp8_archs, "e4m3") for act in ACTIVATIONS]
    if "int8" in dtypes:  # INT8 weight-only with bf16 activations
        specs += [decode_spec("bf16", act, tuple(archs), None, "s8") for act in ACTIVATIONS]
    return specs


PREWARM = {"fused_moe_decode": _prewarm_specs}
