"""Reference routers (float64 math): the CPU path of ``jitmoe.topk_softmax`` & co. and the oracle of the GPU tests.

Shared semantics:
- Selection ranks experts by (score descending, expert id ascending): ties go to the lower id.
- Without a bias the ranking uses the logits themselves. Softmax and sigmoid are strictly increasing, so this is
  the same order as the scores, but it cannot be changed by their rounding or saturation (float64 sigmoid is 1.0
  for every logit above ~37).
- With a bias (per-expert, float32) the ranking uses score + bias; the weights are always the unbiased scores.
- Weights are float32 ``[T, k]`` sorted like the ranking, ids int32 ``[T, k]``.

These functions assume valid arguments; ``jitmoe.ops.routing`` validates before calling them. They work on any
device (the GPU tests run them on CUDA tensors in float64).
"""
from __future__ import annotations

import torch

__all__ = ["topk_softmax", "topk_sigmoid", "grouped_topk", "token_expert_indices"]


def _scores(logits64: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.softmax(logits64, dim=-1) if scoring == "softmax" else torch.sigmoid(logits64)


def _rank_desc(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim by (key desc, index asc): a stable descending sort keeps equal keys in id order."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def token_expert_indices(num_tokens: int, topk: int, device=None) -> torch.Tensor:
    """vLLM's "source rows": ``[t, j] = j * T + t`` (int32 ``[T, k]``), the row of (t, j) in a k-major layout."""
    j = torch.arange(topk, device=device, dtype=torch.int64)
    t = torch.arange(num_tokens, device=device, dtype=torch.int64)
    return (j[None, :] * num_tokens + t[:, None]).to(torch.int32)


def _finish(scores: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float = 1.0):
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return weights.to(torch.float32), ids.to(torch.int32)


def _topk(gating_output, topk, renormalize, bias, return_token_expert_indices, scoring):
    logits = gating_output.double()
    scores = _scores(logits, scoring)
    rank_key = logits if bias is None else scores + bias.double()
    ids = _rank_desc(rank_key)[:, :topk]
    weights, ids = _finish(scores, ids, renormalize)
    if return_token_expert_indices:
        return weights, ids, token_expert_indices(logits.shape[0], topk, logits.device)
    return weights, ids


def topk_softmax(gating_output: torch.Tensor, topk: int, renormalize: bool = False, bias: torch.Tensor | None = None,
                 *, return_token_expert_indices: bool = False):
    """Top-k of softmax(gating_output) per row; see the module docstring."""
    return _topk(gating_output, topk, renormalize, bias, return_token_expert_indices, "softmax")


def topk_sigmoid(gating_output: torch.Tensor, topk: int, renormalize: bool = False, bias: torch.Tensor | None = None,
                 *, return_token_expert_indices: bool = False):
    """Top-k of sigmoid(gating_output) per row; see the module docstring."""
    return _topk(gating_output, topk, renormalize, bias, return_token_expert_indices, "sigmoid")


def _group_scores(choice: torch.Tensor, n_group: int, biased: bool) -> torch.Tensor:
    """[T, n_group]: the max of each group, or with a bias the sum of its two largest biased scores (DeepSeek-V3)."""
    grouped = choice.view(choice.shape[0], n_group, -1)
    if not biased:
        return grouped.max(dim=-1).values
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def grouped_topk(gating_output: torch.Tensor, topk: int, n_group: int, topk_group: int, renormalize: bool = True,
                 scoring_func: str = "softmax", e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 grouped top-k ("noaux_tc").

    Experts form ``n_group`` groups of consecutive ids. Each group scores as the max of its ranking keys (logits),
    or with a bias as the sum of its two largest biased scores (the single one for groups of one). The
    ``topk_group`` best groups are kept (ties: lower group id), the top-k experts of the kept groups are selected
    by the same ranking as ``topk_softmax``, and the weights (unbiased scores) are renormalised if asked and then
    multiplied by ``routed_scaling_factor``.
    """
    logits = gating_output.double()
    scores = _scores(logits, scoring_func)
    biased = e_score_correction_bias is not None
    choice = scores + e_score_correction_bias.double() if biased else logits
    kept_groups = _rank_desc(_group_scores(choice, n_group, biased))[:, :topk_group]
    group_size = logits.shape[-1] // n_group
    kept = torch.zeros(logits.shape[0], n_group, dtype=torch.bool, device=logits.device)
    kept.scatter_(1, kept_groups, True)
    kept = kept.repeat_interleave(group_size, dim=1)
    # Rank by choice, then move kept experts first with a second stable sort: dropped experts never outrank kept
    # ones, even at -inf.
    order = _rank_desc(choice)
    order = order.gather(1, _rank_desc(kept.gather(1, order).to(torch.int8)))
    ids = order[:, :topk]
    return _finish(scores, ids, renormalize, routed_scaling_factor)
