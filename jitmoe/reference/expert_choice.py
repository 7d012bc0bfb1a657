"""Pure-torch Expert Choice routing: the CPU path of ``jitmoe.expert_choice`` and the oracle of its GPU tests.

Semantics (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", with a token-choice fallback):

- **Scores** are a softmax of the logits in fp32: over the E experts of each token (``normalize_over="experts"``,
  the usual router softmax) or over the real tokens of each expert (``normalize_over="tokens"``, the EC paper's
  variant; padding tokens are left out of the denominators, so padding never changes a real token's score).
  The softmax follows a fixed fp32 recipe (:func:`fixed_exp`, :func:`lane_sum`) that the CUDA kernels reproduce bit
  for bit: an expert compares scores of different tokens, and any unspecified rounding would flip near-ties between
  CPU and GPU. The recipe is within a few ulp of ``torch.softmax``.
- **Capacity** ``C = min(T, max(1, ceil(capacity_factor * T * top_k / E)))``, computed exactly from the shapes
  (``capacity_factor`` is read as the decimal it prints as, so 1.1 means 11/10). T is the full token count, padding
  included, so the capacity of a padded batch is a function of its shape only (no host synchronisation).
- **Expert choice**: each expert picks its top ``min(C, real tokens)`` real tokens by score; equal scores go to the
  lower token id. Padding tokens (``token_mask`` False) are never picked and consume no capacity.
- **Token-major output** ``(weights [T, top_k] fp32, ids [T, top_k] int32)``: a token keeps up to ``top_k`` of the
  experts that picked it, best score first (ties: lower expert id). With ``fallback="topk"`` its remaining slots hold,
  best first, its highest-scoring experts among those that did not pick it (its standard top-k over them); with
  ``fallback="none"`` they hold id -1 and weight 0. Padding tokens get -1 / 0 in every slot. Weights are the
  token's scores, not renormalised. Picks beyond ``top_k`` are dropped, so experts may end up below capacity.
- **Expert-major output** ``(token_ids [E, C] int32, weights [E, C] fp32)``: each expert's picked tokens in
  increasing token order with their scores, then -1 / 0 up to C (when fewer than C real tokens exist). This is the
  pure expert choice: no per-token ``top_k`` cap and no fallback (``top_k`` only sets the capacity).
- **Counts** ``[E] int32``: how many entries of the returned routing name each expert.

Logits may be -inf (an expert a token must not get) as long as every softmax keeps one finite logit (every token
for "experts", every expert's real tokens for "tokens"); exp underflows to 0 below -87, so such scores tie at 0
and rank by id. NaN or +inf logits give unspecified routings.

EC routing is not causal: a token's experts depend on the other tokens of the batch. Use it for training and
prefill, not for token-by-token decoding.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..ops._validate import FLOAT_DTYPES, check_choice, check_int, check_tensor

__all__ = ["expert_choice", "expert_choice_capacity", "expert_choice_scores"]

NORMALIZE_OVER = ("experts", "tokens")
FALLBACKS = ("topk", "none")
MAX_EXPERTS = 4096
MAX_TOKENS = 2**30
EXPERT_LANES = 32     # partial sums of a token's softmax over its experts
TOKEN_LANES = 1024    # partial sums of an expert's softmax over its tokens


def _f32(hex_literal: str) -> torch.Tensor:
    return torch.tensor(float.fromhex(hex_literal), dtype=torch.float32)


_LOG2E = _f32("0x1.715476p+0")
_LN2_HI = _f32("0x1.62e4p-1")
_LN2_LO = _f32("0x1.7f7d1cp-20")
_TAYLOR = [_f32(h) for h in ("0x1.a01a02p-13", "0x1.6c16c2p-10", "0x1.111112p-7", "0x1.555556p-5",
                             "0x1.555556p-3", "0x1p-1", "0x1p+0", "0x1p+0")]   # 1/7!, 1/6!, ..., 1/1!, 1/0!


def fixed_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for float32 x <= 0 by a fixed recipe; 0 below -87 (and for NaN).

    n = floor(x*log2e + 1/2), r = (x - n*ln2_hi) - n*ln2_lo, a degree-7 Taylor polynomial of e^r in Horner form,
    times 2^n. Every multiply and add is a separate float32 op, which the kernels mirror with unfused intrinsics.
    """
    in_range = x >= -87.0
    x = torch.where(in_range, x, torch.zeros_like(x)).clamp(max=0.0)
    n = torch.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    poly = _TAYLOR[0].expand_as(r)
    for coeff in _TAYLOR[1:]:
        poly = poly * r + coeff
    two_pow_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(in_range, poly * two_pow_n, torch.zeros_like(poly))


def lane_sum(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """Sum over the last dim in a fixed order: lane j adds elements j, j+lanes, ... in order; then a halving tree."""
    n = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, (-n) % lanes))
    chunks = x.reshape(*x.shape[:-1], -1, lanes)
    acc = torch.zeros(chunks.shape[:-2] + (lanes,), dtype=torch.float32, device=x.device)
    for i in range(chunks.shape[-2]):
        acc = acc + chunks[..., i, :]
    half = lanes // 2
    while half:
        acc = acc[..., :half] + acc[..., half:2 * half]
        half //= 2
    return acc[..., 0]


def expert_choice_scores(gating_output: torch.Tensor, normalize_over: str = "experts",
                         token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [T, E] scores: softmax over each token's experts, or over each expert's real tokens (padding rows: 0)."""
    x = gating_output.float()
    if normalize_over == "experts":
        terms = fixed_exp(x - x.amax(dim=1, keepdim=True))
        return terms * (1.0 / lane_sum(terms, EXPERT_LANES))[:, None]
    real = _real_tokens(token_mask, x.shape[0], x.device)[:, None]
    col_max = torch.where(real, x, torch.full_like(x, -math.inf)).amax(dim=0)
    terms = torch.where(real, fixed_exp(x - col_max), torch.zeros_like(x))
    scores = terms * (1.0 / lane_sum(terms.t(), TOKEN_LANES))
    return torch.where(real, scores, torch.zeros_like(scores))


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = min(T, max(1, ceil(capacity_factor * T * top_k / E))), exact (capacity_factor read as its decimal)."""
    ratio = Fraction(repr(float(capacity_factor)))
    numerator = ratio.numerator * num_tokens * top_k
    denominator = ratio.denominator * num_experts
    return min(num_tokens, max(1, -(-numerator // denominator)))


def check_routing_args(gating_output, token_mask, top_k, normalize_over, fallback, expert_major) -> None:
    """Checks shared by the public functions and the op (TypeError / ValueError naming the argument)."""
    check_tensor("gating_output", gating_output, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, num_experts = gating_output.shape
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"gating_output: expected 1 <= T <= {MAX_TOKENS} tokens (rows), got T={num_tokens}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"gating_output: expected 1 <= E <= {MAX_EXPERTS} experts (columns), got E={num_experts}")
    check_int("top_k", top_k, low=1)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected <= the number of experts E={num_experts}, got {top_k}")
    check_choice("normalize_over", normalize_over, NORMALIZE_OVER)
    check_choice("fallback", fallback, FALLBACKS)
    _check_bool("expert_major", expert_major)
    if token_mask is not None:
        check_tensor("token_mask", token_mask, ndim=1, dtypes=(torch.bool,), device=gating_output.device)
        if token_mask.shape[0] != num_tokens:
            raise ValueError(f"token_mask: expected shape ({num_tokens},) (one flag per token), "
                             f"got {tuple(token_mask.shape)}")


def check_expert_choice_args(gating_output, top_k, capacity_factor, normalize_over, fallback, token_mask,
                             expert_major, return_counts) -> None:
    """Every check of :func:`expert_choice`'s arguments."""
    check_routing_args(gating_output, token_mask, top_k, normalize_over, fallback, expert_major)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor: expected a float, got {type(capacity_factor).__name__}")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor: expected a finite number > 0, got {capacity_factor}")
    _check_bool("return_counts", return_counts)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def route_expert_choice(gating_output: torch.Tensor, token_mask: torch.Tensor | None, top_k: int, capacity: int,
                        normalize_over: str, fallback: str, expert_major: bool):
    """The routing for a given capacity: (weights, ids, counts) or, expert-major, (token_ids, weights, counts)."""
    scores = expert_choice_scores(gating_output, normalize_over, token_mask)
    real = _real_tokens(token_mask, scores.shape[0], scores.device)
    picked = _expert_picks(scores, real, capacity)
    if expert_major:
        return _expert_major(scores, picked, capacity)
    return _token_major(scores, picked, real, top_k, fallback)


def expert_choice(gating_output: torch.Tensor, top_k: int, capacity_factor: float = 1.25, *,
                  normalize_over: str = "experts", fallback: str = "topk", token_mask: torch.Tensor | None = None,
                  expert_major: bool = False, return_counts: bool = False):
    """Reference of :func:`jitmoe.expert_choice` (same arguments, results and errors); see the module docstring."""
    check_expert_choice_args(gating_output, top_k, capacity_factor, normalize_over, fallback, token_mask,
                             expert_major, return_counts)
    capacity = expert_choice_capacity(*gating_output.shape, top_k, capacity_factor)
    first, second, counts = route_expert_choice(gating_output, token_mask, top_k, capacity, normalize_over,
                                                fallback, expert_major)
    return (first, second, counts) if return_counts else (first, second)


def _real_tokens(token_mask, num_tokens: int, device) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return token_mask.to(device=device, dtype=torch.bool)


def _expert_picks(scores: torch.Tensor, real: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool [T, E]: expert e picked token t. Stable sort: equal scores keep the lower token id first."""
    take = min(capacity, int(real.sum()))
    ranked = torch.where(real[:, None], scores, torch.full_like(scores, -1.0))  # padding below every score
    order = torch.sort(ranked, dim=0, descending=True, stable=True).indices
    picked = torch.zeros_like(scores, dtype=torch.bool)
    picked.scatter_(0, order[:take], True)
    return picked


def _token_major(scores, picked, real, top_k: int, fallback: str):
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices   # ties: lower expert id first
    picked_first = torch.sort(picked.gather(1, by_score).to(torch.uint8), dim=1, descending=True, stable=True)
    experts = by_score.gather(1, picked_first.indices)[:, :top_k]
    keep = picked.gather(1, experts) if fallback == "none" else torch.ones_like(experts, dtype=torch.bool)
    keep &= real[:, None]
    ids = torch.where(keep, experts, torch.full_like(experts, -1)).to(torch.int32)
    weights = torch.where(keep, scores.gather(1, experts), torch.zeros_like(scores[:, :top_k]))
    counts = torch.bincount(ids[ids >= 0].long(), minlength=scores.shape[1]).to(torch.int32)
    return weights, ids, counts


def _expert_major(scores, picked, capacity: int):
    """Each expert's picked tokens in increasing order (a stable sort puts them first), then -1 / 0."""
    first = torch.sort((~picked).to(torch.uint8), dim=0, stable=True).indices[:capacity]   # [C, E]
    valid = picked.gather(0, first)
    token_ids = torch.where(valid, first, torch.full_like(first, -1)).to(torch.int32)
    weights = torch.where(valid, scores.gather(0, first), torch.zeros_like(scores[:capacity]))
    return token_ids.t().contiguous(), weights.t().contiguous(), picked.sum(dim=0).to(torch.int32)
