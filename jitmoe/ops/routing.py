"""Routers: ``topk_softmax`` / ``topk_sigmoid`` (any E in 1..4096, k in 1..64) and DeepSeek ``grouped_topk``.

Every call is one fused kernel launch on CUDA tensors (csrc_templates/routing/) and the float64 reference
(jitmoe/reference/routing.py) on CPU tensors; no host synchronisation, so calls capture in CUDA graphs.
Selection order is (score descending, expert id ascending): ties go to the lower expert id. Without a bias the
kernels rank the logits themselves (the same order as the scores, immune to their rounding); with a bias they rank
the fp32 score + bias, so experts whose biased scores differ by less than fp32 rounding may rank differently from
the float64 reference. For k <= 32 on the one-warp layouts (E <= 128 * 16 / itemsize) the weights use a fast exp2
(ex2.approx, error bound in csrc_templates/routing/warp_topk.cuh), still within 1e-6 of the float64 scores.

Compiled modules: one per (logits dtype, top-k bucket 32/64) for the top-k ops (softmax and sigmoid share it) and
one per dtype for grouped_topk; E, k, the scoring function and the bias are run-time arguments.
"""
from __future__ import annotations

import functools
import math

import torch

from ..jit import KernelSpec, device_archs, load_module
from ..reference import routing as _ref
from ._library import custom_op
from ._validate import DTYPE_TAG, FLOAT_DTYPES, check_choice, check_int, check_tensor, float_tags

__all__ = ["topk_softmax", "topk_sigmoid", "grouped_topk"]

MAX_EXPERTS = 4096
MAX_TOPK = 64
GROUPED_MAX_EXPERTS = 1024
GROUPED_MAX_TOPK = 32
TOPK_BUCKETS = (32, 64)
_SCORING = {"softmax": 0, "sigmoid": 1}
_INT32_MAX = 2**31 - 1


# -- specs ----------------------------------------------------------------------------------------------------------
def topk_bucket(topk: int) -> int:
    """The compiled top-k capacity serving ``topk`` (result slots per lane = bucket / 32)."""
    return next(b for b in TOPK_BUCKETS if topk <= b)


def _topk_spec(dtype_tag: str, kmax: int, archs) -> KernelSpec:
    return KernelSpec.create("topk_route", "routing", ("topk_route.cu", "topk_route_binding.cpp"),
                             {"dtype": dtype_tag, "kmax": kmax}, archs)


def _grouped_spec(dtype_tag: str, archs) -> KernelSpec:
    return KernelSpec.create("grouped_topk", "routing", ("grouped_topk.cu", "grouped_topk_binding.cpp"),
                             {"dtype": dtype_tag}, archs)


# -- validation -----------------------------------------------------------------------------------------------------
def _check_logits(gating_output, max_experts: int) -> tuple[int, int]:
    check_tensor("gating_output", gating_output, ndim=2, dtypes=FLOAT_DTYPES, min_rows=1)
    num_tokens, num_experts = gating_output.shape
    if num_tokens > _INT32_MAX:
        raise ValueError(f"gating_output: expected at most {_INT32_MAX} rows, got {num_tokens}")
    if not 1 <= num_experts <= max_experts:
        raise ValueError(f"gating_output: expected 1 <= E <= {max_experts} experts (columns), got E={num_experts}")
    return num_tokens, num_experts


def _check_topk(topk, num_experts: int, max_topk: int) -> None:
    check_int("topk", topk, low=1)
    if topk > num_experts:
        raise ValueError(f"topk: expected <= the number of experts E={num_experts}, got {topk}")
    if topk > max_topk:
        raise ValueError(f"topk: expected <= {max_topk} (the largest supported top-k), got {topk}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _check_bias(name: str, bias, gating_output) -> None:
    if bias is None:
        return
    check_tensor(name, bias, ndim=1, dtypes=(torch.float32,), device=gating_output.device)
    if bias.shape[0] != gating_output.shape[1]:
        raise ValueError(f"{name}: expected shape ({gating_output.shape[1]},) (one value per expert), "
                         f"got {tuple(bias.shape)}")


def _check_topk_args(gating_output, topk, renormalize, bias, with_token_expert_indices) -> None:
    num_tokens, num_experts = _check_logits(gating_output, MAX_EXPERTS)
    _check_topk(topk, num_experts, MAX_TOPK)
    _check_bool("renormalize", renormalize)
    _check_bias("bias", bias, gating_output)
    _check_bool("return_token_expert_indices", with_token_expert_indices)
    if with_token_expert_indices and num_tokens * topk > _INT32_MAX:
        raise ValueError(f"return_token_expert_indices: T * topk = {num_tokens * topk} does not fit int32")


def _check_grouped_args(gating_output, topk, n_group, topk_group, renormalize, scoring_func, bias, scale) -> None:
    _, num_experts = _check_logits(gating_output, GROUPED_MAX_EXPERTS)
    _check_topk(topk, num_experts, GROUPED_MAX_TOPK)
    check_int("n_group", n_group, low=1)
    if num_experts % n_group != 0:
        raise ValueError(f"n_group: expected a divisor of the number of experts E={num_experts}, got {n_group}")
    check_int("topk_group", topk_group, low=1)
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected <= n_group={n_group}, got {topk_group}")
    if topk > topk_group * (num_experts // n_group):
        raise ValueError(f"topk: expected <= topk_group * E / n_group = {topk_group * (num_experts // n_group)} "
                         f"(experts in the kept groups), got {topk}")
    _check_bool("renormalize", renormalize)
    check_choice("scoring_func", scoring_func, tuple(_SCORING))
    _check_bias("e_score_correction_bias", bias, gating_output)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"routed_scaling_factor: expected a finite number, got {scale}")


# -- loaders and launchers (CUDA) -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _topk_module(dtype_tag: str, kmax: int, archs: tuple):
    return load_module(_topk_spec(dtype_tag, kmax, archs))


@functools.lru_cache(maxsize=None)
def _grouped_module(dtype_tag: str, archs: tuple):
    return load_module(_grouped_spec(dtype_tag, archs))


def launch_topk(gating_output, topk, renormalize, bias, scoring, weights, ids, token_expert_indices=None) -> None:
    """Run the top-k kernel into preallocated outputs (arguments already validated; tests poison the outputs)."""
    module = _topk_module(DTYPE_TAG[gating_output.dtype], topk_bucket(topk), device_archs(gating_output.device))
    module.run(gating_output, bias, weights, ids, token_expert_indices, topk, _SCORING[scoring], renormalize)


def launch_grouped(gating_output, topk, n_group, topk_group, renormalize, scoring_func, bias, routed_scaling_factor,
                   weights, ids) -> None:
    """Run the grouped top-k kernel into preallocated outputs (arguments already validated)."""
    module = _grouped_module(DTYPE_TAG[gating_output.dtype], device_archs(gating_output.device))
    module.run(gating_output, bias, weights, ids, topk, n_group, topk_group, _SCORING[scoring_func], renormalize,
               float(routed_scaling_factor))


def _new_outputs(gating_output, topk: int, with_token_expert_indices: bool):
    num_tokens = gating_output.shape[0]
    weights = gating_output.new_empty((num_tokens, topk), dtype=torch.float32)
    ids = gating_output.new_empty((num_tokens, topk), dtype=torch.int32)
    tei = gating_output.new_empty((num_tokens, topk) if with_token_expert_indices else (0,), dtype=torch.int32)
    return weights, ids, tei


def _route_topk(gating_output, topk, renormalize, bias, with_token_expert_indices, scoring):
    _check_topk_args(gating_output, topk, renormalize, bias, with_token_expert_indices)
    if gating_output.device.type != "cuda":
        reference = _ref.topk_softmax if scoring == "softmax" else _ref.topk_sigmoid
        weights, ids, tei = reference(gating_output, topk, renormalize, bias, return_token_expert_indices=True)
        return weights, ids, tei if with_token_expert_indices else tei.new_empty((0,))
    weights, ids, tei = _new_outputs(gating_output, topk, with_token_expert_indices)
    launch_topk(gating_output, topk, renormalize, bias, scoring, weights, ids,
                tei if with_token_expert_indices else None)
    return weights, ids, tei


# -- torch.library ops ----------------------------------------------------------------------------------------------
# The third output is vLLM's token_expert_indices ([T, k]) when asked for, else an empty int32 tensor.
@custom_op("jitmoe::topk_softmax", mutates_args=())
def _topk_softmax_op(gating_output: torch.Tensor, topk: int, renormalize: bool, bias: torch.Tensor | None,
                     with_token_expert_indices: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _route_topk(gating_output, topk, renormalize, bias, with_token_expert_indices, "softmax")


@custom_op("jitmoe::topk_sigmoid", mutates_args=())
def _topk_sigmoid_op(gating_output: torch.Tensor, topk: int, renormalize: bool, bias: torch.Tensor | None,
                     with_token_expert_indices: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _route_topk(gating_output, topk, renormalize, bias, with_token_expert_indices, "sigmoid")


@_topk_softmax_op.register_fake
@_topk_sigmoid_op.register_fake
def _topk_fake(gating_output, topk, renormalize, bias, with_token_expert_indices):
    _check_topk_args(gating_output, topk, renormalize, bias, with_token_expert_indices)
    return _new_outputs(gating_output, topk, with_token_expert_indices)


@custom_op("jitmoe::grouped_topk", mutates_args=())
def _grouped_topk_op(gating_output: torch.Tensor, topk: int, n_group: int, topk_group: int, renormalize: bool,
                     scoring_func: str, e_score_correction_bias: torch.Tensor | None,
                     routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    args = (topk, n_group, topk_group, renormalize, scoring_func, e_score_correction_bias, routed_scaling_factor)
    _check_grouped_args(gating_output, *args)
    if gating_output.device.type != "cuda":
        return _ref.grouped_topk(gating_output, *args)
    weights, ids, _ = _new_outputs(gating_output, topk, False)
    launch_grouped(gating_output, *args, weights, ids)
    return weights, ids


@_grouped_topk_op.register_fake
def _grouped_topk_fake(gating_output, topk, n_group, topk_group, renormalize, scoring_func, e_score_correction_bias,
                       routed_scaling_factor):
    _check_grouped_args(gating_output, topk, n_group, topk_group, renormalize, scoring_func,
                        e_score_correction_bias, routed_scaling_factor)
    weights, ids, _ = _new_outputs(gating_output, topk, False)
    return weights, ids


# -- public API -----------------------------------------------------------------------------------------------------
def topk_softmax(gating_output: torch.Tensor, topk: int, renormalize: bool = False, bias: torch.Tensor | None = None,
                 *, return_token_expert_indices: bool = False):
    """Per token, the ``topk`` experts with the largest softmax scores (one fused launch on CUDA).

    Args:
        gating_output: router logits ``[T, E]``, float32/bfloat16/float16, contiguous, T >= 1, 1 <= E <= 4096.
        topk: 1 <= topk <= min(E, 64).
        renormalize: divide the k weights of a token by their sum.
        bias: optional float32 ``[E]`` added to the scores for the selection only (DeepSeek-style correction
            bias); the weights are the unbiased scores.
        return_token_expert_indices: also return vLLM's ``token_expert_indices`` (int32 ``[T, k]``, ``j * T + t``).

    Returns:
        ``(weights float32 [T, k], ids int32 [T, k])`` (plus ``token_expert_indices``), sorted by score descending;
        ties go to the lower expert id.
    """
    _check_topk_args(gating_output, topk, renormalize, bias, return_token_expert_indices)
    weights, ids, tei = torch.ops.jitmoe.topk_softmax(gating_output, topk, renormalize, bias,
                                                      return_token_expert_indices)
    return (weights, ids, tei) if return_token_expert_indices else (weights, ids)


def topk_sigmoid(gating_output: torch.Tensor, topk: int, renormalize: bool = False, bias: torch.Tensor | None = None,
                 *, return_token_expert_indices: bool = False):
    """Like :func:`topk_softmax` with sigmoid scores (each expert scored independently)."""
    _check_topk_args(gating_output, topk, renormalize, bias, return_token_expert_indices)
    weights, ids, tei = torch.ops.jitmoe.topk_sigmoid(gating_output, topk, renormalize, bias,
                                                      return_token_expert_indices)
    return (weights, ids, tei) if return_token_expert_indices else (weights, ids)


def grouped_topk(gating_output: torch.Tensor, topk: int, n_group: int, topk_group: int, renormalize: bool = True,
                 scoring_func: str = "softmax", e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 grouped top-k routing (one fused launch on CUDA).

    The E experts form ``n_group`` groups of E / n_group consecutive ids (any group size). Scores are softmax or
    sigmoid of the logits. A group scores as the sum of its two largest biased scores (score + bias) when
    ``e_score_correction_bias`` is given (the one score for groups of one expert), else as its largest score. The
    ``topk_group`` best groups are kept, the ``topk`` best experts of the kept groups are selected by biased score,
    and their weights are the unbiased scores, divided by their sum if ``renormalize``, then multiplied by
    ``routed_scaling_factor``. Ties (groups and experts) go to the lower id.

    Limits: E <= 1024 and divisible by n_group, topk <= 32, topk_group <= n_group,
    topk <= topk_group * E / n_group; the bias is float32 ``[E]``.

    Returns ``(weights float32 [T, k], ids int32 [T, k])`` sorted by biased score descending.
    """
    _check_grouped_args(gating_output, topk, n_group, topk_group, renormalize, scoring_func, e_score_correction_bias,
                        routed_scaling_factor)
    return torch.ops.jitmoe.grouped_topk(gating_output, topk, n_group, topk_group, renormalize, scoring_func,
                                         e_score_correction_bias, float(routed_scaling_factor))


# -- prewarm --------------------------------------------------------------------------------------------------------
def _prewarm_topk(dtypes, topks, archs) -> list[KernelSpec]:
    buckets = sorted({topk_bucket(k) for k in topks if 1 <= k <= MAX_TOPK}) if topks else list(TOPK_BUCKETS)
    return [_topk_spec(d, b, (a,)) for d in float_tags(dtypes) for b in buckets for a in archs]


def _prewarm_grouped(dtypes, topks, archs) -> list[KernelSpec]:
    return [_grouped_spec(d, (a,)) for d in float_tags(dtypes) for a in archs]


PREWARM = {"topk_softmax": _prewarm_topk, "topk_sigmoid": _prewarm_topk, "grouped_topk": _prewarm_grouped}
