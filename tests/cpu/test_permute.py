"""moe_align / moe_combine: reference semantics, the static bound, the CPU path, errors, fake shapes, nvcc compile."""
import functools
import os
import re
import shutil

import pytest
import torch

import jitmoe
from jitmoe.ops import permute as pm
from jitmoe.reference.moe import moe_align_bound, moe_align_reference, moe_combine_reference, slot_rows_reference


def random_ids(T, k, num_experts_total, invalid_fraction=0.0):
    ids = torch.randint(0, num_experts_total, (T, k), dtype=torch.int32)
    if invalid_fraction:
        bad = torch.rand(T, k) < invalid_fraction
        ids[bad] = torch.randint(-5, 0, (int(bad.sum()),), dtype=torch.int32) * torch.where(
            torch.rand(int(bad.sum())) < 0.5, 1, -(num_experts_total + 7)).int()
    return ids


def check_align_semantics(ids, num_local, block_m, offset, out):
    """Every property moe_align promises, checked from first principles."""
    sorted_ids, block_expert, num_padded, counts = (t.tolist() for t in out)
    flat = ids.reshape(-1).tolist()
    num_slots = len(flat)
    m_pad_max = moe_align_bound(num_slots, num_local, block_m)
    assert len(sorted_ids) == m_pad_max and len(block_expert) == m_pad_max // block_m
    local = [s for s in range(num_slots) if offset <= flat[s] < offset + num_local]
    assert counts == [sum(1 for s in local if flat[s] - offset == e) for e in range(num_local)]
    used = num_padded[0]
    assert used == sum(-(-c // block_m) * block_m for c in counts) and used % block_m == 0
    row = 0
    for e in range(num_local):  # experts in ascending order, slots ascending, then padding
        slots = [s for s in local if flat[s] - offset == e]
        padded = -(-len(slots) // block_m) * block_m
        assert sorted_ids[row:row + padded] == slots + [num_slots] * (padded - len(slots))
        assert block_expert[row // block_m:(row + padded) // block_m] == [e] * (padded // block_m)
        row += padded
    assert sorted_ids[used:] == [num_slots] * (m_pad_max - used)
    assert block_expert[used // block_m:] == [-1] * ((m_pad_max - used) // block_m)


@pytest.mark.parametrize("T,k,num_local,ep_size,block_m", [
    (0, 2, 4, 1, 16), (1, 1, 1, 1, 1), (1, 8, 256, 1, 64), (7, 2, 8, 4, 16), (33, 4, 3, 2, 128),
    (100, 8, 64, 1, 32), (64, 2, 1000, 1, 64), (5, 3, 5000, 1, 16)])
def test_reference_semantics(T, k, num_local, ep_size, block_m):
    ids = random_ids(T, k, num_local * ep_size, invalid_fraction=0.1)
    for rank in range(ep_size):
        out = moe_align_reference(ids, num_local, block_m, rank * num_local)
        check_align_semantics(ids, num_local, block_m, rank * num_local, out)


def test_slot_rows_reference_inverts_sorted_ids():
    """slot_rows (what moe_align writes for GEMM1's gather): row p of every local slot, -1 for the others."""
    ids = random_ids(37, 4, 16, invalid_fraction=0.2)
    sorted_ids = moe_align_reference(ids, 8, 16, 8)[0]
    rows = slot_rows_reference(sorted_ids, ids.numel())
    local = (ids.reshape(-1) >= 8) & (ids.reshape(-1) < 16)
    assert rows.dtype == torch.int32 and bool((rows[~local] == -1).all())
    for s in torch.nonzero(local).flatten().tolist():
        assert int(sorted_ids[rows[s]]) == s
    assert int(local.sum()) == len(set(rows[local].tolist()))


def test_reference_semantics_all_on_one_expert_and_empty_experts():
    ids = torch.full((300, 4), 6, dtype=torch.int32)
    ids[::5, 1] = 2  # experts 0, 1, 3, 4, 5, 7 stay empty
    for offset in (0, 2):
        check_align_semantics(ids, 8, 16, offset, moe_align_reference(ids, 8, 16, offset))


def test_align_plan_picks_one_cta_for_few_slots_and_bounded_chunks_for_many():
    assert [pm.align_chunks(n) for n in (0, 1, 64, pm.MULTI_CTA_MIN_SLOTS - 1)] == [0] * 4
    assert pm.align_chunks(pm.MULTI_CTA_MIN_SLOTS) == -(-pm.MULTI_CTA_MIN_SLOTS // pm.CHUNK_SLOTS)
    assert pm.align_chunks(32768) == 32  # Qwen3-30B at T = 4096: 64 CTAs of 512 threads
    assert pm.align_chunks(2**20) == pm.MAX_CHUNKS
    for n in range(pm.MULTI_CTA_MIN_SLOTS, 300_000, 997):
        chunks = pm.align_chunks(n)
        assert 1 <= chunks <= pm.MAX_CHUNKS and (chunks == pm.MAX_CHUNKS or chunks * pm.CHUNK_SLOTS >= n)


@functools.lru_cache(maxsize=None)
def _worst_padding(slots, experts, block_m):
    """Largest padded length any distribution of at most `slots` slots over `experts` experts can need."""
    if experts == 0 or slots == 0:
        return 0
    return max(-(-c // block_m) * block_m + _worst_padding(slots - c, experts - 1, block_m) for c in range(slots + 1))


@pytest.mark.parametrize("block_m", [1, 2, 3, 4, 8])
def test_bound_is_safe(block_m):
    for slots in range(0, 13):
        for experts in range(1, 6):
            bound = moe_align_bound(slots, experts, block_m)
            assert bound % block_m == 0
            assert _worst_padding(slots, experts, block_m) <= bound, (slots, experts)


def test_bound_formula():
    assert moe_align_bound(0, 8, 64) == 0
    assert moe_align_bound(8, 256, 64) == 8 * 64  # fewer slots than experts: each may sit alone in a block
    assert moe_align_bound(65536, 256, 128) == 65536 + 256 * 127  # already a multiple of 128
    assert moe_align_bound(10, 2, 16) == 48  # 10 + 2 * 15 = 40, rounded up
    assert _worst_padding(4, 4, 16) == moe_align_bound(4, 4, 16)  # one slot per expert reaches the bound


def test_moe_align_cpu_path_matches_reference():
    ids = random_ids(50, 4, 32, invalid_fraction=0.05)
    out = jitmoe.moe_align(ids, 16, 32, local_expert_offset=16)
    ref = moe_align_reference(ids, 16, 32, 16)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert [t.dtype for t in out] == [torch.int32] * 4


def test_moe_align_fake_shapes():
    ids = torch.empty(7, 3, dtype=torch.int32, device="meta")
    sorted_ids, block_expert, num_padded, counts = jitmoe.moe_align(ids, 5, 16)
    rows = moe_align_bound(21, 5, 16)
    assert sorted_ids.shape == (rows,) and block_expert.shape == (rows // 16,)
    assert num_padded.shape == (1,) and counts.shape == (5,)


def test_ops_pass_opcheck():
    ids = random_ids(9, 2, 6)
    torch.library.opcheck(torch.ops.jitmoe.moe_align.default, (ids, 6, 16, 0))
    torch.library.opcheck(torch.ops.jitmoe.moe_combine.default, (torch.randn(18, 8), ids, torch.empty(9, 8), 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_sums_local_slots_in_order(dtype):
    T, k, H, num_local, offset = 11, 3, 24, 4, 4
    ids = random_ids(T, k, 12, invalid_fraction=0.1)
    slots = torch.randn(T * k, H).to(dtype)
    local = (ids >= offset) & (ids < offset + num_local)
    slots[~local.reshape(-1)] = float("nan")  # rows GEMM2 never wrote
    out = jitmoe.moe_combine(slots, ids, num_local, offset)
    expect = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            if local[t, j]:
                expect[t] += slots[t * k + j].float()
    assert torch.equal(out, expect.to(dtype))
    assert torch.equal(out, moe_combine_reference(slots, ids, num_local, offset))
    given = torch.empty(T, H, dtype=dtype)
    assert jitmoe.moe_combine(slots, ids, num_local, offset, output=given) is given


ALIGN_ERRORS = [
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "topk_ids"),
    (dict(topk_ids=torch.zeros(8, dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_ids=torch.zeros(2, 4, dtype=torch.int32).t()), ValueError, "topk_ids"),
    (dict(num_local_experts=0), ValueError, "num_local_experts"),
    (dict(num_local_experts=pm.MAX_LOCAL_EXPERTS + 1), ValueError, "num_local_experts"),
    (dict(num_local_experts=2.0), TypeError, "num_local_experts"),
    (dict(block_m=0), ValueError, "block_m"),
    (dict(local_expert_offset=-1), ValueError, "local_expert_offset"),
]


@pytest.mark.parametrize("over,exc,name", ALIGN_ERRORS)
def test_moe_align_errors(over, exc, name):
    args = dict(topk_ids=torch.zeros(4, 2, dtype=torch.int32), num_local_experts=4, block_m=16)
    args.update(over)
    with pytest.raises(exc, match=name):
        jitmoe.moe_align(**args)


COMBINE_ERRORS = [
    (dict(out_slots=torch.zeros(7, 8)), ValueError, "out_slots"),
    (dict(out_slots=torch.zeros(8, 8, dtype=torch.int32)), TypeError, "out_slots"),
    (dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids"),
    (dict(output=torch.zeros(4, 4)), ValueError, "output"),
    (dict(output=torch.zeros(4, 8, dtype=torch.float16)), TypeError, "output"),
    (dict(num_local_experts=0), ValueError, "num_local_experts"),
]


@pytest.mark.parametrize("over,exc,name", COMBINE_ERRORS)
def test_moe_combine_errors(over, exc, name):
    args = dict(out_slots=torch.zeros(8, 8), topk_ids=torch.zeros(4, 2, dtype=torch.int32), num_local_experts=2,
                output=torch.zeros(4, 8))
    args.update(over)
    with pytest.raises(exc, match=name):
        jitmoe.moe_combine(**args)


def test_prewarm_covers_every_arch():
    specs = pm.PREWARM["moe_align"](["bf16", "fp16", "fp32"], [1, 2, 8], ["80", "90a"])
    assert [s.archs for s in specs] == [("80",), ("90a",)]
    assert {s.readable_name for s in specs} == {"moe_permute_sm80", "moe_permute_sm90a"}


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_templates_compile_for_sm80_and_sm90a(tmp_path):
    from jitmoe.jit import compile_cuda_sources
    spec = pm._spec(("80", "90a"))
    results = compile_cuda_sources(spec, tmp_path, ptxas_verbose=True)
    spills = [int(n) for r in results for n in re.findall(r"(\d+) bytes spill stores", r.output)]
    assert results and spills and not any(spills)
