"""Pure-torch reference of the Omni (Cartesian-product) router: brute force over all N*N pairs.

Expert (i, j) of token t scores x[t, i] + y[t, j]; its flat index is i*N + j. The k best experts are ranked by
the exact value of the sum, descending, then by flat index, ascending. The exact sum is carried as the TwoSum
pair (s, e): s = x + y rounded to the compute dtype (fp32, or fp64 for fp64 inputs) and e = (x + y) - s, which
is exact in that dtype; (s, e) in lexicographic order is the order of the exact sums. The returned score is s
cast to the input dtype. Ranking by s alone would put equal rounded sums in index order; the two orders differ only
where two different sums round to the same s, which needs a sum that is not exact in fp32 (never for quantized
logits, or for bf16/fp16 logits within a factor 2**13 of each other in magnitude). The kernel uses the exact order
because it is the one for which its per-axis candidate pruning is provably exact; for (fp32 sum, index) no per-axis
preselection can be (see csrc_templates/omni_router/omni_router.cuh).

NaN sums rank above everything (as in torch.sort), -0.0 equals +0.0, a sum that is not finite has e = 0. The CUDA
kernel matches this reference exactly for finite logits whose sums do not overflow; an infinite or NaN logit ties
every pair it is in, and such ties may be ordered (or cut at the k-th place) differently by the kernel.
"""
from __future__ import annotations

import torch

from ..ops._validate import FLOAT_DTYPES, check_int, check_tensor

__all__ = ["omni_router", "omni_router_backward", "check_omni_inputs", "check_omni_backward_inputs"]

MAX_TOP_K = 256
MAX_NUM_EXPERT_SQRT = 46340  # the largest N with N*N < 2**31 (flat indices are int32)
_CHUNK_ELEMS = 1 << 21       # pairs materialised at once


def check_omni_inputs(x, y, top_k, *, allow_float64: bool = False) -> None:
    """Raise TypeError/ValueError unless x, y are matching (T, N) logits and 1 <= top_k <= min(N*N, 256)."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor("router_logits_x", x, ndim=2, dtypes=dtypes, contiguous=False)
    check_tensor("router_logits_y", y, ndim=2, dtypes=dtypes, contiguous=False)
    if y.dtype != x.dtype:
        raise TypeError(f"router_logits_y: expected the dtype of router_logits_x ({x.dtype}), got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"router_logits_y: expected a tensor on {x.device} (router_logits_x), got {y.device}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"router_logits_y: expected {x.shape[0]} tokens (rows of router_logits_x), "
                         f"got {y.shape[0]}")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"router_logits_y: expected N = {x.shape[1]} columns (router_logits_x), got {y.shape[1]}")
    n = x.shape[1]
    if not 1 <= n <= MAX_NUM_EXPERT_SQRT:
        raise ValueError(f"router_logits_x: expected 1 <= N <= {MAX_NUM_EXPERT_SQRT} columns, got {n}")
    check_int("top_k", top_k)
    high = min(n * n, MAX_TOP_K)
    if not 1 <= top_k <= high:
        raise ValueError(f"top_k: expected 1 <= top_k <= min(N*N, {MAX_TOP_K}) = {high} (N = {n}), got {top_k}")


def check_omni_backward_inputs(grad_scores, indices, num_expert_sqrt, *, allow_float64: bool = False) -> None:
    """Raise TypeError/ValueError unless grad_scores [T, k] and int32 indices [T, k] can go back to (T, N) grads."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor("grad_scores", grad_scores, ndim=2, dtypes=dtypes, contiguous=False)
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,), contiguous=False, device=grad_scores.device)
    if indices.shape != grad_scores.shape:
        raise ValueError(f"indices: expected the shape of grad_scores {tuple(grad_scores.shape)}, "
                         f"got {tuple(indices.shape)}")
    if not 1 <= grad_scores.shape[1] <= MAX_TOP_K:
        raise ValueError(f"grad_scores: expected 1 <= top_k <= {MAX_TOP_K} columns, got {grad_scores.shape[1]}")
    if not isinstance(num_expert_sqrt, torch.SymInt):  # symbolic under torch.compile with dynamic shapes
        check_int("num_expert_sqrt", num_expert_sqrt)
    if not 1 <= num_expert_sqrt <= MAX_NUM_EXPERT_SQRT:
        raise ValueError(f"num_expert_sqrt: expected 1 <= N <= {MAX_NUM_EXPERT_SQRT}, got {num_expert_sqrt}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _top_pairs(x: torch.Tensor, y: torch.Tensor, top_k: int) -> torch.Tensor:
    """Flat indices (int64) of the top_k pairs of every row, ranked by (s desc, e desc, flat index asc)."""
    a, b = x[:, :, None], y[:, None, :]
    s = a + b
    b_virtual = s - a
    err = (a - (s - b_virtual)) + (b - b_virtual)
    err = torch.where(torch.isfinite(s), err, torch.zeros_like(err))
    s, err = s.flatten(1), err.flatten(1)
    # Stable sorts from the least significant key up; the flat index order is the starting order.
    by_err = torch.sort(err, dim=1, descending=True, stable=True).indices
    by_sum = torch.sort(s.gather(1, by_err), dim=1, descending=True, stable=True).indices
    return by_err.gather(1, by_sum[:, :top_k])


def omni_router(router_logits_x: torch.Tensor, router_logits_y: torch.Tensor, top_k: int):
    """(scores [T, top_k] in the input dtype, indices int32 [T, top_k]); differentiable in x and y.

    Accepts float64 too (for gradcheck). Runs on any device; materialises up to 2**21 pairs at a time.
    """
    x, y = router_logits_x, router_logits_y
    check_omni_inputs(x, y, top_k, allow_float64=True)
    num_tokens, n = x.shape
    compute = _compute_dtype(x.dtype)
    xc, yc = x.detach().to(compute), y.detach().to(compute)
    rows = max(1, _CHUNK_ELEMS // (n * n))
    flat = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    for start in range(0, num_tokens, rows):
        flat[start:start + rows] = _top_pairs(xc[start:start + rows], yc[start:start + rows], top_k)
    # The same fp add as above, now on the autograd graph of x and y.
    scores = x.to(compute).gather(1, flat // n) + y.to(compute).gather(1, flat % n)
    return scores.to(x.dtype), flat.to(torch.int32)


def omni_router_backward(grad_scores: torch.Tensor, indices: torch.Tensor, num_expert_sqrt: int):
    """(grad_x, grad_y) [T, N] in the dtype of grad_scores: every slot's gradient goes to its row i and column j."""
    check_omni_backward_inputs(grad_scores, indices, num_expert_sqrt, allow_float64=True)
    n = num_expert_sqrt
    compute = _compute_dtype(grad_scores.dtype)
    g = grad_scores.to(compute)
    flat = indices.long()
    shape = (grad_scores.shape[0], n)
    grad_x = torch.zeros(shape, dtype=compute, device=g.device).scatter_add_(1, flat // n, g)
    grad_y = torch.zeros(shape, dtype=compute, device=g.device).scatter_add_(1, flat % n, g)
    return grad_x.to(grad_scores.dtype), grad_y.to(grad_scores.dtype)
