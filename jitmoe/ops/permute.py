"""Token permutation for the fused MoE layer: expert-sorted, tile-padded order (moe_align) and the finalize
(moe_combine). Both kernels live in one small module (`csrc_templates/permute/`) with no compile-time parameters.

moe_align is EP-aware: ids outside [local_expert_offset, local_expert_offset + num_local_experts) — other ranks'
experts and invalid ids alike — are dropped inside the op. Its output length is a static bound computed from
shapes (``moe_align_bound``), so nothing waits for the device; the rows in use are the device value num_padded.

moe_align has two kernels in the one module, picked per call from the slot count (``align_chunks``): one CTA for
few slots (decode), and for many slots one launch of 2 * num_chunks CTAs that hand work along through four sync
words. Those words must be zero when the kernel starts and the kernel zeroes them again when it ends, so each
stream keeps one zeroed buffer for its eager calls; a call being captured into a CUDA graph gets a fresh zeroed
buffer (a memset node inside the graph), so graphs never share sync words with each other or with eager calls.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSpec, device_archs, load_module
from ..reference import moe as _ref
from ._library import custom_op
from ._validate import FLOAT_DTYPES, check_int, check_tensor

__all__ = ["moe_align", "moe_align_bound", "moe_combine"]

MAX_LOCAL_EXPERTS = 8192  # (1 + 1) * E int32 of shared memory must fit every sm_80+ device (>= 99 KB)
MAX_BLOCK_M = 1024
_INT32_MAX = 2**31 - 1

# Below this many slots one CTA is faster (the many-CTA kernel's hand-offs cost 4-7 us). H100, kernel time at 2048 /
# 3072 slots, single vs many CTAs: E = 8 6.0 / 6.8 vs 9.8 / 9.7 us, E = 64 9.6 / 11.6 vs 11.6 / 11.6, E = 256 14.5 /
# 16.9 vs 14.9 / 14.0 (benchmarks/results/h100-2026-11-23-session13/dev_align_mid.log).
MULTI_CTA_MIN_SLOTS = 3072
CHUNK_SLOTS = 1024          # slots per chunk: two walks of 32 slots per warp of a 512-thread CTA
MAX_CHUNKS = 128            # bounds the scanner's [chunks, E] walk and the grid (2 * chunks CTAs)
_SYNC_WORDS = 4

moe_align_bound = _ref.moe_align_bound


# -- spec and loader -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # one spec per arch tuple: building it hashes its parameters on every call
def _spec(archs: tuple[str, ...]) -> KernelSpec:
    return KernelSpec.create("moe_permute", "permute", ("moe_permute.cu", "moe_permute_binding.cpp"), {}, archs)


def _module(device: torch.device):
    return load_module(_spec(device_archs(device)))


# -- validation ------------------------------------------------------------------------------------------------------
def _check_align_args(topk_ids, num_local_experts, block_m, local_expert_offset) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32,))
    check_int("num_local_experts", num_local_experts, low=1, high=MAX_LOCAL_EXPERTS)
    check_int("block_m", block_m, low=1, high=MAX_BLOCK_M)
    check_int("local_expert_offset", local_expert_offset, low=0, high=_INT32_MAX - num_local_experts)
    rows = moe_align_bound(topk_ids.numel(), num_local_experts, block_m)
    if rows > _INT32_MAX:
        raise ValueError(f"topk_ids: {topk_ids.numel()} slots need {rows} padded rows, more than int32 indexes")


def _check_combine_args(out_slots, topk_ids, output, num_local_experts, local_expert_offset) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32,))
    check_tensor("out_slots", out_slots, ndim=2, dtypes=FLOAT_DTYPES, device=topk_ids.device)
    num_tokens, topk = topk_ids.shape
    if out_slots.shape[0] != num_tokens * topk:
        raise ValueError(f"out_slots: expected {num_tokens * topk} rows (T * k), got {out_slots.shape[0]}")
    check_tensor("output", output, ndim=2, dtypes=(out_slots.dtype,), device=topk_ids.device)
    if tuple(output.shape) != (num_tokens, out_slots.shape[1]):
        raise ValueError(f"output: expected shape {(num_tokens, out_slots.shape[1])}, got {tuple(output.shape)}")
    check_int("num_local_experts", num_local_experts, low=1)
    check_int("local_expert_offset", local_expert_offset, low=0, high=_INT32_MAX - num_local_experts)


# -- the moe_align plan and its workspace --------------------------------------------------------------------------
def align_chunks(num_slots: int) -> int:
    """Chunks of the many-CTA moe_align kernel for ``num_slots`` slots; 0 selects the single-CTA kernel."""
    if num_slots < MULTI_CTA_MIN_SLOTS:
        return 0
    return min(MAX_CHUNKS, -(-num_slots // CHUNK_SLOTS))


_stream_sync_words: dict[tuple[int, int], torch.Tensor] = {}
_no_tensor: dict[torch.device, torch.Tensor] = {}


def _sync_words(device: torch.device) -> torch.Tensor:
    """Four zeroed int32 words the kernel leaves zeroed: one buffer per stream, a fresh one inside a graph capture."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(_SYNC_WORDS, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    words = _stream_sync_words.get(key)
    if words is None:
        words = _stream_sync_words[key] = torch.zeros(_SYNC_WORDS, dtype=torch.int32, device=device)
    return words


def _unused(device: torch.device) -> torch.Tensor:
    """An empty int32 tensor for the workspace arguments the single-CTA kernel ignores."""
    t = _no_tensor.get(device)
    if t is None:
        t = _no_tensor[device] = torch.empty(0, dtype=torch.int32, device=device)
    return t


# -- device entry points (no validation: the fused pipeline calls these after validating once) -----------------------
def empty_align_outputs(num_slots: int, num_local_experts: int, block_m: int, device):
    """Uninitialised (sorted_ids, block_expert, num_padded, expert_counts); moe_align writes every element."""
    rows = moe_align_bound(num_slots, num_local_experts, block_m)
    new = lambda n: torch.empty(n, dtype=torch.int32, device=device)  # noqa: E731
    return new(rows), new(rows // block_m), new(1), new(num_local_experts)


def align_into(topk_ids, num_local_experts: int, block_m: int, local_expert_offset: int, outputs,
               slot_rows=None, block_done=None) -> None:
    """Run the moe_align kernel into preallocated ``outputs`` (from empty_align_outputs); one launch, no sync.
    ``slot_rows`` (int32 [T * k], optional) also gets every slot's row in the sorted order, -1 where its expert is
    not local: the inverse map that the sm90ws GEMM1 gathers x with. ``block_done`` (int32, one per block of
    block_m rows, optional) is zeroed: the per-block completion counters of the sm90ws GEMMs (moe_gemm)."""
    sorted_ids, block_expert, num_padded, counts = outputs
    device = topk_ids.device
    chunks = align_chunks(topk_ids.numel())
    if chunks:
        sync = _sync_words(device)
        scratch = torch.empty((chunks + 1) * num_local_experts, dtype=torch.int32, device=device)
    else:
        sync = scratch = _unused(device)
    _module(device).align(topk_ids, sorted_ids, block_expert, num_padded, counts, slot_rows, block_done, sync,
                          scratch, num_local_experts, local_expert_offset, block_m, chunks)


def combine_into(out_slots, topk_ids, output, num_local_experts: int, local_expert_offset: int) -> None:
    """output[t] = sum over local j of out_slots[t*k + j] in fp32, fixed order; one launch, skipped when empty."""
    if output.numel() == 0:
        return
    _module(output.device).combine(out_slots, topk_ids, output, num_local_experts, local_expert_offset)


# -- torch.library ops -----------------------------------------------------------------------------------------------
@custom_op("jitmoe::moe_align", mutates_args=())
def _moe_align_op(topk_ids: torch.Tensor, num_local_experts: int, block_m: int,
                  local_expert_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not topk_ids.is_cuda:
        return _ref.moe_align_reference(topk_ids, num_local_experts, block_m, local_expert_offset)
    outputs = empty_align_outputs(topk_ids.numel(), num_local_experts, block_m, topk_ids.device)
    align_into(topk_ids, num_local_experts, block_m, local_expert_offset, outputs)
    return outputs


@_moe_align_op.register_fake
def _(topk_ids, num_local_experts, block_m, local_expert_offset):
    return empty_align_outputs(topk_ids.numel(), num_local_experts, block_m, topk_ids.device)


@custom_op("jitmoe::moe_combine", mutates_args=("output",))
def _moe_combine_op(out_slots: torch.Tensor, topk_ids: torch.Tensor, output: torch.Tensor, num_local_experts: int,
                    local_expert_offset: int) -> None:
    if output.is_cuda:
        combine_into(out_slots, topk_ids, output, num_local_experts, local_expert_offset)
    else:
        output.copy_(_ref.moe_combine_reference(out_slots, topk_ids, num_local_experts, local_expert_offset))


@_moe_combine_op.register_fake
def _(out_slots, topk_ids, output, num_local_experts, local_expert_offset):
    return None


# -- public API ------------------------------------------------------------------------------------------------------
def moe_align(topk_ids: torch.Tensor, num_local_experts: int, block_m: int, local_expert_offset: int = 0):
    """Sort the slots s = t * k + j of ``topk_ids`` (int32 [T, k], global ids) by local expert, padded to ``block_m``.

    Returns ``(sorted_ids int32 [m_pad_max], block_expert int32 [m_pad_max // block_m], num_padded int32 [1],
    expert_counts int32 [num_local_experts])`` with ``m_pad_max = moe_align_bound(T * k, num_local_experts,
    block_m)``. Local expert e is global id ``local_expert_offset + e``; other ids are dropped. Experts appear in
    ascending order, each with its slots in ascending order followed by padding rows holding ``T * k``; unused
    trailing blocks have ``block_expert == -1``. Deterministic; one launch on CUDA, no host synchronisation.
    """
    _check_align_args(topk_ids, num_local_experts, block_m, local_expert_offset)
    return _moe_align_op(topk_ids, num_local_experts, block_m, local_expert_offset)


def moe_combine(out_slots: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int,
                local_expert_offset: int = 0, output: torch.Tensor | None = None) -> torch.Tensor:
    """``output[t] = sum_j out_slots[t * k + j]`` over the choices j whose id is local, in j order, fp32 sums.

    Rows of ``out_slots`` ([T * k, H]) whose id is not local are never read, so they may hold anything; a token
    without a local expert gets zeros. Writes ``output`` ([T, H], allocated when None) in place and returns it.
    """
    if output is None and isinstance(topk_ids, torch.Tensor) and isinstance(out_slots, torch.Tensor):
        output = torch.empty(topk_ids.shape[0], out_slots.shape[-1], dtype=out_slots.dtype, device=out_slots.device)
    _check_combine_args(out_slots, topk_ids, output, num_local_experts, local_expert_offset)
    _moe_combine_op(out_slots, topk_ids, output, num_local_experts, local_expert_offset)
    return output


def _prewarm(dtypes, topks, archs) -> list[KernelSpec]:
    """One module per arch serves moe_align and moe_combine for every dtype and top-k."""
    return [_spec((arch,)) for arch in archs]


PREWARM = {"moe_align": _prewarm}
