"""Omni (Cartesian-product / product-key) router: the exact top-k of x[t, i] + y[t, j] over all N*N experts.

``omni_router(x, y, top_k) -> (scores [T, k] in the input dtype, indices int32 [T, k])`` with indices = i*N + j,
ranked by the exact sum descending, then by index ascending (see jitmoe/reference/omni.py for why the exact sum and
how that relates to "fp32 score, then index"); scores are the sums rounded to fp32, then to the input dtype.
Differentiable in x and y: dx[t, i] is the sum of dscores over the slots whose expert has row i (dy likewise),
computed in a fixed order without atomics; dindices is ignored.

CUDA tensors run one fused kernel per call for the forward and one for the backward (csrc_templates/omni_router/);
CPU tensors run the brute-force reference (float64 inputs are accepted there, for gradcheck). No host
synchronisation: both directions capture in CUDA graphs. Compiled modules: one per (logits dtype, top-k bucket
32/64/128/256); N, k and T are run-time arguments. Multi-head (H, T, N) inputs are not supported: flatten the heads
into tokens.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSpec, device_archs, load_module
from ..reference import omni as _ref
from ._library import custom_op
from ._validate import DTYPE_TAG, check_int, float_tags

__all__ = ["omni_router", "omni_router_func"]

TOPK_BUCKETS = (32, 64, 128, 256)


# -- specs ----------------------------------------------------------------------------------------------------------
def topk_bucket(top_k: int) -> int:
    """The compiled top-k capacity serving ``top_k`` (per-warp sorted lists of this length)."""
    return next(b for b in TOPK_BUCKETS if top_k <= b)


def _spec(dtype_tag: str, kb: int, archs) -> KernelSpec:
    return KernelSpec.create("omni_router", "omni_router", ("omni_router.cu", "omni_router_binding.cpp"),
                             {"dtype": dtype_tag, "kb": kb}, archs)


# -- validation -----------------------------------------------------------------------------------------------------
def _on_cpu(t) -> bool:
    """float64 is accepted on CPU only (the reference path; gradcheck needs it)."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _check_forward(x, y, top_k) -> None:
    _ref.check_omni_inputs(x, y, top_k, allow_float64=_on_cpu(x))


def _check_backward(grad_scores, indices, num_expert_sqrt) -> None:
    _ref.check_omni_backward_inputs(grad_scores, indices, num_expert_sqrt, allow_float64=_on_cpu(grad_scores))


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name}: expected a CUDA or CPU tensor, got device {t.device}")


# -- loaders and launchers (CUDA) -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _module(dtype_tag: str, kb: int, archs: tuple):
    return load_module(_spec(dtype_tag, kb, archs))


def _cuda_module(t: torch.Tensor, top_k: int):
    return _module(DTYPE_TAG[t.dtype], topk_bucket(top_k), device_archs(t.device))


def launch_forward(x, y, top_k: int, scores, indices) -> None:
    """Forward kernel into preallocated outputs (inputs validated, contiguous, on CUDA; tests poison outputs)."""
    if x.shape[0] > 0:
        _cuda_module(x, top_k).forward(x, y, scores, indices)


def launch_backward(grad_scores, indices, grad_x, grad_y) -> None:
    """Backward kernel into preallocated (T, N) gradients; writes every element of both."""
    if grad_scores.shape[0] > 0:
        _cuda_module(grad_scores, grad_scores.shape[1]).backward(grad_scores, indices, grad_x, grad_y)


# -- implementations (CUDA kernel or CPU reference) -----------------------------------------------------------------
def _forward(x: torch.Tensor, y: torch.Tensor, top_k: int):
    _check_forward(x, y, top_k)
    _check_device(x, "router_logits_x")
    if _on_cpu(x):
        scores, indices = _ref.omni_router(x, y, top_k)
        return scores.detach(), indices
    x, y = x.contiguous(), y.contiguous()
    scores = x.new_empty((x.shape[0], top_k))
    indices = x.new_empty((x.shape[0], top_k), dtype=torch.int32)
    launch_forward(x, y, top_k, scores, indices)
    return scores, indices


def _backward(grad_scores: torch.Tensor, indices: torch.Tensor, num_expert_sqrt: int):
    _check_backward(grad_scores, indices, num_expert_sqrt)
    _check_device(grad_scores, "grad_scores")
    if _on_cpu(grad_scores):
        return _ref.omni_router_backward(grad_scores, indices, num_expert_sqrt)
    grad_scores, indices = grad_scores.contiguous(), indices.contiguous()
    shape = (grad_scores.shape[0], num_expert_sqrt)
    grad_x, grad_y = grad_scores.new_empty(shape), grad_scores.new_empty(shape)
    launch_backward(grad_scores, indices, grad_x, grad_y)
    return grad_x, grad_y


# -- torch.library ops ----------------------------------------------------------------------------------------------
@custom_op("jitmoe::omni_router", mutates_args=())
def _omni_router_op(router_logits_x: torch.Tensor, router_logits_y: torch.Tensor,
                    top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(router_logits_x, router_logits_y, top_k)


@_omni_router_op.register_fake
def _omni_router_fake(router_logits_x, router_logits_y, top_k):
    _check_forward(router_logits_x, router_logits_y, top_k)
    shape = (router_logits_x.shape[0], top_k)
    return router_logits_x.new_empty(shape), router_logits_x.new_empty(shape, dtype=torch.int32)


# Not differentiable itself (no double backward). Indices must come from the forward: the kernel skips any outside
# [0, N*N), the CPU reference raises on them.
@custom_op("jitmoe::omni_router_backward", mutates_args=())
def _omni_router_backward_op(grad_scores: torch.Tensor, indices: torch.Tensor,
                             num_expert_sqrt: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_scores, indices, num_expert_sqrt)


@_omni_router_backward_op.register_fake
def _omni_router_backward_fake(grad_scores, indices, num_expert_sqrt):
    _check_backward(grad_scores, indices, num_expert_sqrt)
    shape = (grad_scores.shape[0], num_expert_sqrt)
    return grad_scores.new_empty(shape), grad_scores.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    router_logits_x, _, _ = inputs
    _, indices = output
    ctx.save_for_backward(indices)
    ctx.num_expert_sqrt = router_logits_x.shape[1]


def _autograd_backward(ctx, grad_scores, _grad_indices):
    (indices,) = ctx.saved_tensors
    grad_x, grad_y = torch.ops.jitmoe.omni_router_backward(grad_scores, indices, ctx.num_expert_sqrt)
    return grad_x, grad_y, None


_omni_router_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# -- public API -----------------------------------------------------------------------------------------------------
def omni_router(router_logits_x: torch.Tensor, router_logits_y: torch.Tensor, top_k: int):
    """The top_k of the N*N experts (i, j) of every token by x[t, i] + y[t, j].

    router_logits_x, router_logits_y: (T, N) float32/bfloat16/float16 on the same device (float64 too on CPU);
    any N >= 1 (N*N < 2**31), any T >= 0, 1 <= top_k <= min(N*N, 256). Returns (scores [T, top_k] in the input
    dtype, indices int32 [T, top_k]) sorted by the exact sum descending, then by index i*N + j ascending.
    """
    _check_forward(router_logits_x, router_logits_y, top_k)
    return torch.ops.jitmoe.omni_router(router_logits_x, router_logits_y, top_k)


def omni_router_func(router_logits_x: torch.Tensor, router_logits_y: torch.Tensor, num_expert_sqrt: int,
                     num_experts_per_token: int):
    """The public Triton router's call shape (HKUSTDial/omni-moe ``triton_omni_router_func``): (scores, indices)."""
    check_int("num_expert_sqrt", num_expert_sqrt, low=1)
    if isinstance(router_logits_x, torch.Tensor) and router_logits_x.dim() == 2 \
            and router_logits_x.shape[1] != num_expert_sqrt:
        raise ValueError(f"num_expert_sqrt: expected the number of columns of router_logits_x "
                         f"({router_logits_x.shape[1]}), got {num_expert_sqrt}")
    return omni_router(router_logits_x, router_logits_y, num_experts_per_token)


# -- prewarm --------------------------------------------------------------------------------------------------------
def _prewarm(dtypes, topks, archs) -> list[KernelSpec]:
    buckets = sorted({topk_bucket(k) for k in topks if 1 <= k <= TOPK_BUCKETS[-1]})
    return [_spec(d, kb, (a,)) for d in float_tags(dtypes) for kb in buckets for a in archs]


PREWARM = {"omni_router": _prewarm}
