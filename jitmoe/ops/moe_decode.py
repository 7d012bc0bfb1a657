"""Decode path of the fused MoE layer (``csrc_templates/moe_decode/``): two weight-streaming launches for a few
tokens, where a grouped GEMM's tiles would be mostly padding. GEMM1 computes each (token, choice) slot's
activated row straight from x; GEMM2 computes each token's output columns and sums its top-k choices itself, in
order, so there is no moe_align, no padded order, no per-slot output buffer and no combine launch.

``use_decode`` is the pipeline's rule for taking this path; ``run_decode`` launches it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..jit import KernelSpec, device_archs, load_module
from ._validate import DTYPE_TAG
from .moe_gemm import ACTIVATIONS, activation_name

__all__ = ["decode_spec", "fits_decode", "use_decode", "run_decode"]

# The decode path streams every slot's expert weights, the grouped GEMMs every distinct expert's once: it wins while
# few slots share an expert. Measured on the H100 against the forced sm90 path at T = 1, 2, 4, 8, 16 on the four
# benchmark shapes (benchmarks/results/h100-2026-11-22-session6/): it won every row with T <= 2, and up to T = 8
# while slots <= E_local / 2 (Qwen3 T=8 0.21 vs 0.24 ms, DeepSeek-V3 T=8 1.85 vs 1.93), and lost the others
# (Mixtral T=4 0.93 vs 0.81, OLMoE T=8 0.27 vs 0.25, every T=16).
_ALWAYS_TOKENS = 2
_MAX_TOKENS = 8
_MAX_GRID_Y = 65535  # GEMM1's grid has one row of blocks per slot


def decode_spec(dtype: str, activation: str, archs) -> KernelSpec:
    return KernelSpec.create("moe_decode", "moe_decode", ("moe_decode.cu", "moe_decode_binding.cpp"),
                             {"dtype": dtype, "act": activation_name(activation)}, archs)


def fits_decode(num_tokens: int, topk: int, hidden: int, inter: int) -> bool:
    """Whether the decode kernels can run the shape: the slots fit the grid's y dimension and rows are whole
    16-byte chunks."""
    return num_tokens * topk <= _MAX_GRID_Y and hidden % 8 == 0 and inter % 8 == 0


def use_decode(num_tokens: int, topk: int, num_experts: int, hidden: int, inter: int) -> bool:
    """The pipeline's default: the decode path for a few tokens whose slots rarely share an expert (see above),
    when the shape fits. ``num_experts`` is the number of local experts."""
    few = num_tokens <= _ALWAYS_TOKENS or (num_tokens <= _MAX_TOKENS and 2 * num_tokens * topk <= num_experts)
    return num_tokens > 0 and few and fits_decode(num_tokens, topk, hidden, inter)


def run_decode(output: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, slot_weights: torch.Tensor,
               fc1: torch.Tensor, fc2: torch.Tensor, fc1_bias: Optional[torch.Tensor],
               fc2_bias: Optional[torch.Tensor], act_params: dict, activation: str, local_expert_offset: int) -> None:
    """output[t] = sum_j w[t, j] * (act(x[t] fc1[e]^T + b1) fc2[e]^T + b2) over the token's local experts, in a
    fixed order (zeros for tokens without one). Inputs are validated by the caller (cutlass_fused_moe); never syncs."""
    num_tokens, topk = topk_ids.shape
    if not fits_decode(num_tokens, topk, x.shape[1], fc2.shape[2]):
        raise ValueError(f"moe_decode: shape T={num_tokens} k={topk} H={x.shape[1]} I={fc2.shape[2]} does not fit the"
                         f" decode kernels (T * k <= {_MAX_GRID_Y}, H and I multiples of 8)")
    inter = torch.empty(num_tokens * topk, fc2.shape[2], dtype=x.dtype, device=x.device)
    spec = decode_spec(DTYPE_TAG[x.dtype], activation, device_archs(x.device))
    load_module(spec).run(x, fc1, fc1_bias, inter, fc2, fc2_bias, output, topk_ids, slot_weights,
                          act_params.get("swiglu_alpha"), act_params.get("swiglu_beta"),
                          act_params.get("swiglu_limit"), local_expert_offset)


def _prewarm_specs(dtypes, topks, archs) -> list[KernelSpec]:
    del topks  # top-k is a run-time value
    return [decode_spec(d, act, tuple(archs)) for d in dtypes if d in ("bf16", "fp16") for act in ACTIVATIONS]


PREWARM = {"fused_moe_decode": _prewarm_specs}
