"""Expert Choice routing: each expert picks its top-C tokens; tokens keep up to top_k of the experts that picked them.

CUDA tensors run two or three launches with no host synchronisation; CPU tensors run the pure-torch reference.
From 1024 to 32768 tokens (normalize_over="experts") the key path scores every (token, expert) pair once and
keeps a 16-bit key of each, expert-major: a [E, T] workspace of 2 bytes per pair, the size of bf16 logits. The
other paths keep no dense [T, E] buffer. Semantics, tie rules and the exact score recipe:
:mod:`jitmoe.reference.expert_choice`.
"""
from __future__ import annotations

import functools
import importlib

import torch

from ..jit import KernelSpec, device_archs, load_module
from ._library import custom_op
from ._validate import DTYPE_TAG, check_int, float_tags

_ref = importlib.import_module("jitmoe.reference.expert_choice")  # the module, not the function it re-exports

__all__ = ["expert_choice", "expert_choice_capacity"]

expert_choice_capacity = _ref.expert_choice_capacity


def _spec(dtype_tag: str, archs) -> KernelSpec:
    # Only the logits dtype is compiled in: T, E, top_k, capacity and the modes are run-time values.
    return KernelSpec.create("expert_choice", "expert_choice", ("expert_choice.cu", "expert_choice_binding.cpp"),
                             {"dtype": dtype_tag}, archs)


def _check_op_args(gating_output, token_mask, top_k, capacity, normalize_over, fallback, expert_major) -> None:
    _ref.check_routing_args(gating_output, token_mask, top_k, normalize_over, fallback, expert_major)
    check_int("capacity", capacity, low=1, high=gating_output.shape[0])


@functools.lru_cache(maxsize=None)
def _module(dtype_tag: str, archs: tuple):
    return load_module(_spec(dtype_tag, archs))


def new_outputs(gating_output: torch.Tensor, top_k: int, capacity: int, expert_major: bool):
    """Empty outputs in the op's order: (weights, ids, counts), or expert-major (token_ids, weights, counts)."""
    num_tokens, num_experts = gating_output.shape
    rows, cols = (num_experts, capacity) if expert_major else (num_tokens, top_k)
    weights = gating_output.new_empty((rows, cols), dtype=torch.float32)
    ids = gating_output.new_empty((rows, cols), dtype=torch.int32)
    counts = gating_output.new_empty((num_experts,), dtype=torch.int32)
    return (ids, weights, counts) if expert_major else (weights, ids, counts)


# The kernels' three paths (csrc_templates/expert_choice/expert_choice.cuh): "columns" selects over whole columns,
# "candidates" over short candidate lists from one row-major pass, "keys" over dense columns of 16-bit score keys
# from one row-major pass (the last two: normalize_over="experts" only; "keys" also T <= 2^16 and E <= 1024). All
# give the same routing; "auto" picks by shape. Tests and benchmarks force one.
PATHS = {"auto": 0, "columns": 1, "candidates": 2, "keys": 3}


def launch_expert_choice(gating_output, token_mask, top_k: int, capacity: int, normalize_over: str, fallback: str,
                         expert_major: bool, outputs, path: str = "auto") -> None:
    """Run the CUDA kernels into ``outputs`` from :func:`new_outputs` (arguments already validated; tests poison
    the outputs first)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
    first, second, counts = outputs
    weights, ids = (second, first) if expert_major else (first, second)
    module = _module(DTYPE_TAG[gating_output.dtype], device_archs(gating_output.device))
    module.run(gating_output, token_mask, weights, ids, counts, capacity, top_k, normalize_over == "tokens",
               fallback == "topk", expert_major, PATHS[path])


@custom_op("jitmoe::expert_choice", mutates_args=())
def _expert_choice_op(gating_output: torch.Tensor, token_mask: torch.Tensor | None, top_k: int, capacity: int,
                      normalize_over: str, fallback: str, expert_major: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_args(gating_output, token_mask, top_k, capacity, normalize_over, fallback, expert_major)
    if not gating_output.is_cuda:
        return _ref.route_expert_choice(gating_output, token_mask, top_k, capacity, normalize_over, fallback,
                                        expert_major)
    outputs = new_outputs(gating_output, top_k, capacity, expert_major)
    launch_expert_choice(gating_output, token_mask, top_k, capacity, normalize_over, fallback, expert_major, outputs)
    return outputs


@_expert_choice_op.register_fake
def _(gating_output, token_mask, top_k, capacity, normalize_over, fallback, expert_major):
    _check_op_args(gating_output, token_mask, top_k, capacity, normalize_over, fallback, expert_major)
    return new_outputs(gating_output, top_k, capacity, expert_major)


def expert_choice(gating_output: torch.Tensor, top_k: int, capacity_factor: float = 1.25, *,
                  normalize_over: str = "experts", fallback: str = "topk", token_mask: torch.Tensor | None = None,
                  expert_major: bool = False, return_counts: bool = False):
    """Expert Choice routing (Zhou et al. 2022) with an optional token-choice fallback.

    Parameters
    ----------
    gating_output : [T, E] float32/bfloat16/float16 logits, contiguous, T >= 1, E <= 4096.
    top_k : experts per token, 1 <= top_k <= E: the width of the token-major output and the factor in the capacity.
    capacity_factor : > 0; each expert picks C = min(T, max(1, ceil(capacity_factor * T * top_k / E))) tokens
        (T counts padding tokens too, so C depends on shapes only); see :func:`expert_choice_capacity`.
    normalize_over : "experts" (softmax over each token's experts) or "tokens" (over each expert's real tokens).
    fallback : "topk" fills a token's slots left empty by the experts' choice with its best other experts, best
        first; "none" leaves them as id -1, weight 0.
    token_mask : optional [T] bool, False marks padding tokens: never picked, no capacity used, output -1 / 0.
    expert_major : return the experts' choices as [E, C] instead of the tokens' [T, top_k].
    return_counts : also return the int32 [E] number of entries of the returned routing naming each expert.

    Returns
    -------
    ``(weights float32 [T, top_k], ids int32 [T, top_k])``: per token, the experts that picked it (best score first,
    ties to the lower expert id), then its fallback experts or -1 / 0. Weights are the scores (not renormalised).
    With ``expert_major=True``: ``(token_ids int32 [E, C], weights float32 [E, C])``: each expert's picked tokens
    in increasing token order (ties in score went to the lower token id), then -1 / 0; no top_k cap, no fallback.
    With ``return_counts=True`` the counts follow as a third element.

    Raises
    ------
    TypeError / ValueError naming the argument, for wrong dtypes, shapes, devices and values (top_k > E,
    capacity_factor <= 0, unknown normalize_over / fallback, empty T, ...).

    Expert Choice is not causal (a token's routing depends on the rest of the batch): use it for training and
    prefill. No host synchronisation; capturable in CUDA graphs.
    """
    _ref.check_expert_choice_args(gating_output, top_k, capacity_factor, normalize_over, fallback, token_mask,
                                  expert_major, return_counts)
    capacity = expert_choice_capacity(*gating_output.shape, top_k, capacity_factor)
    first, second, counts = torch.ops.jitmoe.expert_choice(gating_output, token_mask, top_k, capacity,
                                                           normalize_over, fallback, expert_major)
    return (first, second, counts) if return_counts else (first, second)


def _prewarm_specs(dtypes, topks, archs) -> list[KernelSpec]:
    del topks  # a run-time value: one module per (logits dtype, arch) serves every top_k
    return [_spec(dtype, (arch,)) for dtype in float_tags(dtypes) for arch in archs]


PREWARM = {"expert_choice": _prewarm_specs}
